"""The datasets that ship with packages, held in memory: Fashion-MNIST (Debian's
`dataset-fashion-mnist`, four idx.gz files, read and checked here) and scikit-learn's digits."""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import zlib

from absl import logging
import numpy as np
from PIL import Image

from qhnet.data.core import (SPLITS, ArraySplit, CorruptDatasetError, DatasetInfo,
                             DatasetNotFoundError, Settings, Source, output_shape)

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
_FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
_FASHION_MNIST_SIZES = {'train': 60000, 'test': 10000}
_FASHION_MNIST_IMAGE_SHAPE = (28, 28)
_FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                          'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
_DIGITS_NUM_TRAIN = 1500
# Pixel statistics in [0, 1] units, computed over the train splits.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
DIGITS_MEAN, DIGITS_STD = (0.3052,), (0.3749,)

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


def open_fashion_mnist(settings: Settings) -> Source:
    data_dir = settings.data_dir or FASHION_MNIST_DIR
    paths = {split: [os.path.join(data_dir, f) for f in files]
             for split, files in _FASHION_MNIST_FILES.items()}
    missing = [p for ps in paths.values() for p in ps if not os.path.isfile(p)]
    if missing:
        raise DatasetNotFoundError(f'Fashion-MNIST is missing {missing}. {_FASHION_MNIST_SETUP}')
    shape = output_shape(settings, 28, 1)
    splits = {split: _read_fashion_mnist(split, *paths[split]) for split in SPLITS}

    def load(split: str) -> ArraySplit:
        images, labels, _ = splits[split]
        logging.info('fashion_mnist %s: %s images in memory from %s', split,
                     f'{len(labels):,}', data_dir)
        return ArraySplit(_resize_all(images, shape[0]), labels)

    info = DatasetInfo('fashion_mnist', 10, shape, len(splits['train'][1]),
                       len(splits['test'][1]), _FASHION_MNIST_CLASSES)
    fingerprint = {'name': 'fashion_mnist', 'classes': list(_FASHION_MNIST_CLASSES),
                   **{split: {'count': len(labels), 'sha256': digests}
                      for split, (_, labels, digests) in splits.items()}}
    return Source(info, load, FASHION_MNIST_MEAN, FASHION_MNIST_STD, native_channels=1,
                  variable_size=False, crop_padding=max(1, round(2 * shape[0] / 28)),
                  fingerprint=fingerprint)


def _read_fashion_mnist(split: str, images_path: str,
                        labels_path: str) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """A split's uint8 [N, 28, 28, 1] images and int32 [N] labels, read-only, and the SHA-256
    of each file's content (by file name).

    Checks each file as `_read_idx` does, and that both hold the split's number of
    examples (60,000 train, 10,000 test) and the labels are class indices (0..9).
    """
    images, images_sha = _read_idx(images_path, _FASHION_MNIST_IMAGE_SHAPE)
    labels, labels_sha = _read_idx(labels_path, ())
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
    digests = {os.path.basename(images_path): images_sha, os.path.basename(labels_path): labels_sha}
    return images[..., None], labels, digests


def _read_idx(path: str, item_shape: tuple[int, ...]) -> tuple[np.ndarray, str]:
    """The uint8 array [N, *item_shape] in an idx.gz file, read-only, and the SHA-256 of the
    file's (decompressed) content.

    Read once per process while the file is unchanged: cached by real path (errors name
    it), mtime and size.
    """
    stat = os.stat(path)
    return _read_idx_cached(os.path.realpath(path), stat.st_mtime_ns, stat.st_size, item_shape)


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: str, mtime_ns: int, size: int,
                     item_shape: tuple[int, ...]) -> tuple[np.ndarray, str]:
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
    array = np.frombuffer(content, np.uint8, offset=header_size).reshape(dims)
    return array, hashlib.sha256(content).hexdigest()


def _corrupt_fashion_mnist(path: str, problem: str) -> CorruptDatasetError:
    return CorruptDatasetError(f'Fashion-MNIST file {path} {problem}. {_FASHION_MNIST_REPAIR}')


def open_digits(settings: Settings) -> Source:
    shape = output_shape(settings, 8, 1)
    num_test = 1797 - _DIGITS_NUM_TRAIN

    def load(split: str) -> ArraySplit:
        images, labels = _read_digits()
        part = slice(0, _DIGITS_NUM_TRAIN) if split == 'train' else slice(_DIGITS_NUM_TRAIN, None)
        logging.info('digits %s: %d images in memory (scikit-learn)', split, len(labels[part]))
        return ArraySplit(_resize_all(images[part], shape[0]), labels[part])

    info = DatasetInfo('digits', 10, shape, _DIGITS_NUM_TRAIN, num_test,
                       tuple(str(d) for d in range(10)))
    images, labels = _read_digits()
    fingerprint = {'name': 'digits', 'classes': list(info.class_names),
                   'train': {'count': _DIGITS_NUM_TRAIN}, 'test': {'count': num_test},
                   'sha256': hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()}
    return Source(info, load, DIGITS_MEAN, DIGITS_STD, native_channels=1, variable_size=False,
                  crop_padding=0, fingerprint=fingerprint)


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


