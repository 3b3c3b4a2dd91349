"""Image folders: any `train/<class>/*`, `val/<class>/*` tree of JPEGs and PNGs, ImageNet-1k (every
class folder of such a tree) and ImageNet-100 (the CMC class list over an ImageNet folder tree or
a prepared TFDS imagenet2012)."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os

from absl import logging
import numpy as np

from qhnet.config import ConfigError
from qhnet.data import tfds, transforms
from qhnet.data.core import (DEFAULT_IMAGE_SIZE, CorruptDatasetError, CorruptImageError,
                             DatasetInfo, DatasetNotFoundError, RecordSplit, Settings, Source,
                             imagenet_statistics, output_shape)

IMAGENET100_CLASSES = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'imagenet100.txt')
_IMAGEFOLDER_DIRS = {'train': 'train', 'test': 'val'}
_IMAGE_SUFFIXES = ('.jpeg', '.jpg', '.png')
_GRAYSCALE_MODES = ('1', 'L', 'LA', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'I')
_IMAGENET_SETUP = (
    'Set config.data.data_dir to either\n'
    '  (a) an ImageFolder root: <data_dir>/train/<wnid>/*.JPEG and <data_dir>/val/<wnid>/*.JPEG '
    '(the ILSVRC2012 validation images sorted into class folders), with a folder for every '
    'wnid in the class list (qhnet/imagenet100.txt); or\n'
    '  (b) a TFDS data_dir holding imagenet2012 prepared as array_record: put '
    'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org) in <manual_dir> and '
    'run once `tfds build imagenet2012 --data_dir=<data_dir> --manual_dir=<manual_dir> '
    '--file_format=array_record` (building may need TensorFlow; reading it here does not).')
_IMAGENET1K_SETUP = (
    'Pass --config.data.data_dir=DIR, an ImageNet-1k ImageFolder root: DIR/train/<wnid>/*.JPEG and '
    'DIR/val/<wnid>/*.JPEG (the ILSVRC2012 validation images sorted into class folders), a folder '
    'for each of the 1000 classes in both.')
_IMAGEFOLDER_SETUP = (
    'Set config.data.data_dir to a folder holding train/<class>/* and val/<class>/* (JPEG or '
    'PNG images, one folder per class, the same class folders in both).')


def _read_class_list(path: str) -> tuple[str, ...]:
    """The class names (wnids) in the file `path`, one a line, sorted."""
    try:
        with open(path) as f:
            wnids = [line.strip() for line in f if line.strip()]
    except FileNotFoundError as e:
        raise DatasetNotFoundError(f'class list {path} not found (config.data.class_list)') from e
    if not wnids or len(set(wnids)) != len(wnids):
        raise ConfigError(f'class list {path} (config.data.class_list) must hold distinct class '
                          'names, one a line')
    return tuple(sorted(wnids))


def open_imagenet100(settings: Settings) -> Source:
    data_dir = settings.data_dir
    if not data_dir or not os.path.isdir(data_dir):
        raise DatasetNotFoundError(f'ImageNet-100 data_dir {data_dir!r} does not exist. '
                                   f'{_IMAGENET_SETUP}')
    class_names = _read_class_list(settings.class_list or IMAGENET100_CLASSES)
    data_format = settings.format
    if data_format == 'auto':
        data_format = 'imagefolder' if os.path.isdir(os.path.join(data_dir, 'train')) else 'tfds'
    if data_format == 'imagefolder':
        return open_imagefolder(settings, class_names, 'imagenet100', _IMAGENET_SETUP)
    splits, version = tfds.imagenet_subset(settings, _IMAGENET_SETUP, class_names)
    return _folder_source(settings, 'imagenet100', class_names, splits, 3,
                          {'tfds': version, **{split: {'count': splits[split].size}
                                               for split in splits}})


def open_imagenet1k(settings: Settings) -> Source:
    """ImageNet-1k as an ImageFolder tree: every class folder of train/ (or the class list's)."""
    return open_imagefolder(settings, None, 'imagenet1k', _IMAGENET1K_SETUP)


def open_imagefolder(settings: Settings, class_names: tuple[str, ...] | None = None,
                     name: str = 'imagefolder', setup: str = _IMAGEFOLDER_SETUP) -> Source:
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
    folders = {split: _listing(os.path.join(root, folder), directories=True)
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
    splits, first_images, listed = {}, [], {}
    for split, folder in _IMAGEFOLDER_DIRS.items():
        paths, labels = [], []
        for label, wnid in enumerate(class_names):
            class_dir = os.path.join(root, folder, wnid)
            names = [name for name in _listing(class_dir, directories=False)
                     if name.lower().endswith(_IMAGE_SUFFIXES)]
            if not names:
                raise DatasetNotFoundError(f'no JPEG or PNG images in {class_dir}. {setup}')
            paths += [os.path.join(class_dir, name) for name in names]
            labels += [label] * len(names)
            first_images.append(paths[-len(names)])
        logging.info('%s %s: found %s images in %d classes under %s', name, split,
                     f'{len(paths):,}', len(class_names), os.path.join(root, folder))
        splits[split] = _file_split(paths, np.asarray(labels, np.int32))
        names = '\n'.join(os.path.relpath(path, os.path.join(root, folder)) for path in paths)
        listed[split] = {'count': len(paths),
                         'files': hashlib.sha256(names.encode()).hexdigest()}
    test_paths = [splits['test'].describe(i) for i in range(splits['test'].size)]
    modes = _header_modes(sorted(set(test_paths + first_images)), settings.num_workers)
    native_channels = 1 if modes <= set(_GRAYSCALE_MODES) else 3
    return _folder_source(settings, name, class_names, splits, native_channels, listed)


def _listing(folder: str, directories: bool) -> list[str]:
    """The sorted names of the folders (or files) in `folder`, hidden ones left out. An entry
    that cannot be followed (a symbolic link that loops or points nowhere it may read) raises
    CorruptDatasetError naming it."""
    names = []
    for entry in os.scandir(folder):
        if entry.name.startswith('.'):
            continue
        try:
            if entry.is_dir() if directories else entry.is_file():
                names.append(entry.name)
        except OSError as e:
            raise CorruptDatasetError(
                f'cannot follow {entry.path} ({e.strerror or e}); fix or remove it, or move it '
                'out of the dataset') from e
    return sorted(names)


def _folder_source(settings: Settings, name: str, class_names: tuple[str, ...],
                   splits: dict[str, RecordSplit], native_channels: int,
                   fingerprint: dict) -> Source:
    """`fingerprint`: what identifies the splits (their sizes, a digest of their file names)."""
    shape = output_shape(settings, DEFAULT_IMAGE_SIZE, native_channels, name)
    info = DatasetInfo(name, len(class_names), shape, splits['train'].size, splits['test'].size,
                       class_names)
    return Source(info, splits.__getitem__, *imagenet_statistics(native_channels),
                  native_channels=native_channels, variable_size=True, crop_padding=0,
                  fingerprint={'name': name, 'classes': list(class_names), **fingerprint})


def _header_modes(paths: list[str], num_workers: int) -> set[str]:
    """The PIL modes of `paths`, from their headers; a file that is not a readable JPEG or
    PNG raises CorruptImageError naming it."""
    def mode(path: str) -> str:
        try:
            with transforms.open_image(path) as image:
                return image.mode
        except (OSError, SyntaxError, ValueError) as e:
            raise CorruptImageError(f'cannot read image {path}: {e}. Replace or delete the '
                                    'file and run again') from e

    with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
        return set(pool.map(mode, paths))


def _file_split(paths: list[str], labels: np.ndarray) -> RecordSplit:
    def read(index: int) -> tuple[bytes, int]:
        with open(paths[index], 'rb') as f:
            return f.read(), int(labels[index])

    return RecordSplit(len(paths), read, paths.__getitem__)


