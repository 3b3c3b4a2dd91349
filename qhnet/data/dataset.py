"""`open_dataset`: a dataset found, listed and checked once per run, and its batches."""

from __future__ import annotations

import dataclasses
from typing import Iterator

import grain
import numpy as np

from qhnet.data import bundled, folders, stream, tfds, transforms
from qhnet.data.core import (SPLITS, ArraySplit, DatasetInfo, RecordSplit, Settings, Source,
                             read_settings)

_SOURCES = {'fashion_mnist': bundled.open_fashion_mnist, 'digits': bundled.open_digits,
            'imagefolder': folders.open_imagefolder, 'imagenet100': folders.open_imagenet100,
            'imagenet1k': folders.open_imagenet1k}


def open_dataset(data_config) -> Dataset:
    """Checks `data_config`, finds the data and lists it: once per run.

    Reads no image except Fashion-MNIST's files (read and checked, `qhnet.data.bundled`) and
    an ImageFolder's headers (every val image, the first image of each train class): a
    damaged eval image is found before training starts.
    """
    settings = read_settings(data_config)
    return Dataset(settings, _SOURCES.get(settings.name, tfds.open_tfds)(settings))


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

    def __init__(self, settings: Settings, opened: Source):
        self.settings = settings
        self._opened = opened
        copies = opened.info.image_shape[2] // opened.native_channels
        self.info = dataclasses.replace(opened.info, mean=opened.mean * copies,
                                        std=opened.std * copies)
        self._splits: dict[str, ArraySplit | RecordSplit] = {}

    @property
    def fingerprint(self) -> dict:
        """What identifies the data: classes, split sizes, and digests of the files (bundled
        datasets) or of their names (image folders). JSON data."""
        return self._opened.fingerprint

    def _split(self, split: str) -> ArraySplit | RecordSplit:
        if split not in self._splits:
            self._splits[split] = self._opened.load(split)
        return self._splits[split]

    def batches(self, split: str, *, batch_size: int, seed: int, train: bool,
                start_step: int = 0, process_index: int = 0,
                process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
        """Batches of `split` ('train' or 'test') for this process (see `qhnet.data`).

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
        plan = stream.Plan(examples.size, batch_size, process_index, process_count, seed, train)
        if train and plan.steps_per_epoch == 0:
            raise ValueError(f'global batch {plan.global_batch} is larger than the split '
                             f'({examples.size})')
        steps = (start_step, stream.ENDLESS) if train else (0, plan.eval_steps)
        transform = self._transform(seed, augmented=train and split == 'train')
        if isinstance(examples, ArraySplit):
            return stream.batches(grain.MapDataset.range(*steps).map(
                stream.ArrayBatches(examples, plan, transform)), num_workers=0)
        rows = grain.MapDataset.range(steps[0] * batch_size, steps[1] * batch_size)
        return stream.batches(rows.map(stream.RecordExamples(examples, plan, transform)).batch(
            batch_size, batch_fn=stream.stack), self.settings.num_workers)

    def _transform(self, seed: int, augmented: bool) -> transforms.Transform:
        opened, settings = self._opened, self.settings
        return transforms.Transform(
            seed=seed, size=self.info.image_shape[0], channels=self.info.image_shape[2],
            native_channels=opened.native_channels, variable_size=opened.variable_size,
            crop_padding=opened.crop_padding, augment=augmented and settings.augment,
            rand_augment=augmented and settings.rand_augment,
            rand_augment_magnitude=settings.rand_augment_magnitude,
            rand_augment_std=settings.rand_augment_std,
            fill=tuple(round(255 * m) for m in opened.mean),
            erasing=settings.erasing if augmented else 0.0,
            erasing_count=settings.erasing_count, eval_resize=settings.eval_resize)

