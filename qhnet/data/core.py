"""What every part of the input pipeline shares: the dataset description (`DatasetInfo`), the
errors, the checked `config.data` settings, and the two kinds of split a source yields."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np

from qhnet import config

SPLITS = ('train', 'test')
# The datasets known by name; any other name is a prepared TFDS dataset.
NAMES = ('fashion_mnist', 'digits', 'imagefolder', 'imagenet100', 'imagenet1k')
DEFAULT_IMAGE_SIZE = 224
# Pixel statistics in [0, 1] units: ImageNet's usual ones.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD = (0.449,), (0.226,)


def imagenet_statistics(native_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet's (mean, std) per channel, for RGB or grayscale images."""
    if native_channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD


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


@dataclasses.dataclass(frozen=True)
class Settings:
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
    eval_resize: str | None


def read_settings(data_config) -> Settings:
    """The `config.data` section, checked against the schema (`qhnet.config`)."""
    config.validate_section(data_config, 'data')
    fields = {field.name: data_config[field.name] for field in dataclasses.fields(Settings)}
    for key in ('data_dir', 'class_list'):
        fields[key] = None if fields[key] is None else os.fspath(fields[key])
    return Settings(**fields)


@dataclasses.dataclass(frozen=True)
class ArraySplit:
    """A split held in memory at the output size."""
    images: np.ndarray  # uint8 [N, S, S, native channels]
    labels: np.ndarray  # int32 [N]

    @property
    def size(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class RecordSplit:
    """A split of encoded images read one at a time (files or TFDS records)."""
    size: int
    read: Callable[[int], tuple[bytes, int]]  # index -> (encoded image, label)
    describe: Callable[[int], str]  # index -> where it comes from, for error messages


@dataclasses.dataclass(frozen=True)
class Source:
    """An opened dataset: its description, how to load a split, how to transform images."""
    info: DatasetInfo
    load: Callable[[str], ArraySplit | RecordSplit]
    mean: tuple[float, ...]  # per native channel, pixels in [0, 1]
    std: tuple[float, ...]
    native_channels: int
    # True for photos of varying sizes (random-resized crops in training, central
    # crops otherwise); False for fixed-size images, resized to image_size if needed.
    variable_size: bool
    # Reflect padding of the random crop of fixed-size datasets; 0 means no augmentation.
    crop_padding: int
    # What identifies the data (classes, split sizes, digests of the files or of their
    # names): a checkpoint stores it, and a resume on other data is refused.
    fingerprint: dict = dataclasses.field(default_factory=dict)


def output_shape(settings: Settings, native_size: int, native_channels: int,
                 name: str | None = None) -> tuple[int, int, int]:
    if settings.channels == 1 and native_channels == 3:
        raise config.ConfigError(f'config.data.channels=1 needs a grayscale dataset; '
                         f'{name or settings.name} is RGB')
    size = settings.image_size or native_size
    return size, size, settings.channels or native_channels


