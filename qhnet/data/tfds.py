"""TFDS datasets prepared as array_record, read with random access (no TensorFlow): any dataset
with `image` and `label` features, and the ImageNet-100 classes of a prepared imagenet2012."""

from __future__ import annotations

import concurrent.futures
import os

from absl import logging
import numpy as np

from qhnet.config import ConfigError
from qhnet.data.core import (DEFAULT_IMAGE_SIZE, NAMES, SPLITS, DatasetInfo, DatasetNotFoundError,
                             RecordSplit, Settings, Source, imagenet_statistics, output_shape)

IMAGENET_TFDS_NAME = 'imagenet2012'


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
        raise ConfigError(
            f'unknown dataset {name!r}: config.data.name must be one of {list(NAMES)} or a TFDS '
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
    raise ConfigError(f'TFDS dataset {builder.name} has splits {sorted(builder.info.splits)}, '
                     f'none of {candidates}')


def _tfds_source(builder, split: str):
    """Random access to a prepared TFDS split (what `tfds.data_source` returns), images encoded."""
    tfds = _import_tfds()
    return builder.as_data_source(split=split, decoders={'image': tfds.decode.SkipDecoding()})


def _tfds_record_split(name: str, source, split: str, indices: np.ndarray | None = None,
                       labels: np.ndarray | None = None) -> RecordSplit:
    """Records of `source` (those at `indices`, relabelled `labels`, if given)."""
    def read(index: int) -> tuple[bytes, int]:
        if indices is None:
            record = source[index]
            return record['image'], int(record['label'])
        return source[int(indices[index])]['image'], int(labels[index])

    def describe(index: int) -> str:
        record = index if indices is None else int(indices[index])
        return f'TFDS {name} {split} record {record}'

    return RecordSplit(len(source) if indices is None else len(indices), read, describe)


def imagenet_subset(settings: Settings, setup: str, class_names: tuple[str, ...]
                    ) -> tuple[dict[str, RecordSplit], str]:
    """The records of TFDS imagenet2012 in `class_names`, relabelled by their index there,
    and the dataset's name and version."""
    builder = _tfds_builder(IMAGENET_TFDS_NAME, settings.data_dir, setup)
    all_wnids = builder.info.features['label'].names
    unknown = sorted(set(class_names) - set(all_wnids))
    if unknown:
        raise ConfigError(f'wnids not in {IMAGENET_TFDS_NAME}: {unknown}')
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
        splits[split] = _tfds_record_split(IMAGENET_TFDS_NAME, source, tfds_split,
                                           indices, labels[indices])
    return splits, f'{builder.name}:{builder.version}'



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


def open_tfds(settings: Settings) -> Source:
    name = settings.name
    setup = (f'Prepare it once with `tfds build {name} '
             f'--data_dir={settings.data_dir or "<data_dir>"} --file_format=array_record` '
             '(building may need TensorFlow; reading it here does not).')
    builder = _tfds_builder(name, settings.data_dir, setup)
    features = builder.info.features
    if 'image' not in features or 'label' not in features:
        raise ConfigError(f'TFDS dataset {name} needs `image` and `label` features, has '
                         f'{sorted(features.keys())}')
    height, width, native_channels = features['image'].shape
    if native_channels not in (1, 3):
        raise ConfigError(f'TFDS dataset {name} has {native_channels}-channel images; need 1 or 3')
    variable_size = height is None or width is None or height != width
    shape = output_shape(settings, DEFAULT_IMAGE_SIZE if variable_size else height,
                         native_channels)
    split_names = {split: _tfds_split_name(builder, split) for split in SPLITS}
    counts = {split: builder.info.splits[tfds_split].num_examples
              for split, tfds_split in split_names.items()}

    def load(split: str) -> RecordSplit:
        source = _tfds_source(builder, split_names[split])
        logging.info('%s %s: %s records in TFDS %s', name, split, f'{len(source):,}',
                     builder.data_dir)
        return _tfds_record_split(name, source, split_names[split])

    label = features['label']
    info = DatasetInfo(name, label.num_classes, shape, counts['train'], counts['test'],
                       tuple(label.names))
    fingerprint = {'name': name, 'tfds': f'{builder.name}:{builder.version}',
                   'classes': list(label.names), **{split: {'count': counts[split]}
                                                    for split in SPLITS}}
    return Source(info, load, *imagenet_statistics(native_channels), native_channels,
                  variable_size, crop_padding=0 if variable_size else max(1, shape[0] // 8),
                  fingerprint=fingerprint)


