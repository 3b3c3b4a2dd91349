"""Input pipelines on real data: Fashion-MNIST, digits, a small ImageFolder and TFDS datasets."""

import gzip
import io
import os
import shutil
import time

import ml_collections
import numpy as np
from PIL import Image
import pytest
from sklearn.datasets import load_sample_images
import tensorflow_datasets as tfds

from qhnet import config as qhnet_config
from qhnet import data
from qhnet.data import bundled, core, folders, transforms
from qhnet.data import tfds as tfds_source
from tests.conftest import grayscale_imagefolder

# Three classes of the packaged ImageNet-100 list, deliberately not in sorted order.
WNIDS = ('n03947888', 'n01558993', 'n02086240')


def data_config(**overrides) -> ml_collections.ConfigDict:
    config = qhnet_config.data_config()
    config.update(dict(name='fashion_mnist', image_size=None, augment=False, rand_augment=False,
                       erasing=0.0, num_workers=0))
    config.update(overrides)
    return config


def take(iterator, count: int) -> list[dict[str, np.ndarray]]:
    return [next(iterator) for _ in range(count)]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_packaged_class_list_is_the_cmc_imagenet100():
    with open(folders.IMAGENET100_CLASSES) as f:
        wnids = f.read().split()
    assert len(wnids) == len(set(wnids)) == 100
    assert wnids[:3] == ['n02869837', 'n01749939', 'n02488291']
    assert all(w.startswith('n') and len(w) == 9 for w in wnids)


def test_fashion_mnist_info():
    info = data.get_info(data_config())
    assert (info.num_train, info.num_test, info.num_classes) == (60000, 10000, 10)
    assert info.image_shape == (28, 28, 1)
    assert len(info.class_names) == 10


@pytest.mark.parametrize('augment', [False, True])
def test_fashion_mnist_batch(augment):
    batch = next(data.make_iterator(data_config(augment=augment), 'train', batch_size=512,
                                    seed=0, train=True))
    assert batch.keys() == {'image', 'label'}
    assert batch['image'].shape == (512, 28, 28, 1) and batch['image'].dtype == np.uint8
    assert batch['label'].shape == (512,) and batch['label'].dtype == np.int32
    images = data.normalise(batch['image'], data.get_info(data_config()))
    assert images.dtype == np.float32
    assert abs(images.mean()) < 0.1 and 0.85 < images.std() < 1.15
    assert batch['label'].min() >= 0 and batch['label'].max() < 10
    assert len(np.unique(batch['label'])) == 10


def test_augmentation_changes_images_not_order():
    plain, augmented = (next(data.make_iterator(data_config(augment=augment), 'train',
                                                batch_size=64, seed=0, train=True))
                        for augment in (False, True))
    np.testing.assert_array_equal(plain['label'], augmented['label'])
    changed = np.any(plain['image'] != augmented['image'], axis=(1, 2, 3))
    assert 0.5 < changed.mean() <= 1


def test_fashion_mnist_resized_to_three_channels():
    config = data_config(image_size=32, channels=3)
    assert data.get_info(config).image_shape == (32, 32, 3)
    batch = next(data.make_iterator(config, 'test', batch_size=8, seed=0, train=False))
    assert batch['image'].shape == (8, 32, 32, 3)
    np.testing.assert_array_equal(batch['image'][..., 0], batch['image'][..., 2])


def test_digits_info_and_split():
    info = data.get_info(data_config(name='digits'))
    assert (info.num_train, info.num_test, info.num_classes) == (1500, 297, 10)
    assert info.image_shape == (8, 8, 1)


def test_same_seed_same_stream_and_different_seed_different_stream():
    config = data_config(augment=True)

    def stream(seed):
        return take(data.make_iterator(config, 'train', batch_size=64, seed=seed, train=True), 3)

    assert_same_batches(stream(1), stream(1))
    assert not np.array_equal(stream(1)[0]['label'], stream(2)[0]['label'])


def test_resume_across_epoch_boundary():
    config = data_config(name='digits')
    # 1500 train examples, batches of 256: 5 steps an epoch.
    fresh = take(data.make_iterator(config, 'train', batch_size=256, seed=3, train=True), 12)
    for start_step in (3, 5, 7):
        resumed = take(data.make_iterator(config, 'train', batch_size=256, seed=3, train=True,
                                          start_step=start_step), 12 - start_step)
        assert_same_batches(fresh[start_step:], resumed)
    assert not np.array_equal(fresh[0]['label'], fresh[5]['label'])


def test_resume_reproduces_augmentation():
    config = data_config(augment=True)
    fresh = take(data.make_iterator(config, 'train', batch_size=32, seed=5, train=True), 4)
    resumed = take(data.make_iterator(config, 'train', batch_size=32, seed=5, train=True,
                                      start_step=2), 2)
    assert_same_batches(fresh[2:], resumed)


def test_process_slices_make_up_the_global_batch():
    config = data_config(augment=True)
    whole = next(data.make_iterator(config, 'train', batch_size=48, seed=0, train=True))
    parts = [next(data.make_iterator(config, 'train', batch_size=16, seed=0, train=True,
                                     process_index=p, process_count=3)) for p in range(3)]
    for key in whole:
        np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]))


def test_eval_covers_each_test_example_once(digits):
    config = data_config(name='digits')
    batches = list(data.make_iterator(config, 'test', batch_size=64, seed=0, train=False))
    assert len(batches) == 5
    masks = np.concatenate([b['mask'] for b in batches])
    assert masks.dtype == np.float32 and masks.sum() == 297
    labels = np.concatenate([b['label'] for b in batches])[masks == 1]
    np.testing.assert_array_equal(labels, digits[1][1500:])
    assert np.all(batches[-1]['image'][batches[-1]['mask'] == 0] == 0)

    sharded = [list(data.make_iterator(config, 'test', batch_size=32, seed=0, train=False,
                                       process_index=p, process_count=2)) for p in range(2)]
    assert len(sharded[0]) == len(sharded[1])
    assert sum(b['mask'].sum() for shard in sharded for b in shard) == 297


def write_jpeg(path, image: np.ndarray):
    Image.fromarray(image).save(path, format='JPEG', quality=90)


def fake_photo(digit: np.ndarray, width: int, height: int, tint: int) -> np.ndarray:
    """An RGB photo-sized image made from an 8x8 digit in [0, 1]."""
    gray = np.asarray(Image.fromarray((digit * 255).astype(np.uint8)).resize((width, height)))
    return np.stack([gray, np.roll(gray, tint, axis=1), 255 - gray], axis=-1)


@pytest.fixture(scope='module')
def imagefolder(tmp_path_factory, digits):
    """train/ (4 images a class) and val/ (2 a class) for WNIDS, plus a folder not in any list."""
    root = tmp_path_factory.mktemp('imagefolder')
    images = digits[0][..., 0]
    for folder, count in (('train', 4), ('val', 2)):
        for c, wnid in enumerate(WNIDS + ('n99999999',)):
            os.makedirs(root / folder / wnid)
            for k in range(count):
                photo = fake_photo(images[10 * c + k], 40 + 6 * k, 30 + 4 * c, tint=c)
                write_jpeg(root / folder / wnid / f'{wnid}_{k}.JPEG', photo)
    class_list = root / 'classes.txt'
    class_list.write_text('\n'.join(WNIDS) + '\n')
    return root, class_list


def test_imagefolder_missing_classes_are_named(imagefolder):
    root, _ = imagefolder
    with pytest.raises(data.DatasetNotFoundError) as error:
        data.get_info(data_config(name='imagenet100', data_dir=str(root)))
    message = str(error.value)
    assert '194 class folders are missing' in message
    assert os.path.join('val', 'n02869837') in message
    assert WNIDS[0] not in message
    assert 'train/<wnid>' in message


def test_imagefolder_end_to_end(imagefolder):
    root, class_list = imagefolder
    config = data_config(name='imagenet100', data_dir=str(root), class_list=str(class_list),
                         image_size=32, augment=True)
    info = data.get_info(config)
    assert info.class_names == tuple(sorted(WNIDS))
    assert (info.num_classes, info.num_train, info.num_test) == (3, 12, 6)
    assert info.image_shape == (32, 32, 3)

    batches = list(data.make_iterator(config, 'test', batch_size=4, seed=0, train=False))
    labels = np.concatenate([b['label'] for b in batches])[:6]
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 2, 2])
    assert [b['mask'].sum() for b in batches] == [4, 2]
    assert batches[0]['image'].shape == (4, 32, 32, 3)
    assert batches[0]['image'].dtype == np.uint8

    train = take(data.make_iterator(config, 'train', batch_size=4, seed=1, train=True), 6)
    assert train[0]['image'].shape == (4, 32, 32, 3)
    epoch = np.concatenate([b['label'] for b in train[:3]])
    np.testing.assert_array_equal(np.bincount(epoch), [4, 4, 4])
    resumed = take(data.make_iterator(config, 'train', batch_size=4, seed=1, train=True,
                                      start_step=2), 4)
    assert_same_batches(train[2:], resumed)


def copy_imagefolder(source, root):
    for folder in ('train', 'val'):
        for wnid in WNIDS:
            shutil.copytree(source / folder / wnid, root / folder / wnid)
    return root


def test_corrupt_val_image_is_found_when_opened(tmp_path, imagefolder):
    source, class_list = imagefolder
    root = copy_imagefolder(source, tmp_path / 'corrupt')
    corrupt = root / 'val' / WNIDS[1] / f'{WNIDS[1]}_1.JPEG'
    corrupt.write_bytes(b'\xff\xd8\xff\xe0 this is not a JPEG' * 20)
    config = data_config(name='imagenet100', data_dir=str(root), class_list=str(class_list),
                         image_size=32)
    with pytest.raises(data.CorruptImageError, match=f'{corrupt}.*Replace or delete the file'):
        data.open_dataset(config)


@pytest.mark.parametrize('num_workers', [0, 2])
def test_corrupt_train_image_names_the_file_when_read(tmp_path, imagefolder, num_workers):
    source, class_list = imagefolder
    root = copy_imagefolder(source, tmp_path / 'corrupt')
    corrupt = root / 'train' / WNIDS[0] / f'{WNIDS[0]}_3.JPEG'
    corrupt.write_bytes(corrupt.read_bytes()[:300])  # a good header, the data cut short
    config = data_config(name='imagenet100', data_dir=str(root), class_list=str(class_list),
                         image_size=32, num_workers=num_workers)
    dataset = data.open_dataset(config)  # only the first image of a train class is checked
    with pytest.raises(data.CorruptImageError, match=str(corrupt)):
        take(dataset.batches('train', batch_size=4, seed=0, train=True), 3)


@pytest.mark.parametrize('fmt', ['GIF', 'WEBP', 'BMP'])
def test_other_formats_named_jpg_are_refused_in_both_splits(tmp_path, imagefolder, fmt):
    """Images are JPEGs or PNGs by their content: a GIF, WebP or BMP named .JPEG is refused in
    val (when the dataset is opened) and in train (when it is read), naming the format."""
    source, class_list = imagefolder
    config = dict(name='imagenet100', class_list=str(class_list), image_size=32)
    for split, index in (('val', 1), ('train', 3)):
        root = copy_imagefolder(source, tmp_path / f'{fmt}_{split}')
        impostor = root / split / WNIDS[0] / f'{WNIDS[0]}_{index}.JPEG'
        with Image.open(impostor) as photo:
            photo.save(impostor, fmt)
        with pytest.raises(data.CorruptImageError,
                           match=rf'{impostor}: it is {fmt[0]}.*not JPEG or PNG'):
            dataset = data.open_dataset(data_config(data_dir=str(root), **config))
            take(dataset.batches('train', batch_size=4, seed=0, train=True), 3)


def test_a_large_valid_jpeg_is_read_in_both_splits(tmp_path, imagefolder):
    """14000x14000 pixels is over PIL's decompression-bomb limit, and a valid photo."""
    source, class_list = imagefolder
    root = copy_imagefolder(source, tmp_path / 'large')
    large = np.zeros((14000, 14000, 3), np.uint8)
    large[::7, ::5] = 200
    for split in ('val', 'train'):
        write_jpeg(root / split / WNIDS[0] / f'{WNIDS[0]}_0.JPEG', large)
    config = data_config(name='imagenet100', data_dir=str(root), class_list=str(class_list),
                         image_size=32)
    dataset = data.open_dataset(config)
    batch = next(dataset.batches('test', batch_size=6, seed=0, train=False))
    assert batch['image'].shape == (6, 32, 32, 3) and batch['image'][0].max() > 0


def test_a_symbolic_link_that_loops_is_named(tmp_path, imagefolder):
    source, class_list = imagefolder
    root = copy_imagefolder(source, tmp_path / 'looped')
    os.symlink('loop', root / 'train' / 'loop')
    with pytest.raises(data.CorruptDatasetError,
                       match=rf'cannot follow {root / "train" / "loop"} \(Too many levels of '
                             r'symbolic links\); fix or remove it'):
        data.open_dataset(data_config(name='imagenet100', data_dir=str(root),
                                      class_list=str(class_list)))


def test_missing_data_raises_quickly_with_instructions(tmp_path):
    start = time.perf_counter()
    with pytest.raises(data.DatasetNotFoundError, match='apt-get install dataset-fashion-mnist'):
        data.get_info(data_config(data_dir=str(tmp_path / 'nowhere')))
    with pytest.raises(data.DatasetNotFoundError, match='tfds build imagenet2012'):
        data.make_iterator(data_config(name='imagenet100', data_dir=str(tmp_path / 'nowhere')),
                           'train', batch_size=8, seed=0, train=True)
    assert time.perf_counter() - start < 1
    with pytest.raises(data.DatasetNotFoundError, match='ImageFolder root'):
        data.get_info(data_config(name='imagenet100', data_dir=str(tmp_path)))
    with pytest.raises(data.DatasetNotFoundError, match='tfds build mnist'):
        data.get_info(data_config(name='mnist', data_dir=str(tmp_path)))
    assert os.listdir(tmp_path) == []


FASHION_MNIST_FILES = ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
                       't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')
TEST_IMAGES, TEST_LABELS = FASHION_MNIST_FILES[2:]


@pytest.fixture
def fashion_copy(tmp_path):
    """A data_dir of symlinks to the real Fashion-MNIST files; replace files with `replace`."""
    root = tmp_path / 'fashion'
    root.mkdir()
    for name in FASHION_MNIST_FILES:
        os.symlink(os.path.join(data.FASHION_MNIST_DIR, name), root / name)
    return root


def replace(path, content: bytes):
    """Writes `content` as a new file at `path`, never through the symlink to the real file."""
    path.unlink()
    path.write_bytes(content)


def real_idx(name: str) -> bytes:
    """The gunzipped content of a real Fashion-MNIST file (use the small label files)."""
    with gzip.open(os.path.join(data.FASHION_MNIST_DIR, name)) as f:
        return f.read()


def idx(dims: tuple[int, ...], values: np.ndarray) -> bytes:
    """An uncompressed uint8 idx file: magic number, big-endian dims, then `values`."""
    header = bytes((0, 0, 8, len(dims))) + np.asarray(dims, '>u4').tobytes()
    return header + np.asarray(values, np.uint8).tobytes()


def test_fashion_mnist_copy_opens(fashion_copy):
    replace(fashion_copy / TEST_LABELS, gzip.compress(real_idx(TEST_LABELS)))  # gzipped anew
    config = data_config(data_dir=str(fashion_copy))
    info = data.get_info(config)
    assert (info.num_train, info.num_test) == (60000, 10000)
    batch = next(data.make_iterator(config, 'test', batch_size=16, seed=0, train=False))
    np.testing.assert_array_equal(batch['label'], list(real_idx(TEST_LABELS)[8:24]))


@pytest.mark.parametrize('name, content, problem', [
    pytest.param('train-images-idx3-ubyte.gz',
                 lambda: gzip.compress(idx((60000, 28, 28), np.zeros((1000, 28, 28)))),
                 'header says 60,000 images but the file holds 1,000.', id='fewer-images'),
    pytest.param(TEST_LABELS, lambda: gzip.compress(real_idx(TEST_LABELS))[:2000],
                 'is truncated', id='truncated-gzip'),
    pytest.param(TEST_LABELS, lambda: real_idx(TEST_LABELS),
                 'is not a valid gzip file', id='not-gzip'),
    pytest.param(TEST_LABELS,
                 lambda: gzip.compress(idx((9999,), list(real_idx(TEST_LABELS)[8:-1]))),
                 f'header says 9,999 labels but {{data_dir}}/{TEST_IMAGES} has 10,000 images.',
                 id='fewer-labels-than-images'),
    pytest.param(TEST_LABELS, lambda: gzip.compress(real_idx(TEST_LABELS) + b'garbage'),
                 'header says 10,000 labels but the file holds 10,007.', id='trailing-data'),
    pytest.param('train-images-idx3-ubyte.gz',
                 lambda: gzip.compress(idx((60000, 28, 28), np.zeros(1000 * 28 * 28 - 5))),
                 'header says 60,000 images but the file holds 999 and 779 bytes more.',
                 id='partial-image'),
    pytest.param(TEST_LABELS, lambda: gzip.compress(idx((10000,), np.full(10000, 10))),
                 'holds label 10; labels are 0..9', id='label-out-of-range'),
    pytest.param(TEST_LABELS, lambda: gzip.compress(idx((10000, 1, 1), np.zeros(10000))),
                 'is not an idx file of labels: it starts with 00 00 08 03 instead of 00 00 08 01',
                 id='wrong-magic'),
    pytest.param(TEST_IMAGES, lambda: gzip.compress(idx((10000, 32, 32), [])),
                 'header says images of shape (32, 32); Fashion-MNIST has (28, 28)',
                 id='wrong-image-shape'),
])
def test_corrupt_fashion_mnist_file_is_named_when_opened(fashion_copy, name, content, problem):
    bad = fashion_copy / name
    replace(bad, content())
    with pytest.raises(data.CorruptDatasetError) as error:
        data.get_info(data_config(data_dir=str(fashion_copy)))
    message = str(error.value)
    assert f'Fashion-MNIST file {bad} ' in message
    assert problem.format(data_dir=fashion_copy) in message
    assert 'sudo apt-get install --reinstall dataset-fashion-mnist' in message
    assert 'config.data.data_dir' in message


def test_fashion_mnist_split_of_the_wrong_size(fashion_copy):
    for name, dims in ((TEST_IMAGES, (100, 28, 28)), (TEST_LABELS, (100,))):
        replace(fashion_copy / name, gzip.compress(idx(dims, np.zeros(dims))))
    with pytest.raises(data.CorruptDatasetError,
                       match='t10k-images-idx3-ubyte.gz header says 100 images; the test split '
                             'has 10,000'):
        data.get_info(data_config(data_dir=str(fashion_copy)))


def test_fashion_mnist_files_are_read_once_while_unchanged(fashion_copy, monkeypatch):
    labels = fashion_copy / TEST_LABELS
    replace(labels, gzip.compress(real_idx(TEST_LABELS)))
    config = data_config(data_dir=str(fashion_copy))
    data.get_info(config)

    def no_reading(*args, **kwargs):
        raise AssertionError(f'read again: {args}')

    with monkeypatch.context() as patch:
        patch.setattr(bundled.gzip, 'open', no_reading)
        data.get_info(config)
        for split in data.SPLITS:
            next(data.make_iterator(config, split, batch_size=8, seed=0, train=False))
    labels.write_bytes(gzip.compress(real_idx(TEST_LABELS))[:-10])  # a regular file now
    with pytest.raises(data.CorruptDatasetError, match='is truncated'):
        data.get_info(config)


@pytest.mark.parametrize('field, value, choices', [
    ('name', 'fashon_mnist', ['fashion_mnist', 'digits', 'imagefolder', 'imagenet100']),
    ('format', 'zip', ['auto', 'imagefolder', 'tfds']),
    ('channels', 2, ['None', '1', '3']),
])
def test_bad_config_values_list_the_choices(tmp_path, field, value, choices):
    config = data_config(data_dir=str(tmp_path), **{field: value})
    with pytest.raises(ValueError) as error:
        data.get_info(config)
    for choice in choices:
        assert choice in str(error.value)


def encode_jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format='JPEG', quality=90)
    return buffer.getvalue()


class QhnetTestImagenet(tfds.core.GeneratorBasedBuilder):
    """Variable-size photos labelled by wnid, as in imagenet2012, one label not in WNIDS."""
    VERSION = tfds.core.Version('1.0.0')
    LABELS = (WNIDS[2], 'n00000001', WNIDS[0], WNIDS[1])

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(names=self.LABELS),
        }))

    def _split_generators(self, dl_manager):
        return {'train': self._generate_examples(16), 'validation': self._generate_examples(8)}

    def _generate_examples(self, count):
        rng = np.random.default_rng(count)
        for i in range(count):
            photo = rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)
            yield i, {'image': encode_jpeg(photo), 'label': i % 4}


class QhnetTestDigits(tfds.core.GeneratorBasedBuilder):
    """Fixed-size 8x8 grayscale images."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1), encoding_format='png'),
            'label': tfds.features.ClassLabel(num_classes=10),
        }))

    def _split_generators(self, dl_manager):
        return {'train': self._generate_examples(0, 40), 'test': self._generate_examples(40, 50)}

    def _generate_examples(self, start, stop):
        for i in range(start, stop):
            buffer = io.BytesIO()
            Image.fromarray(np.full((8, 8), 20 * (i % 10), np.uint8)).save(buffer, format='PNG')
            yield i, {'image': buffer.getvalue(), 'label': i % 10}


def prepare(builder_class, data_dir):
    builder = builder_class(data_dir=str(data_dir), file_format='array_record')
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def test_tfds_imagenet100_filters_and_relabels(tmp_path, monkeypatch, imagefolder):
    _, class_list = imagefolder
    prepare(QhnetTestImagenet, tmp_path)
    monkeypatch.setattr(tfds_source, 'IMAGENET_TFDS_NAME', 'qhnet_test_imagenet')
    config = data_config(name='imagenet100', data_dir=str(tmp_path), class_list=str(class_list),
                         image_size=24, augment=True)
    info = data.get_info(config)
    assert (info.num_classes, info.num_train, info.num_test) == (3, 12, 6)
    assert list(tmp_path.glob('qhnet_test_imagenet/1.0.0/qhnet-labels-*.npy'))

    batch = next(data.make_iterator(config, 'test', batch_size=8, seed=0, train=False))
    assert batch['image'].shape == (8, 24, 24, 3)
    records = tfds.data_source('qhnet_test_imagenet', split='validation', data_dir=str(tmp_path),
                               download=False)
    wnids = [QhnetTestImagenet.LABELS[r['label']] for r in records]
    expected = [sorted(WNIDS).index(wnid) for wnid in wnids if wnid in WNIDS]
    np.testing.assert_array_equal(batch['label'][:6], expected)
    np.testing.assert_array_equal(batch['mask'], [1] * 6 + [0] * 2)

    train = take(data.make_iterator(config, 'train', batch_size=4, seed=0, train=True), 3)
    assert sorted(np.concatenate([b['label'] for b in train])) == [0] * 4 + [1] * 4 + [2] * 4


def test_tfds_dataset_by_name(tmp_path):
    prepare(QhnetTestDigits, tmp_path)
    config = data_config(name='qhnet_test_digits', data_dir=str(tmp_path), augment=True)
    info = data.get_info(config)
    assert (info.num_classes, info.num_train, info.num_test) == (10, 40, 10)
    assert info.image_shape == (8, 8, 1)
    batch = next(data.make_iterator(config, 'train', batch_size=8, seed=0, train=True))
    assert batch['image'].shape == (8, 8, 8, 1)
    evaluation = list(data.make_iterator(config, 'test', batch_size=8, seed=0, train=False))
    mask = np.concatenate([b['mask'] for b in evaluation]) == 1
    labels = np.concatenate([b['label'] for b in evaluation])[mask]
    images = np.concatenate([b['image'] for b in evaluation])[mask]
    np.testing.assert_array_equal(np.sort(labels), np.arange(10))
    # Each test image is uniformly 20 * label.
    expected = (20 * labels / 255 - core.IMAGENET_GRAY_MEAN[0]) / core.IMAGENET_GRAY_STD[0]
    normalised = data.normalise(images, info)
    np.testing.assert_allclose(normalised.mean(axis=(1, 2, 3)), expected, atol=0.05)


@pytest.mark.parametrize('sixteen_bit', [False, True])
def test_grayscale_imagefolder_of_pngs(tmp_path, sixteen_bit):
    root, written = grayscale_imagefolder(tmp_path / 'gray', sixteen_bit=sixteen_bit)
    if sixteen_bit:
        with Image.open(written['val'][0][0]) as image:
            assert image.mode.startswith('I')  # really 16-bit
    config = data_config(name='imagefolder', data_dir=str(root), image_size=28)
    dataset = data.open_dataset(config)
    info = dataset.info
    assert info.class_names == tuple(f'class_{c}' for c in range(10))
    assert (info.num_classes, info.num_train, info.num_test) == (10, 40, 20)
    assert info.image_shape == (28, 28, 1) and info.mean == core.IMAGENET_GRAY_MEAN
    batch = next(dataset.batches('test', batch_size=20, seed=0, train=False))
    # An image already 28x28 is used as it is: the pixels come back exactly (16-bit: scaled).
    np.testing.assert_array_equal(batch['image'][..., 0],
                                  np.stack([image for _, image in written['val']]))
    np.testing.assert_array_equal(batch['label'], np.repeat(np.arange(10), 2))


def test_imagefolder_class_folder_mismatch_names_the_folders(tmp_path):
    root, _ = grayscale_imagefolder(tmp_path / 'gray', per_class=1)
    (root / 'val' / 'class_3').rename(root / 'val' / 'coat')
    with pytest.raises(data.DatasetNotFoundError) as error:
        data.open_dataset(data_config(name='imagefolder', data_dir=str(root)))
    assert 'coat' in str(error.value) and 'train/ lacks' in str(error.value)
    (root / 'val' / 'coat').rename(root / 'val' / 'class_3')
    shutil.rmtree(root / 'val' / 'class_7')
    with pytest.raises(data.DatasetNotFoundError, match=r'1 class folders are missing.*val/class_7'):
        data.open_dataset(data_config(name='imagefolder', data_dir=str(root)))


def bilinear_sample(image: np.ndarray, box, size: int) -> np.ndarray:
    """The integer `box` of `image` [H, W, C] sampled at size x size pixel centres, each
    interpolated linearly from its 2x2 neighbours (edges replicated), in float64."""
    left, top, right, bottom = (int(round(value)) for value in box)
    crop = image[top:bottom, left:right].astype(np.float64)

    def taps(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        centre = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, n_in - 1)
        low = np.floor(centre).astype(int)
        return low, np.minimum(low + 1, n_in - 1), centre - low

    y0, y1, fy = taps(crop.shape[0])
    x0, x1, fx = taps(crop.shape[1])
    rows = crop[y0] * (1 - fy)[:, None, None] + crop[y1] * fy[:, None, None]
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


def test_imagefolder_crops_are_bilinear_samples_of_the_decoded_image(imagefolder):
    root, _ = imagefolder
    config = data_config(name='imagefolder', data_dir=str(root), image_size=16)
    dataset = data.open_dataset(config)
    assert dataset.info.num_classes == 4 and dataset.info.image_shape == (16, 16, 3)
    batch = next(dataset.batches('test', batch_size=8, seed=0, train=False))
    paths = [dataset._split('test').describe(i) for i in range(8)]
    for path, pixels in zip(paths, batch['image']):
        with Image.open(path) as image:
            full = np.asarray(image.convert('RGB'))
        box = transforms.central_crop_box(full.shape[1], full.shape[0], 16)
        reference = bilinear_sample(full, box, 16)
        assert np.abs(reference - pixels).max() <= 2  # OpenCV's fixed-point weights


@pytest.mark.parametrize('mode', ['RGB', 'L', 'CMYK'])
def test_jpeg_decoding_agrees_with_pil(digits, mode):
    """libjpeg-turbo (simplejpeg) decodes every JPEG colour space as PIL does, into RGB and
    into grayscale; PNGs are PIL's."""
    photo = Image.fromarray(fake_photo(digits[0][3, ..., 0], 64, 48, tint=3)).convert(mode)
    for image_format in ('JPEG', 'PNG') if mode != 'CMYK' else ('JPEG',):
        encoded = io.BytesIO()
        photo.save(encoded, format=image_format, quality=90)
        for channels, target in ((3, 'RGB'), (1, 'L')):
            pixels = transforms.decode_pixels(encoded.getvalue(), channels)
            with Image.open(io.BytesIO(encoded.getvalue())) as image:
                reference = np.asarray(image.convert(target), np.float64)
            assert pixels.shape == (48, 64, channels) and pixels.dtype == np.uint8
            assert np.abs(pixels.reshape(reference.shape) - reference).mean() < 1.5


def test_stream_does_not_depend_on_the_number_of_workers(imagefolder):
    root, class_list = imagefolder
    config = dict(name='imagenet100', data_dir=str(root), class_list=str(class_list),
                  image_size=24, augment=True, rand_augment=True, erasing=0.4)
    streams = [take(data.open_dataset(data_config(num_workers=workers, **config)).batches(
        'train', batch_size=4, seed=3, train=True, start_step=start), 4 - start)
        for workers, start in ((0, 0), (2, 0), (2, 1))]
    assert_same_batches(streams[0], streams[1])
    assert_same_batches(streams[0][1:], streams[2])
    assert streams[0][0]['erase'].shape == (4, 3, 4)


def test_rand_augment_and_erasing_are_switches_of_the_training_split(digits):
    plain, augmented = (next(data.make_iterator(
        data_config(name='digits', image_size=16, rand_augment=switch, erasing=0.4 * switch),
        'train', batch_size=256, seed=0, train=True)) for switch in (False, True))
    assert 'erase' not in plain and augmented['erase'].shape == (256, 3, 4)
    np.testing.assert_array_equal(plain['label'], augmented['label'])
    changed = np.any(plain['image'] != augmented['image'], axis=(1, 2, 3)).mean()
    assert 0.5 < changed < 1  # each of 2 ops applied with probability 0.5; some are no-ops
    erased = np.any(augmented['erase'][..., 2:] > 0, axis=(1, 2)).mean()
    assert 0.25 < erased < 0.55
    evaluation = next(data.make_iterator(
        data_config(name='digits', image_size=16, rand_augment=True, erasing=0.4), 'test',
        batch_size=64, seed=0, train=False))
    assert 'erase' not in evaluation


# Three classes with WordNet-like names, written out of sorted order.
PHOTO_CLASSES = ('n04254680', 'n01440764', 'n02102040')
# Crops (top, left, height, width) of scikit-learn's two 427x640 sample photos: wide, tall,
# square, smaller than the 256 resize (upscaled), odd sizes.
PHOTO_CROPS = ((0, 0, 427, 640), (20, 100, 400, 260), (50, 50, 300, 300), (100, 200, 150, 220),
               (7, 3, 257, 411), (0, 10, 427, 333), (31, 77, 389, 263), (60, 120, 240, 500),
               (5, 5, 333, 250))


def sample_photo_folder(root):
    """train/ (1 JPEG a class) and val/ (2 a class) of real photos: crops of scikit-learn's
    sample images of different sizes and aspect ratios. Returns the val paths in label order."""
    photos = load_sample_images().images
    val_paths, crops = [], iter(enumerate(PHOTO_CROPS))
    for wnid in PHOTO_CLASSES:
        for split, count in (('train', 1), ('val', 2)):
            os.makedirs(root / split / wnid)
            for k in range(count):
                i, (top, left, height, width) = next(crops)
                path = root / split / wnid / f'{wnid}_{k}.JPEG'
                write_jpeg(path, photos[i % 2][top:top + height, left:left + width])
                if split == 'val':
                    val_paths.append((wnid, path))
    return [path for _, path in sorted(val_paths)]


def timm_evaluation(path) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's Resize(256) (bilinear, the shorter side) and CenterCrop(224), ToTensor and
    Normalize with ImageNet's statistics, in Pillow and numpy: (uint8, float32) [224, 224, 3]."""
    with Image.open(path) as image:
        image = image.convert('RGB')
    width, height = image.size
    size = (256, int(256 * height / width)) if width <= height else (int(256 * width / height), 256)
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = round((size[0] - 224) / 2), round((size[1] - 224) / 2)
    pixels = np.asarray(image.crop((left, top, left + 224, top + 224)))
    mean, std = np.float32([0.485, 0.456, 0.406]), np.float32([0.229, 0.224, 0.225])
    return pixels, (pixels.astype(np.float32) / 255 - mean) / std


def test_imagenet1k_variant_reads_every_class_folder_with_timms_evaluation_transform(tmp_path):
    val_paths = sample_photo_folder(tmp_path)
    config = qhnet_config.get_config('imagenet1k')
    config.data.update(data_dir=str(tmp_path), num_workers=0)
    dataset = data.open_dataset(config.data)
    info = dataset.info
    assert (info.name, info.class_names) == ('imagenet1k', tuple(sorted(PHOTO_CLASSES)))
    assert (info.num_classes, info.num_train, info.num_test) == (3, 3, 6)
    assert info.image_shape == (224, 224, 3)
    batch = next(dataset.batches('test', batch_size=6, seed=0, train=False))
    np.testing.assert_array_equal(batch['label'], [0, 0, 1, 1, 2, 2])
    normalised = data.normalise(batch['image'], info)
    for path, pixels, image in zip(val_paths, batch['image'], normalised):
        reference_pixels, reference = timm_evaluation(path)
        # The same decoder (libjpeg-turbo) and PIL's resize: the same pixels; normalisation's
        # float32 arithmetic differs in the last bits only.
        np.testing.assert_array_equal(pixels, reference_pixels)
        np.testing.assert_allclose(image, reference, rtol=0, atol=1e-5)
    train = next(dataset.batches('train', batch_size=3, seed=0, train=True))
    assert train['image'].shape == (3, 224, 224, 3) and train['erase'].shape == (3, 3, 4)


def test_imagenet1k_without_data_names_the_dataset_and_the_fix(tmp_path):
    config = qhnet_config.get_config('imagenet1k')
    for data_dir in (None, str(tmp_path / 'nowhere'), str(tmp_path)):
        config.data.data_dir = data_dir
        with pytest.raises(data.DatasetNotFoundError,
                           match=r'imagenet1k data_dir .* needs train/ and val/ folders\. Pass '
                                 r'--config\.data\.data_dir=DIR, an ImageNet-1k ImageFolder root'):
            data.open_dataset(config.data)
    assert os.listdir(tmp_path) == []
