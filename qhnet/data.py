"""Input pipelines on grain: Fashion-MNIST, digits, any ImageFolder, ImageNet-100, TFDS.

`open_dataset(config.data)` checks the config, finds and lists the data once, and returns
a `Dataset`: its `info`, and `batches(split, ...)`, an iterator over
`{'image': uint8 [B, H, W, C], 'label': int32 [B]}`, plus `'mask'` on eval and `'erase'`
boxes when random erasing is on. Images stay uint8 until the device: `normalise(images,
info)` (inside the jitted step) makes the float32 the models read.

Datasets, by `config.data.name`:

* `fashion_mnist`: the four idx files in `data_dir` (default
  /usr/share/datasets/fashion-mnist, Debian package `dataset-fashion-mnist`),
  held in memory: 60,000 train and 10,000 test images, 28x28x1.
* `digits`: scikit-learn's bundled 8x8 digits (1,797 images, nothing to
  download); the first 1,500 are the train split and the last 297 the test split.
* `imagefolder`: any tree `data_dir/train/<class>/*` and `data_dir/val/<class>/*` of JPEG
  or PNG images (8- or 16-bit, RGB or grayscale). Classes are the sorted folder names of
  train/, or those of `class_list`; val/ must have the same folders. The dataset is
  grayscale when every header checked at open is (every val image, the first of each
  train class), else RGB.
* `imagenet100`: the 100 ImageNet classes of CMC (Tian, Krishnan and Isola,
  "Contrastive Multiview Coding", 2019; the list published as imagenet100.txt in
  github.com/HobbitLong/CMC, packaged here as qhnet/imagenet100.txt): an `imagefolder`
  with that class list (`train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG`; other folders are
  ignored), or a TFDS `imagenet2012` prepared as array_record. Class i is the i-th wnid
  in sorted order.
* any other name: a TFDS dataset with `image` and `label` features, prepared in
  `data_dir` as array_record (read with `tfds.data_source`, no TensorFlow).

Nothing is ever downloaded: missing data raises `DatasetNotFoundError` with setup
instructions. Fashion-MNIST's files are read and checked when the dataset is
opened (once per process while they are unchanged); a damaged one raises
`CorruptDatasetError` naming it and saying how to replace it. An image that
cannot be decoded raises `CorruptImageError` naming its file (or TFDS record)
instead of being skipped, so a stream never changes silently.

Streams are grain `MapDataset`s: decoding and augmentation run in `.map`, in
`config.data.num_workers` worker processes (`mp_prefetch`; 0 decodes in this
process), and depend only on (seed, step): epoch e is the permutation of the split
drawn from (seed, e), the global batch at step k holds positions k*G .. k*G+G-1 of
the stream (G = batch_size * process_count, remainders dropped), process p takes rows
p*batch_size onwards, and each example's augmentation is drawn from (seed, its
position). So `start_step` resumes bit for bit without saved iterator state, and the
global stream does not depend on the process count or the number of workers.

Augmentation (train split only). `augment`: ImageNet-style datasets get a
random-resized crop (scale 0.08-1, ratio 3/4-4/3) and a horizontal flip;
Fashion-MNIST and other fixed-size TFDS datasets a random crop after reflect
padding (2 pixels at 28x28; 1/8 of the side for others) and a horizontal flip;
digits none. Without it, ImageNet-style images are resized so that the shorter
side is image_size / 0.875 and centre-cropped (an image already image_size square is
used as it is). JPEGs are decoded by libjpeg-turbo (simplejpeg) and crops resized by
OpenCV's bilinear interpolation, without an antialiasing filter (as `tf.image.resize`
does; timm's PIL resize filters, at 5x the cost): 1.8x the rate of PIL's decode and
resize, and 2 of 255 from their pixels on average (benchmarks/pipeline_cpu.md).
`rand_augment` then applies timm's RandAugment and `erasing` draws timm's random-erasing
boxes, filled with N(0, 1) noise on the device (`qhnet.augment`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import gzip
import io
import math
import os
import sys
from typing import Callable, Iterator
import zlib

from absl import flags
from absl import logging
import cv2
import grain
import numpy as np
from PIL import Image
import simplejpeg

from qhnet import augment
from qhnet import config

NAMES = ('fashion_mnist', 'digits', 'imagefolder', 'imagenet100')
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
_THREADS_WITHOUT_WORKERS = 2
_ENDLESS = 2**40  # steps of a training stream
_GRAYSCALE_MODES = ('1', 'L', 'LA', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'I')
# Tags that keep the random streams of shuffling and of each augmentation apart.
_SHUFFLE_STREAM, _AUGMENT_STREAM, _RAND_AUGMENT_STREAM, _ERASING_STREAM = 0, 1, 2, 3

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


_IMAGEFOLDER_SETUP = (
    'Set config.data.data_dir to a folder holding train/<class>/* and val/<class>/* (JPEG or '
    'PNG images, one folder per class, the same class folders in both).')


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
    # Pixel statistics per output channel, in [0, 1] units (what `normalise` uses).
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


def open_dataset(data_config) -> Dataset:
    """Checks `data_config`, finds the data and lists it: once per run.

    Reads no image except Fashion-MNIST's files (read and checked here, see
    `_read_fashion_mnist`) and an ImageFolder's headers (every val image, the first image
    of each train class): a damaged eval image is found before training starts.
    """
    settings = _read_settings(data_config)
    return Dataset(settings, _open(settings))


def get_info(data_config) -> DatasetInfo:
    """`open_dataset(data_config).info`."""
    return open_dataset(data_config).info


def make_iterator(data_config, split: str, **kwargs) -> Iterator[dict[str, np.ndarray]]:
    """`open_dataset(data_config).batches(split, **kwargs)`."""
    return open_dataset(data_config).batches(split, **kwargs)


def normalise(images, info: DatasetInfo):
    """uint8 pixels to the float32 the models read: (x / 255 - mean) / std per channel.

    Plain arithmetic on `images`, so it runs on numpy arrays and inside `jax.jit` alike.
    """
    std = np.asarray(info.std, np.float32)
    scale = 1 / (255 * std)
    offset = np.asarray(info.mean, np.float32) / std
    return images.astype(np.float32) * scale - offset


class Dataset:
    """An opened dataset: `info`, and `batches` of any split. Splits are loaded once."""

    def __init__(self, settings: _Settings, opened: _Dataset):
        self.settings = settings
        self._opened = opened
        copies = opened.info.image_shape[2] // opened.native_channels
        self.info = dataclasses.replace(opened.info, mean=opened.mean * copies,
                                        std=opened.std * copies)
        self._splits: dict[str, _ArraySplit | _RecordSplit] = {}

    def _split(self, split: str) -> _ArraySplit | _RecordSplit:
        if split not in self._splits:
            self._splits[split] = self._opened.load(split)
        return self._splits[split]

    def batches(self, split: str, *, batch_size: int, seed: int, train: bool,
                start_step: int = 0, process_index: int = 0,
                process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
        """Batches of `split` ('train' or 'test') for this process; see the module docstring.

        train=True: an endless stream (shuffled every epoch, remainders dropped, augmented
        as `config.data` says if split is 'train'), starting after `start_step` batches
        already consumed.
        train=False: one pass in order; the last batch is padded to `batch_size` with zero
        images and every batch has a float32 `mask` (1 for real examples, 0 for padding).
        """
        if split not in SPLITS:
            raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
        if batch_size < 1 or process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f'need batch_size >= 1 and 0 <= process_index < process_count, '
                             f'got {batch_size=}, {process_index=}, {process_count=}')
        if seed < 0 or start_step < 0:
            raise ValueError(f'seed and start_step must be non-negative, got {seed=}, '
                             f'{start_step=}')
        examples = self._split(split)
        plan = _Plan(examples.size, batch_size, process_index, process_count, seed, train)
        if train and plan.steps_per_epoch == 0:
            raise ValueError(f'global batch {plan.global_batch} is larger than the split '
                             f'({examples.size})')
        steps = (start_step, _ENDLESS) if train else (0, plan.eval_steps)
        transform = self._transform(seed, augmented=train and split == 'train')
        if isinstance(examples, _ArraySplit):
            return _batches(grain.MapDataset.range(*steps).map(
                _ArrayBatches(examples, plan, transform)), num_workers=0)
        rows = grain.MapDataset.range(steps[0] * batch_size, steps[1] * batch_size)
        return _batches(rows.map(_RecordExamples(examples, plan, transform)).batch(
            batch_size, batch_fn=_stack), self.settings.num_workers)

    def _transform(self, seed: int, augmented: bool) -> _Transform:
        opened, settings = self._opened, self.settings
        return _Transform(
            seed=seed, size=self.info.image_shape[0], channels=self.info.image_shape[2],
            native_channels=opened.native_channels, variable_size=opened.variable_size,
            crop_padding=opened.crop_padding, augment=augmented and settings.augment,
            rand_augment=augmented and settings.rand_augment,
            rand_augment_magnitude=settings.rand_augment_magnitude,
            rand_augment_std=settings.rand_augment_std,
            fill=tuple(round(255 * m) for m in opened.mean),
            erasing=settings.erasing if augmented else 0.0,
            erasing_count=settings.erasing_count)


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
    rand_augment: bool
    rand_augment_magnitude: float
    rand_augment_std: float
    erasing: float
    erasing_count: int
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
    if not isinstance(num_workers, (int, np.integer)) or num_workers < 0:
        raise ValueError(f'config.data.num_workers must be an int >= 0, got {num_workers!r}')
    for key, low, high in (('rand_augment_magnitude', 0, 10), ('rand_augment_std', 0, 10),
                           ('erasing', 0, 1), ('erasing_count', 1, 100)):
        value = data_config[key]
        if (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
                or not low <= value <= high):
            raise ValueError(f'config.data.{key} must be a number in [{low}, {high}], '
                             f'got {value!r}')
    for key in ('augment', 'rand_augment'):
        if not isinstance(data_config[key], bool):
            raise ValueError(f'config.data.{key} must be True or False, got {data_config[key]!r}')
    data_dir = data_config.data_dir
    class_list = data_config.class_list
    return _Settings(name=name, data_dir=None if data_dir is None else os.fspath(data_dir),
                     format=data_format, image_size=None if image_size is None else int(image_size),
                     channels=channels, augment=data_config.augment,
                     rand_augment=data_config.rand_augment,
                     rand_augment_magnitude=float(data_config.rand_augment_magnitude),
                     rand_augment_std=float(data_config.rand_augment_std),
                     erasing=float(data_config.erasing),
                     erasing_count=int(data_config.erasing_count),
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
    if settings.name == 'imagefolder':
        return _open_imagefolder(settings)
    if settings.name == 'imagenet100':
        return _open_imagenet100(settings)
    return _open_tfds(settings)


def _output_shape(settings: _Settings, native_size: int, native_channels: int,
                  name: str | None = None) -> tuple[int, int, int]:
    if settings.channels == 1 and native_channels == 3:
        raise ValueError(f'config.data.channels=1 needs a grayscale dataset; '
                         f'{name or settings.name} is RGB')
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


def _read_class_list(path: str) -> tuple[str, ...]:
    """The class names (wnids) in the file `path`, one a line, sorted."""
    try:
        with open(path) as f:
            wnids = [line.strip() for line in f if line.strip()]
    except FileNotFoundError as e:
        raise DatasetNotFoundError(f'class list {path} not found (config.data.class_list)') from e
    if not wnids or len(set(wnids)) != len(wnids):
        raise ValueError(f'class list {path} must hold distinct class names, one a line')
    return tuple(sorted(wnids))


def _open_imagenet100(settings: _Settings) -> _Dataset:
    data_dir = settings.data_dir
    if not data_dir or not os.path.isdir(data_dir):
        raise DatasetNotFoundError(f'ImageNet-100 data_dir {data_dir!r} does not exist. '
                                   f'{_IMAGENET_SETUP}')
    class_names = _read_class_list(settings.class_list or IMAGENET100_CLASSES)
    data_format = settings.format
    if data_format == 'auto':
        data_format = 'imagefolder' if os.path.isdir(os.path.join(data_dir, 'train')) else 'tfds'
    if data_format == 'imagefolder':
        return _open_imagefolder(settings, class_names, 'imagenet100', _IMAGENET_SETUP)
    splits = _filter_tfds_imagenet(settings, class_names)
    return _folder_dataset(settings, 'imagenet100', class_names, splits, native_channels=3)


def _open_imagefolder(settings: _Settings, class_names: tuple[str, ...] | None = None,
                      name: str = 'imagefolder', setup: str = _IMAGEFOLDER_SETUP) -> _Dataset:
    """A `train/<class>/*`, `val/<class>/*` tree of JPEGs and PNGs, RGB or grayscale.

    Classes are `class_names` (sorted), else the class list's, else train/'s folders;
    val/ must hold the same. The dataset is grayscale when every header read is.
    """
    root = settings.data_dir
    if not root or not all(os.path.isdir(os.path.join(root, folder))
                           for folder in _IMAGEFOLDER_DIRS.values()):
        raise DatasetNotFoundError(f'{name} data_dir {root!r} needs train/ and val/ folders. '
                                   f'{setup}')
    if class_names is None and settings.class_list:
        class_names = _read_class_list(settings.class_list)
    folders = {split: sorted(entry.name for entry in os.scandir(os.path.join(root, folder))
                             if entry.is_dir() and not entry.name.startswith('.'))
               for split, folder in _IMAGEFOLDER_DIRS.items()}
    if class_names is None:
        class_names = tuple(folders['train'])
        extra = sorted(set(folders['test']) - set(class_names))
        if extra:
            raise DatasetNotFoundError(
                f'{os.path.join(root, "val")} has class folders that train/ lacks: '
                f'{" ".join(extra)}. Give both splits the same class folders (or set '
                'config.data.class_list)')
    missing = [os.path.join(folder, wnid) for split, folder in _IMAGEFOLDER_DIRS.items()
               for wnid in class_names if wnid not in folders[split]]
    if missing:
        raise DatasetNotFoundError(
            f'{len(missing)} class folders are missing under {root}: {" ".join(missing)}. '
            f'{setup}')
    if not class_names:
        raise DatasetNotFoundError(f'{os.path.join(root, "train")} has no class folders. {setup}')
    splits, first_images = {}, []
    for split, folder in _IMAGEFOLDER_DIRS.items():
        paths, labels = [], []
        for label, wnid in enumerate(class_names):
            class_dir = os.path.join(root, folder, wnid)
            names = sorted(entry.name for entry in os.scandir(class_dir)
                           if entry.is_file() and not entry.name.startswith('.')
                           and entry.name.lower().endswith(_IMAGE_SUFFIXES))
            if not names:
                raise DatasetNotFoundError(f'no JPEG or PNG images in {class_dir}. {setup}')
            paths += [os.path.join(class_dir, name) for name in names]
            labels += [label] * len(names)
            first_images.append(paths[-len(names)])
        logging.info('%s %s: found %s images in %d classes under %s', name, split,
                     f'{len(paths):,}', len(class_names), os.path.join(root, folder))
        splits[split] = _file_split(paths, np.asarray(labels, np.int32))
    test_paths = [splits['test'].describe(i) for i in range(splits['test'].size)]
    modes = _header_modes(sorted(set(test_paths + first_images)), settings.num_workers)
    native_channels = 1 if modes <= set(_GRAYSCALE_MODES) else 3
    return _folder_dataset(settings, name, class_names, splits, native_channels)


def _folder_dataset(settings: _Settings, name: str, class_names: tuple[str, ...],
                    splits: dict[str, _RecordSplit], native_channels: int) -> _Dataset:
    shape = _output_shape(settings, _DEFAULT_IMAGE_SIZE, native_channels, name)
    info = DatasetInfo(name, len(class_names), shape, splits['train'].size, splits['test'].size,
                       class_names)
    mean, std = ((_IMAGENET_MEAN, _IMAGENET_STD) if native_channels == 3
                 else (_IMAGENET_GRAY_MEAN, _IMAGENET_GRAY_STD))
    return _Dataset(info, splits.__getitem__, mean, std, native_channels=native_channels,
                    variable_size=True, crop_padding=0)


def _header_modes(paths: list[str], num_workers: int) -> set[str]:
    """The PIL modes of `paths`, from their headers; a file that is not a readable JPEG or
    PNG raises CorruptImageError naming it."""
    def mode(path: str) -> str:
        try:
            with Image.open(path) as image:
                if image.format not in ('JPEG', 'PNG'):
                    raise ValueError(f'it is {image.format}, not JPEG or PNG')
                return image.mode
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise CorruptImageError(f'cannot read image {path}: {e}. Replace or delete the '
                                    'file and run again') from e

    with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
        return set(pool.map(mode, paths))


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

    with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
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


# Images to batches.

@dataclasses.dataclass(frozen=True)
class _Plan:
    """Which example each row of this process's stream holds (see the module docstring).

    Row r is row r % batch_size of the process's batch at step r // batch_size. Picklable,
    so grain's worker processes compute the same plan; each keeps the permutation of the
    epoch it is in.
    """
    num_examples: int
    batch_size: int
    process_index: int
    process_count: int
    seed: int
    train: bool

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.process_count

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch

    @property
    def eval_steps(self) -> int:
        return -(-self.num_examples // self.global_batch)

    def example(self, row: int) -> tuple[int, int, bool]:
        """(example index in the split, position in the global stream, real or padding)."""
        step, column = divmod(row, self.batch_size)
        offset = self.process_index * self.batch_size + column
        position = step * self.global_batch + offset
        if not self.train:
            real = position < self.num_examples
            return (position if real else 0), position, real
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        return int(_permutation(self.seed, epoch, self.num_examples)[
            step_in_epoch * self.global_batch + offset]), position, True

    def batch(self, step: int) -> _Batch:
        rows = step * self.batch_size + np.arange(self.batch_size)
        indices, positions, real = zip(*map(self.example, rows))
        return _Batch(np.asarray(indices), np.asarray(positions),
                      None if self.train else np.asarray(real, np.float32))


@functools.lru_cache(maxsize=2)
def _permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    return np.random.default_rng((seed, _SHUFFLE_STREAM, epoch)).permutation(num_examples)


@dataclasses.dataclass(frozen=True)
class _Batch:
    """The rows of one process's batch."""
    indices: np.ndarray  # int [B], example index in the split (0 on padding rows)
    positions: np.ndarray  # int [B], position in the global stream
    mask: np.ndarray | None  # float32 [B] on eval, None in training


@dataclasses.dataclass(frozen=True)
class _Transform:
    """What happens to a decoded image, and the random streams it draws from. Picklable."""
    seed: int
    size: int
    channels: int  # of the output
    native_channels: int
    variable_size: bool
    crop_padding: int  # fixed-size datasets' random crop; 0: none
    augment: bool
    rand_augment: bool
    rand_augment_magnitude: float
    rand_augment_std: float
    fill: tuple[int, ...]  # RandAugment's fill: the dataset mean, per native channel
    erasing: float
    erasing_count: int

    def rng(self, stream: int, position: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, stream, position))

    def finish(self, pixels: np.ndarray, position: int, real: bool) -> dict:
        """RandAugment, erasing boxes and channel replication of one cropped image, uint8
        [size, size, native channels]."""
        if self.rand_augment:
            image = augment.rand_augment(
                Image.fromarray(pixels[..., 0] if self.native_channels == 1 else pixels),
                self.rng(_RAND_AUGMENT_STREAM, position),
                magnitude=self.rand_augment_magnitude, magnitude_std=self.rand_augment_std,
                fill=self.fill)
            pixels = np.asarray(image, np.uint8).reshape(self.size, self.size, -1)
        if not real:
            pixels = np.zeros_like(pixels)
        if pixels.shape[-1] != self.channels:
            pixels = np.repeat(pixels, self.channels, axis=-1)
        example = {'image': pixels}
        if self.erasing:
            example['erase'] = augment.erasing_boxes(
                self.rng(_ERASING_STREAM, position), self.size, self.size,
                probability=self.erasing, max_count=self.erasing_count)
        return example


@dataclasses.dataclass(frozen=True)
class _ArrayBatches:
    """Batch `step` of an in-memory split, augmented batch-wise (grain map function)."""
    split: _ArraySplit
    plan: _Plan
    transform: _Transform

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        batch = self.plan.batch(step)
        pixels = self.split.images[batch.indices]
        transform = self.transform
        if transform.augment and transform.crop_padding:
            pixels = _pad_crop_flip(pixels, _hash_bits(transform.seed, batch.positions),
                                    transform.crop_padding)
        real = np.ones(len(pixels), bool) if batch.mask is None else batch.mask > 0
        if transform.rand_augment or transform.erasing:
            examples = [transform.finish(image, int(position), bool(keep))
                        for image, position, keep in zip(pixels, batch.positions, real)]
            out = _stack(examples)
        else:
            if pixels.shape[-1] != transform.channels:
                pixels = np.repeat(pixels, transform.channels, axis=-1)
            out = {'image': np.where(real[:, None, None, None], pixels, 0).astype(np.uint8)}
        out['label'] = np.where(real, self.split.labels[batch.indices], 0).astype(np.int32)
        if batch.mask is not None:
            out['mask'] = batch.mask
        return out


@dataclasses.dataclass(frozen=True)
class _RecordExamples:
    """Row `row` of a split of encoded images, decoded and augmented (grain map function)."""
    split: _RecordSplit
    plan: _Plan
    transform: _Transform

    def __call__(self, row: int) -> dict[str, np.ndarray]:
        index, position, real = self.plan.example(row)
        transform = self.transform
        if real:
            data, label = self.split.read(index)
            pixels = self.decode(data, index, position)
        else:
            label = 0
            pixels = np.zeros((transform.size, transform.size, transform.native_channels),
                              np.uint8)
        example = transform.finish(pixels, position, real)
        example['label'] = np.int32(label)
        if not self.plan.train:
            example['mask'] = np.float32(real)
        return example

    def decode(self, data: bytes, index: int, position: int) -> np.ndarray:
        """Decoded (JPEGs by libjpeg-turbo, through simplejpeg; others by PIL), cropped,
        resized (OpenCV's bilinear) and flipped: uint8 [size, size, native channels]."""
        transform = self.transform
        size = transform.size
        try:
            pixels = _decode_pixels(data, transform.native_channels)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise CorruptImageError(f'cannot decode image {self.split.describe(index)}: {e}. '
                                    'Replace or delete the file and run again') from e
        height, width = pixels.shape[:2]
        flip = False
        if not transform.variable_size or (width, height) == (size, size):
            box = None
        elif transform.augment:
            rng = transform.rng(_AUGMENT_STREAM, position)
            box = _random_resized_crop_box(rng, width, height)
            flip = rng.random() < 0.5
        else:
            box = _central_crop_box(width, height, size)
        if box is not None or (width, height) != (size, size):
            pixels = _resize(pixels, box or (0, 0, width, height), size)
        if flip:
            pixels = cv2.flip(pixels, 1).reshape(pixels.shape)
        if transform.augment and transform.crop_padding:
            bits = _hash_bits(transform.seed, np.asarray([position]))
            return _pad_crop_flip(pixels[None], bits, transform.crop_padding)[0]
        return pixels


def _decode_pixels(data: bytes, channels: int) -> np.ndarray:
    """uint8 [H, W, channels]. JPEGs go to libjpeg-turbo (simplejpeg), which is faster than
    PIL's decoder; the JPEGs it refuses (e.g. truncated ones) and other formats go to PIL,
    so that a file that neither reads raises PIL's error."""
    if data[:2] == b'\xff\xd8':
        try:
            pixels = simplejpeg.decode_jpeg(data, colorspace='RGB' if channels == 3 else 'GRAY')
            return pixels.reshape(*pixels.shape[:2], channels)
        except ValueError:
            pass
    with Image.open(io.BytesIO(data)) as encoded:
        image = _to_mode(encoded, 'RGB' if channels == 3 else 'L')
    return np.asarray(image).reshape(image.size[1], image.size[0], channels)


def _resize(pixels: np.ndarray, box: tuple[float, float, float, float],
            size: int) -> np.ndarray:
    """The `box` (left, top, right, bottom; rounded to whole pixels) of `pixels`, resized to
    size x size by bilinear interpolation (OpenCV; no antialiasing filter, as in
    `tf.image.resize`)."""
    left, top, right, bottom = (int(round(value)) for value in box)
    crop = pixels[top:bottom, left:right]
    resized = cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR)
    return resized.reshape(size, size, pixels.shape[-1])


_SIXTEEN_BIT_MODES = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    """`image`, decoded, in 8-bit `mode` ('RGB' or 'L'); 16-bit grayscale is scaled, not
    clipped."""
    image.load()
    if image.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(image).astype(np.uint32)
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
    return image if image.mode == mode else image.convert(mode)


def _stack(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.stack([example[key] for example in examples]) for key in examples[0]}


def _batches(dataset: grain.MapDataset, num_workers: int) -> Iterator[dict[str, np.ndarray]]:
    """Iterates over `dataset` (batches), `_PREFETCH_BATCHES` ahead, decoded by `num_workers`
    grain worker processes (0: threads of this process); closes the workers when done."""
    _mark_flags_parsed()
    stream = dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=1 if num_workers else _THREADS_WITHOUT_WORKERS,
        prefetch_buffer_size=_PREFETCH_BATCHES))
    if num_workers:
        _quiet_resource_tracker()
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=_PREFETCH_BATCHES))
    iterator = iter(stream)
    try:
        for batch in iterator:  # workers' batches live in shared memory: copied out at once
            yield {key: np.array(value) for key, value in batch.items()}
    finally:
        iterator.close()


def _quiet_resource_tracker() -> None:
    """Closing grain's workers can leave a batch or two of shared memory in flight; the
    resource tracker process that multiprocessing starts frees them at exit, with a warning
    each time. It inherits `sys.warnoptions`, so this silences that warning alone."""
    option = 'ignore:resource_tracker:UserWarning:multiprocessing.resource_tracker'
    if option not in sys.warnoptions:
        sys.warnoptions.append(option)


def _mark_flags_parsed() -> None:
    """grain reads absl flags; a library caller (a notebook, a test) may not have parsed them."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


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
