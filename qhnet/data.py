"""Input pipelines: Fashion-MNIST, digits, ImageNet-100 and prepared TFDS datasets.

`get_info(config.data)` describes a dataset cheaply and checks that it is there;
`make_iterator(config.data, split, ...)` streams batches of
`{'image': float32 [B, H, W, C], 'label': int32 [B]}`, plus `'mask'` on eval.

Datasets, by `config.data.name`:

* `fashion_mnist`: the four idx files in `data_dir` (default
  /usr/share/datasets/fashion-mnist, Debian package `dataset-fashion-mnist`),
  held in memory: 60,000 train and 10,000 test images, 28x28x1.
* `digits`: scikit-learn's bundled 8x8 digits (1,797 images, nothing to
  download); the first 1,500 are the train split and the last 297 the test split.
* `imagenet100`: the 100 ImageNet classes of CMC (Tian, Krishnan and Isola,
  "Contrastive Multiview Coding", 2019; the list published as imagenet100.txt in
  github.com/HobbitLong/CMC, packaged here as qhnet/imagenet100.txt), read from an
  ImageFolder tree (`train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG`) or from a TFDS
  `imagenet2012` prepared as array_record. Class i is the i-th wnid in sorted order.
* any other name: a TFDS dataset with `image` and `label` features, prepared in
  `data_dir` as array_record (read with `tfds.data_source`, no TensorFlow).

Nothing is ever downloaded: missing data raises `DatasetNotFoundError` with setup
instructions. Fashion-MNIST's files are read and checked when the dataset is
opened (once per process while they are unchanged); a damaged one raises
`CorruptDatasetError` naming it and saying how to replace it. An image that
cannot be decoded raises `CorruptImageError` naming its file (or TFDS record)
instead of being skipped, so a stream never changes silently.

Training streams depend only on (seed, step): epoch e is the permutation of the
split drawn from (seed, e), the global batch at step k holds positions
k*G .. k*G+G-1 of the stream (G = batch_size * process_count, remainders dropped),
process p takes rows p*batch_size onwards, and each example's augmentation is
drawn from (seed, its position). So `start_step` resumes bit for bit, and the
global stream does not depend on the process count.

Augmentation (`augment`, train split only): ImageNet-style datasets get a
random-resized crop (scale 0.08-1, ratio 3/4-4/3) and a horizontal flip;
Fashion-MNIST and other fixed-size TFDS datasets a random crop after reflect
padding (2 pixels at 28x28; 1/8 of the side for others) and a horizontal flip;
digits none. Without it, ImageNet-style images are resized so that the shorter
side is image_size / 0.875 and centre-cropped.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import gzip
import io
import math
import os
from typing import Callable, Iterator
import zlib

from absl import logging
import numpy as np
from PIL import Image

from qhnet import config

NAMES = ('fashion_mnist', 'digits', 'imagenet100')
FORMATS = ('auto', 'imagefolder', 'tfds')
SPLITS = ('train', 'test')

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
IMAGENET100_CLASSES = os.path.join(os.path.dirname(__file__), 'imagenet100.txt')

_FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
_FASHION_MNIST_SIZES = {'train': 60000, 'test': 10000}
_FASHION_MNIST_IMAGE_SHAPE = (28, 28)
_FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                          'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
_DIGITS_NUM_TRAIN = 1500
_IMAGENET_TFDS_NAME = 'imagenet2012'
_IMAGEFOLDER_DIRS = {'train': 'train', 'test': 'val'}
_IMAGE_SUFFIXES = ('.jpeg', '.jpg', '.png')

# Pixel statistics in [0, 1] units: ImageNet's usual ones; Fashion-MNIST and
# digits computed over their train splits.
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_IMAGENET_GRAY_MEAN, _IMAGENET_GRAY_STD = (0.449,), (0.226,)
_FASHION_MNIST_MEAN, _FASHION_MNIST_STD = (0.2860,), (0.3530,)
_DIGITS_MEAN, _DIGITS_STD = (0.3052,), (0.3749,)

_DEFAULT_IMAGE_SIZE = 224
_CENTRAL_CROP_FRACTION = 0.875
_CROP_SCALE = (0.08, 1.0)
_CROP_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
_PREFETCH_BATCHES = 2
# Tags that keep the random streams of shuffling and of augmentation apart.
_SHUFFLE_STREAM, _AUGMENT_STREAM = 0, 1

_FASHION_MNIST_SETUP = (
    'Install it with `sudo apt-get install dataset-fashion-mnist` (files land in '
    f'{FASHION_MNIST_DIR}), or put the four files '
    f'{sorted(sum(_FASHION_MNIST_FILES.values(), ()))} from '
    'https://github.com/zalandoresearch/fashion-mnist in config.data.data_dir.')
_FASHION_MNIST_REPAIR = (
    'Reinstall the dataset with `sudo apt-get install --reinstall dataset-fashion-mnist`, or point '
    'config.data.data_dir at a good copy of the four files.')
# idx files: magic number 00 00 <dtype> <ndim>, then ndim big-endian uint32 dims, then the data.
_IDX_UINT8 = 0x08
_IMAGENET_SETUP = (
    'Set config.data.data_dir to either\n'
    '  (a) an ImageFolder root: <data_dir>/train/<wnid>/*.JPEG and <data_dir>/val/<wnid>/*.JPEG '
    '(the ILSVRC2012 validation images sorted into class folders), with a folder for every '
    'wnid in the class list (qhnet/imagenet100.txt); or\n'
    '  (b) a TFDS data_dir holding imagenet2012 prepared as array_record: put '
    'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org) in <manual_dir> and '
    'run once `tfds build imagenet2012 --data_dir=<data_dir> --manual_dir=<manual_dir> '
    '--file_format=array_record` (building may need TensorFlow; reading it here does not).')


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where the config says; the message says how to set them up."""


class CorruptDatasetError(ValueError):
    """A dataset file is damaged or not what it should be; the message names it and the fix."""


class CorruptImageError(ValueError):
    """An image could not be decoded; the message names its file or record."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and a training loop need to know about a dataset."""
    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # (H, W, C) of the batches' images
    num_train: int
    num_test: int
    class_names: tuple[str, ...]


def get_info(data_config) -> DatasetInfo:
    """Checks `data_config` and that the data is present.

    Reads no image, except Fashion-MNIST's files, which are read and checked here (see
    `_read_fashion_mnist`) and kept for `make_iterator`.
    """
    return _open(_read_settings(data_config)).info


def make_iterator(data_config, split: str, *, batch_size: int, seed: int, train: bool,
                  start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `split` ('train' or 'test') for this process; see the module docstring.

    train=True: an endless stream (shuffled every epoch, remainders dropped,
    augmented if `augment` and split is train), starting after `start_step` batches already
    consumed.
    train=False: one pass in order; the last batch is padded to `batch_size` and
    every batch has a float32 `mask` (1 for real examples, 0 for padding).
    """
    if split not in SPLITS:
        raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
    if batch_size < 1 or process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f'need batch_size >= 1 and 0 <= process_index < process_count, got '
                         f'{batch_size=}, {process_index=}, {process_count=}')
    if seed < 0 or start_step < 0:
        raise ValueError(f'seed and start_step must be non-negative, got {seed=}, {start_step=}')
    settings = _read_settings(data_config)
    dataset = _open(settings)
    examples = dataset.load(split)
    if train:
        plan = _train_plan(examples.size, batch_size, process_index, process_count, seed,
                           start_step)
    else:
        plan = _eval_plan(examples.size, batch_size, process_index, process_count)
    pipeline = _Pipeline(dataset, seed, augment=train and split == 'train' and settings.augment,
                         image_size=dataset.info.image_shape[0],
                         channels=dataset.info.image_shape[2])
    if isinstance(examples, _ArraySplit):
        return (pipeline.array_batch(examples, batch) for batch in plan)
    return pipeline.record_batches(examples, plan, settings.num_workers)


# Configuration.

@dataclasses.dataclass(frozen=True)
class _Settings:
    """The `config.data` fields, checked."""
    name: str
    data_dir: str | None
    format: str
    image_size: int | None
    channels: int | None
    augment: bool
    num_workers: int
    class_list: str | None


def _read_settings(data_config) -> _Settings:
    config.check_section(data_config, config.data_config(), 'config.data')
    name = data_config.name
    if not isinstance(name, str) or not name or ':' in name:
        raise ValueError(f'config.data.name must be one of {NAMES} or the name of a prepared TFDS '
                         f'dataset, got {name!r}')
    data_format = data_config.format
    if data_format not in FORMATS:
        raise ValueError(f'config.data.format must be one of {FORMATS}, got {data_format!r}')
    image_size = data_config.image_size
    if image_size is not None and (not isinstance(image_size, (int, np.integer))
                                   or image_size < 1):
        raise ValueError(f'config.data.image_size must be None or a positive int, '
                         f'got {image_size!r}')
    channels = data_config.channels
    if channels not in (None, 1, 3):
        raise ValueError(f'config.data.channels must be one of (None, 1, 3), got {channels!r}')
    num_workers = data_config.num_workers
    if not isinstance(num_workers, (int, np.integer)) or num_workers < 1:
        raise ValueError(f'config.data.num_workers must be a positive int, got {num_workers!r}')
    data_dir = data_config.data_dir
    class_list = data_config.class_list
    return _Settings(name=name, data_dir=None if data_dir is None else os.fspath(data_dir),
                     format=data_format, image_size=None if image_size is None else int(image_size),
                     channels=channels, augment=bool(data_config.augment),
                     num_workers=int(num_workers),
                     class_list=None if class_list is None else os.fspath(class_list))


# Datasets.

@dataclasses.dataclass(frozen=True)
class _ArraySplit:
    """A split held in memory at the output size."""
    images: np.ndarray  # uint8 [N, S, S, native channels]
    labels: np.ndarray  # int32 [N]

    @property
    def size(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class _RecordSplit:
    """A split of encoded images read one at a time (files or TFDS records)."""
    size: int
    read: Callable[[int], tuple[bytes, int]]  # index -> (encoded image, label)
    describe: Callable[[int], str]  # index -> where it comes from, for error messages


@dataclasses.dataclass(frozen=True)
class _Dataset:
    """An opened dataset: its description, how to load a split, how to transform images."""
    info: DatasetInfo
    load: Callable[[str], _ArraySplit | _RecordSplit]
    mean: tuple[float, ...]  # per native channel, pixels in [0, 1]
    std: tuple[float, ...]
    native_channels: int
    # True for photos of varying sizes (random-resized crops in training, central
    # crops otherwise); False for fixed-size images, resized to image_size if needed.
    variable_size: bool
    # Reflect padding of the random crop of fixed-size datasets; 0 means no augmentation.
    crop_padding: int


def _open(settings: _Settings) -> _Dataset:
    if settings.name == 'fashion_mnist':
        return _open_fashion_mnist(settings)
    if settings.name == 'digits':
        return _open_digits(settings)
    if settings.name == 'imagenet100':
        return _open_imagenet100(settings)
    return _open_tfds(settings)


def _output_shape(settings: _Settings, native_size: int,
                  native_channels: int) -> tuple[int, int, int]:
    if settings.channels == 1 and native_channels == 3:
        raise ValueError(f'config.data.channels=1 needs a grayscale dataset; '
                         f'{settings.name} is RGB')
    size = settings.image_size or native_size
    return size, size, settings.channels or native_channels


def _open_fashion_mnist(settings: _Settings) -> _Dataset:
    data_dir = settings.data_dir or FASHION_MNIST_DIR
    paths = {split: [os.path.join(data_dir, f) for f in files]
             for split, files in _FASHION_MNIST_FILES.items()}
    missing = [p for ps in paths.values() for p in ps if not os.path.isfile(p)]
    if missing:
        raise DatasetNotFoundError(f'Fashion-MNIST is missing {missing}. {_FASHION_MNIST_SETUP}')
    shape = _output_shape(settings, 28, 1)
    splits = {split: _read_fashion_mnist(split, *paths[split]) for split in SPLITS}

    def load(split: str) -> _ArraySplit:
        images, labels = splits[split]
        logging.info('fashion_mnist %s: %s images in memory from %s', split,
                     f'{len(labels):,}', data_dir)
        return _ArraySplit(_resize_all(images, shape[0]), labels)

    info = DatasetInfo('fashion_mnist', 10, shape, len(splits['train'][1]),
                       len(splits['test'][1]), _FASHION_MNIST_CLASSES)
    return _Dataset(info, load, _FASHION_MNIST_MEAN, _FASHION_MNIST_STD, native_channels=1,
                    variable_size=False, crop_padding=max(1, round(2 * shape[0] / 28)))


def _read_fashion_mnist(split: str, images_path: str,
                        labels_path: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's uint8 [N, 28, 28, 1] images and int32 [N] labels, read-only.

    Checks each file as `_read_idx` does, and that both hold the split's number of
    examples (60,000 train, 10,000 test) and the labels are class indices (0..9).
    """
    images = _read_idx(images_path, _FASHION_MNIST_IMAGE_SHAPE)
    labels = _read_idx(labels_path, ())
    if len(labels) != len(images):
        raise _corrupt_fashion_mnist(labels_path, f'header says {len(labels):,} labels but '
                                     f'{images_path} has {len(images):,} images')
    if len(images) != _FASHION_MNIST_SIZES[split]:
        raise _corrupt_fashion_mnist(images_path, f'header says {len(images):,} images; the '
                                     f'{split} split has {_FASHION_MNIST_SIZES[split]:,}')
    if labels.max() >= len(_FASHION_MNIST_CLASSES):
        raise _corrupt_fashion_mnist(labels_path, f'holds label {labels.max()}; labels are '
                                     f'0..{len(_FASHION_MNIST_CLASSES) - 1}')
    labels = labels.astype(np.int32)
    labels.flags.writeable = False
    return images[..., None], labels


def _read_idx(path: str, item_shape: tuple[int, ...]) -> np.ndarray:
    """The uint8 array [N, *item_shape] in an idx.gz file, read-only.

    Read once per process while the file is unchanged: cached by real path (errors name
    it), mtime and size.
    """
    stat = os.stat(path)
    return _read_idx_cached(os.path.realpath(path), stat.st_mtime_ns, stat.st_size, item_shape)


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: str, mtime_ns: int, size: int,
                     item_shape: tuple[int, ...]) -> np.ndarray:
    """Reads and checks an idx.gz file; mtime_ns and size only key the cache.

    Checks that the file is complete gzip, that its magic number says uint8 with
    1 + len(item_shape) dims, that the header's dims after the first are item_shape, and
    that the data after the header is exactly as long as the header says.
    """
    del mtime_ns, size
    noun = 'images' if item_shape else 'labels'
    try:
        with gzip.open(path, 'rb') as f:
            content = f.read()
    except EOFError as e:
        raise _corrupt_fashion_mnist(path, f'is truncated ({e})') from e
    except (gzip.BadGzipFile, zlib.error) as e:
        raise _corrupt_fashion_mnist(path, f'is not a valid gzip file ({e})') from e
    ndim = 1 + len(item_shape)
    magic = bytes((0, 0, _IDX_UINT8, ndim))
    header_size = 4 + 4 * ndim
    if content[:4] != magic:
        raise _corrupt_fashion_mnist(
            path, f'is not an idx file of {noun}: it starts with '
            f'{content[:4].hex(" ") or "nothing"} instead of {magic.hex(" ")}')
    if len(content) < header_size:
        raise _corrupt_fashion_mnist(path, f'ends inside its {header_size}-byte header')
    dims = tuple(int.from_bytes(content[4 * i:4 * i + 4], 'big') for i in range(1, ndim + 1))
    if dims[1:] != item_shape:
        raise _corrupt_fashion_mnist(
            path, f'header says {noun} of shape {dims[1:]}; Fashion-MNIST has {item_shape}')
    count, extra_bytes = divmod(len(content) - header_size, math.prod(item_shape))
    if (count, extra_bytes) != (dims[0], 0):
        held = f'{count:,}' + (f' and {extra_bytes:,} bytes more' if extra_bytes else '')
        raise _corrupt_fashion_mnist(
            path, f'header says {dims[0]:,} {noun} but the file holds {held}')
    return np.frombuffer(content, np.uint8, offset=header_size).reshape(dims)


def _corrupt_fashion_mnist(path: str, problem: str) -> CorruptDatasetError:
    return CorruptDatasetError(f'Fashion-MNIST file {path} {problem}. {_FASHION_MNIST_REPAIR}')


def _open_digits(settings: _Settings) -> _Dataset:
    shape = _output_shape(settings, 8, 1)
    num_test = 1797 - _DIGITS_NUM_TRAIN

    def load(split: str) -> _ArraySplit:
        images, labels = _read_digits()
        part = slice(0, _DIGITS_NUM_TRAIN) if split == 'train' else slice(_DIGITS_NUM_TRAIN, None)
        logging.info('digits %s: %d images in memory (scikit-learn)', split, len(labels[part]))
        return _ArraySplit(_resize_all(images[part], shape[0]), labels[part])

    info = DatasetInfo('digits', 10, shape, _DIGITS_NUM_TRAIN, num_test,
                       tuple(str(d) for d in range(10)))
    return _Dataset(info, load, _DIGITS_MEAN, _DIGITS_STD, native_channels=1,
                    variable_size=False, crop_padding=0)


@functools.lru_cache(maxsize=1)
def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as uint8 [N, 8, 8, 1] (0..16 scaled to 0..255) and labels."""
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    bunch = load_digits()
    images = np.round(bunch.images * (255 / 16)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int32)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def _resize_all(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of grayscale uint8 [N, H, W, 1] images to size x size, if not already."""
    if images.shape[1:3] == (size, size):
        return images
    resized = [np.asarray(Image.fromarray(image[..., 0]).resize((size, size), Image.BILINEAR))
               for image in images]
    return np.stack(resized)[..., None]


def _read_class_list(settings: _Settings) -> tuple[str, ...]:
    """The wnids of `class_list` (default: the packaged ImageNet-100 list), sorted."""
    path = settings.class_list or IMAGENET100_CLASSES
    try:
        with open(path) as f:
            wnids = [line.strip() for line in f if line.strip()]
    except FileNotFoundError as e:
        raise DatasetNotFoundError(f'class list {path} not found (config.data.class_list)') from e
    if not wnids or len(set(wnids)) != len(wnids):
        raise ValueError(f'class list {path} must hold distinct wnids, one a line')
    return tuple(sorted(wnids))


def _open_imagenet100(settings: _Settings) -> _Dataset:
    data_dir = settings.data_dir
    if not data_dir or not os.path.isdir(data_dir):
        raise DatasetNotFoundError(f'ImageNet-100 data_dir {data_dir!r} does not exist. '
                                   f'{_IMAGENET_SETUP}')
    class_names = _read_class_list(settings)
    data_format = settings.format
    if data_format == 'auto':
        data_format = 'imagefolder' if os.path.isdir(os.path.join(data_dir, 'train')) else 'tfds'
    if data_format == 'imagefolder':
        splits = _list_imagefolder(data_dir, class_names)
    else:
        splits = _filter_tfds_imagenet(settings, class_names)
    counts = {split: examples.size for split, examples in splits.items()}
    shape = _output_shape(settings, _DEFAULT_IMAGE_SIZE, 3)
    info = DatasetInfo('imagenet100', len(class_names), shape, counts['train'], counts['test'],
                       class_names)
    return _Dataset(info, splits.__getitem__, _IMAGENET_MEAN, _IMAGENET_STD, native_channels=3,
                    variable_size=True, crop_padding=0)


def _list_imagefolder(root: str, class_names: tuple[str, ...]) -> dict[str, _RecordSplit]:
    """The image files of each split under `root`, labelled by their folder's class index."""
    missing = [os.path.join(folder, wnid) for folder in _IMAGEFOLDER_DIRS.values()
               for wnid in class_names if not os.path.isdir(os.path.join(root, folder, wnid))]
    if missing:
        raise DatasetNotFoundError(
            f'{len(missing)} class folders are missing under {root}: {" ".join(missing)}. '
            f'{_IMAGENET_SETUP}')
    splits = {}
    for split, folder in _IMAGEFOLDER_DIRS.items():
        paths, labels = [], []
        for label, wnid in enumerate(class_names):
            class_dir = os.path.join(root, folder, wnid)
            names = sorted(entry.name for entry in os.scandir(class_dir)
                           if entry.is_file() and not entry.name.startswith('.')
                           and entry.name.lower().endswith(_IMAGE_SUFFIXES))
            if not names:
                raise DatasetNotFoundError(f'no images in {class_dir}. {_IMAGENET_SETUP}')
            paths += [os.path.join(class_dir, name) for name in names]
            labels += [label] * len(names)
        logging.info('imagenet100 %s: found %s images in %d classes under %s', split,
                     f'{len(paths):,}', len(class_names), os.path.join(root, folder))
        splits[split] = _file_split(paths, np.asarray(labels, np.int32))
    return splits


def _file_split(paths: list[str], labels: np.ndarray) -> _RecordSplit:
    def read(index: int) -> tuple[bytes, int]:
        with open(paths[index], 'rb') as f:
            return f.read(), int(labels[index])

    return _RecordSplit(len(paths), read, paths.__getitem__)


def _import_tfds():
    try:
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise ImportError('reading TFDS datasets needs `pip install tensorflow-datasets` '
                          '(TensorFlow itself is not needed)') from e
    return tfds


def _tfds_builder(name: str, data_dir: str | None, setup: str):
    """The builder of a TFDS dataset prepared for random access in `data_dir`."""
    tfds = _import_tfds()
    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except tfds.core.DatasetNotFoundError as e:
        raise ValueError(
            f'unknown dataset {name!r}: config.data.name must be one of {NAMES} or a TFDS '
            f'dataset registered or prepared in data_dir={data_dir!r}') from e
    if not builder.is_prepared():
        raise DatasetNotFoundError(f'TFDS dataset {name} is not prepared in {builder.data_dir}. '
                                   f'{setup}')
    if builder.info.file_format not in tfds.core.FileFormat.with_random_access():
        raise DatasetNotFoundError(
            f'TFDS dataset {name} in {builder.data_dir} is stored as '
            f'{builder.info.file_format.value}, which needs TensorFlow to read. Rebuild it with '
            f'--file_format=array_record. {setup}')
    return builder


def _tfds_split_name(builder, split: str) -> str:
    candidates = ('train',) if split == 'train' else ('test', 'validation')
    for candidate in candidates:
        if candidate in builder.info.splits:
            return candidate
    raise ValueError(f'TFDS dataset {builder.name} has splits {sorted(builder.info.splits)}, '
                     f'none of {candidates}')


def _tfds_source(builder, split: str):
    """Random access to a prepared TFDS split (what `tfds.data_source` returns), images encoded."""
    tfds = _import_tfds()
    return builder.as_data_source(split=split, decoders={'image': tfds.decode.SkipDecoding()})


def _tfds_record_split(name: str, source, split: str, indices: np.ndarray | None = None,
                       labels: np.ndarray | None = None) -> _RecordSplit:
    """Records of `source` (those at `indices`, relabelled `labels`, if given)."""
    def read(index: int) -> tuple[bytes, int]:
        if indices is None:
            record = source[index]
            return record['image'], int(record['label'])
        return source[int(indices[index])]['image'], int(labels[index])

    def describe(index: int) -> str:
        record = index if indices is None else int(indices[index])
        return f'TFDS {name} {split} record {record}'

    return _RecordSplit(len(source) if indices is None else len(indices), read, describe)


def _filter_tfds_imagenet(settings: _Settings,
                          class_names: tuple[str, ...]) -> dict[str, _RecordSplit]:
    """The records of TFDS imagenet2012 in `class_names`, relabelled by their index there."""
    builder = _tfds_builder(_IMAGENET_TFDS_NAME, settings.data_dir, _IMAGENET_SETUP)
    all_wnids = builder.info.features['label'].names
    unknown = sorted(set(class_names) - set(all_wnids))
    if unknown:
        raise ValueError(f'wnids not in {_IMAGENET_TFDS_NAME}: {unknown}')
    relabel = np.full(len(all_wnids), -1, np.int32)
    relabel[[all_wnids.index(wnid) for wnid in class_names]] = np.arange(len(class_names))
    splits = {}
    for split in SPLITS:
        tfds_split = _tfds_split_name(builder, split)
        source = _tfds_source(builder, tfds_split)
        labels = relabel[_tfds_labels(source, builder.data_dir, tfds_split, settings.num_workers)]
        indices = np.flatnonzero(labels >= 0)
        logging.info('imagenet100 %s: found %s images in %d classes in TFDS %s/%s', split,
                     f'{len(indices):,}', len(class_names), builder.data_dir, tfds_split)
        splits[split] = _tfds_record_split(_IMAGENET_TFDS_NAME, source, tfds_split,
                                           indices, labels[indices])
    return splits


def _tfds_labels(source, builder_dir: str, split: str, num_workers: int) -> np.ndarray:
    """The label of every record, read once and cached next to the dataset."""
    cache = os.path.join(builder_dir, f'qhnet-labels-{split}.npy')
    if os.path.isfile(cache):
        labels = np.load(cache)
        if len(labels) == len(source):
            return labels
    logging.info('reading the labels of %s %s records (once; cached in %s)',
                 f'{len(source):,}', split, cache)
    def read_labels(start: int) -> list[int]:
        stop = min(start + 4096, len(source))
        return [int(record['label']) for record in source.__getitems__(list(range(start, stop)))]

    with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
        parts = pool.map(read_labels, range(0, len(source), 4096))
        labels = np.fromiter((label for part in parts for label in part), np.int32, len(source))
    try:
        np.save(cache + '.tmp.npy', labels)
        os.replace(cache + '.tmp.npy', cache)
    except OSError as e:
        logging.warning('could not cache the labels in %s: %s', cache, e)
    return labels


def _open_tfds(settings: _Settings) -> _Dataset:
    name = settings.name
    setup = (f'Prepare it once with `tfds build {name} '
             f'--data_dir={settings.data_dir or "<data_dir>"} --file_format=array_record` '
             '(building may need TensorFlow; reading it here does not).')
    builder = _tfds_builder(name, settings.data_dir, setup)
    features = builder.info.features
    if 'image' not in features or 'label' not in features:
        raise ValueError(f'TFDS dataset {name} needs `image` and `label` features, has '
                         f'{sorted(features.keys())}')
    height, width, native_channels = features['image'].shape
    if native_channels not in (1, 3):
        raise ValueError(f'TFDS dataset {name} has {native_channels}-channel images; need 1 or 3')
    variable_size = height is None or width is None or height != width
    shape = _output_shape(settings, _DEFAULT_IMAGE_SIZE if variable_size else height,
                          native_channels)
    split_names = {split: _tfds_split_name(builder, split) for split in SPLITS}
    counts = {split: builder.info.splits[tfds_split].num_examples
              for split, tfds_split in split_names.items()}

    def load(split: str) -> _RecordSplit:
        source = _tfds_source(builder, split_names[split])
        logging.info('%s %s: %s records in TFDS %s', name, split, f'{len(source):,}',
                     builder.data_dir)
        return _tfds_record_split(name, source, split_names[split])

    label = features['label']
    info = DatasetInfo(name, label.num_classes, shape, counts['train'], counts['test'],
                       tuple(label.names))
    mean, std = ((_IMAGENET_MEAN, _IMAGENET_STD) if native_channels == 3
                 else (_IMAGENET_GRAY_MEAN, _IMAGENET_GRAY_STD))
    return _Dataset(info, load, mean, std, native_channels, variable_size,
                    crop_padding=0 if variable_size else max(1, shape[0] // 8))


# Which examples go in which batch.

@dataclasses.dataclass(frozen=True)
class _Batch:
    """The rows of one process's batch."""
    indices: np.ndarray  # int [B], example index in the split (0 on padding rows)
    positions: np.ndarray  # int [B], position in the global stream
    mask: np.ndarray | None  # float32 [B] on eval, None in training


def _train_plan(num_examples: int, batch_size: int, process_index: int, process_count: int,
                seed: int, start_step: int) -> Iterator[_Batch]:
    global_batch = batch_size * process_count
    steps_per_epoch = num_examples // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f'global batch {global_batch} is larger than the split ({num_examples})')
    rows = np.arange(batch_size) + process_index * batch_size

    def batches() -> Iterator[_Batch]:
        epoch, order = -1, None
        step = start_step
        while True:
            if step // steps_per_epoch != epoch:
                epoch = step // steps_per_epoch
                rng = np.random.default_rng((seed, _SHUFFLE_STREAM, epoch))
                order = rng.permutation(num_examples)
            offset = (step % steps_per_epoch) * global_batch
            yield _Batch(order[offset + rows], step * global_batch + rows, None)
            step += 1

    return batches()


def _eval_plan(num_examples: int, batch_size: int, process_index: int,
               process_count: int) -> Iterator[_Batch]:
    global_batch = batch_size * process_count
    rows = np.arange(batch_size) + process_index * batch_size
    for step in range(-(-num_examples // global_batch)):
        positions = step * global_batch + rows
        real = positions < num_examples
        yield _Batch(np.where(real, positions, 0), positions, real.astype(np.float32))


# Images to batches.

class _Pipeline:
    """Turns planned batches into normalised, augmented arrays."""

    def __init__(self, dataset: _Dataset, seed: int, *, augment: bool, image_size: int,
                 channels: int):
        self.dataset = dataset
        self.seed = seed
        self.augment = augment
        self.image_size = image_size
        self.channels = channels
        self.scale = (1 / (255 * np.asarray(dataset.std))).astype(np.float32)
        self.offset = (np.asarray(dataset.mean) / np.asarray(dataset.std)).astype(np.float32)

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        return pixels.astype(np.float32) * self.scale - self.offset

    def crop_and_flip(self, images: np.ndarray, batch: _Batch) -> np.ndarray:
        """The augmentation of fixed-size images, done on whole batches."""
        if not (self.augment and self.dataset.crop_padding):
            return images
        return _pad_crop_flip(images, _hash_bits(self.seed, batch.positions),
                              self.dataset.crop_padding)

    def finish(self, images: np.ndarray, labels: np.ndarray,
               batch: _Batch) -> dict[str, np.ndarray]:
        """Replicates gray channels if asked and zeroes padding rows."""
        if images.shape[-1] != self.channels:
            images = np.repeat(images, self.channels, axis=-1)
        if batch.mask is None:
            return {'image': images, 'label': labels}
        padding = batch.mask == 0
        images[padding] = 0
        labels[padding] = 0
        return {'image': images, 'label': labels, 'mask': batch.mask}

    def array_batch(self, examples: _ArraySplit, batch: _Batch) -> dict[str, np.ndarray]:
        pixels = self.crop_and_flip(examples.images[batch.indices], batch)
        return self.finish(self.normalise(pixels), examples.labels[batch.indices], batch)

    def record_batches(self, examples: _RecordSplit, plan: Iterator[_Batch],
                       num_workers: int) -> Iterator[dict[str, np.ndarray]]:
        """Decodes on `num_workers` threads, `_PREFETCH_BATCHES` batches ahead."""
        pool = concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix='qhnet-data')
        size, native_channels = self.image_size, self.dataset.native_channels

        def start(batch: _Batch) -> Callable[[], dict[str, np.ndarray]]:
            images = np.zeros((len(batch.indices), size, size, native_channels), np.float32)
            labels = np.zeros(len(batch.indices), np.int32)

            def fill(row: int) -> None:
                images[row], labels[row] = self.load_example(examples, int(batch.indices[row]),
                                                             int(batch.positions[row]))

            rows = range(len(batch.indices)) if batch.mask is None else np.flatnonzero(batch.mask)
            futures = [pool.submit(fill, row) for row in rows]

            def result() -> dict[str, np.ndarray]:
                for future in futures:
                    future.result()
                return self.finish(self.crop_and_flip(images, batch), labels, batch)

            return result

        def batches() -> Iterator[dict[str, np.ndarray]]:
            pending = collections.deque()
            try:
                for batch in plan:
                    pending.append(start(batch))
                    if len(pending) > _PREFETCH_BATCHES:
                        yield pending.popleft()()
                while pending:
                    yield pending.popleft()()
            finally:
                pool.shutdown(wait=True, cancel_futures=True)

        return batches()

    def load_example(self, examples: _RecordSplit, index: int,
                     position: int) -> tuple[np.ndarray, int]:
        """One decoded, cropped and normalised image [S, S, native channels] and its label."""
        data, label = examples.read(index)
        size = self.image_size
        try:
            with Image.open(io.BytesIO(data)) as encoded:
                image = encoded.convert('RGB' if self.dataset.native_channels == 3 else 'L')
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise CorruptImageError(f'cannot decode image {examples.describe(index)}: {e}') from e
        flip = False
        if not self.dataset.variable_size:
            box = None
        elif self.augment:
            rng = np.random.default_rng((self.seed, _AUGMENT_STREAM, position))
            box = _random_resized_crop_box(rng, *image.size)
            flip = rng.random() < 0.5
        else:
            box = _central_crop_box(*image.size, size)
        if box is not None or image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR, box=box)
        pixels = np.asarray(image)
        if flip:
            pixels = pixels[:, ::-1]
        return self.normalise(pixels.reshape(size, size, -1)), label


def _random_resized_crop_box(rng: np.random.Generator, width: int,
                             height: int) -> tuple[int, int, int, int]:
    """A crop of 8%-100% of the area and aspect ratio 3/4-4/3 (Inception style)."""
    area = width * height
    for _ in range(10):
        target_area = area * rng.uniform(*_CROP_SCALE)
        ratio = math.exp(rng.uniform(*_CROP_LOG_RATIO))
        crop_width = round(math.sqrt(target_area * ratio))
        crop_height = round(math.sqrt(target_area / ratio))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            left = int(rng.integers(0, width - crop_width + 1))
            top = int(rng.integers(0, height - crop_height + 1))
            return left, top, left + crop_width, top + crop_height
    crop_width = min(width, round(height * 4 / 3))
    crop_height = min(height, round(width * 4 / 3))
    left, top = (width - crop_width) // 2, (height - crop_height) // 2
    return left, top, left + crop_width, top + crop_height


def _central_crop_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The square that resizing the shorter side to size / 0.875 and centre-cropping keeps."""
    side = min(width, height) * size / round(size / _CENTRAL_CROP_FRACTION)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def _hash_bits(seed: int, positions: np.ndarray) -> np.ndarray:
    """64 random-looking bits per stream position (SplitMix64 of seed and position)."""
    bits = positions.astype(np.uint64) ^ np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
    bits = bits + np.uint64(0x9E3779B97F4A7C15)
    bits = (bits ^ (bits >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    bits = (bits ^ (bits >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return bits ^ (bits >> np.uint64(31))


def _pad_crop_flip(images: np.ndarray, bits: np.ndarray, padding: int) -> np.ndarray:
    """Per image: reflect-pad by `padding`, crop back at a random offset, flip half of them."""
    count, height, width, _ = images.shape
    rows = np.pad(np.arange(height), padding, 'reflect')
    cols = np.pad(np.arange(width), padding, 'reflect')
    padded = images[:, rows][:, :, cols]
    offsets = np.uint64(2 * padding + 1)
    top = (bits % offsets).astype(np.intp)
    left = ((bits >> np.uint64(16)) % offsets).astype(np.intp)
    flip = ((bits >> np.uint64(32)) & np.uint64(1)).astype(bool)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (height, width), axis=(1, 2))
    crops = np.moveaxis(windows[np.arange(count), top, left], -3, -1)
    crops[flip] = crops[flip, :, ::-1]
    return crops
