"""Streams of batches on grain: which example each row of a batch holds (`Plan`), the map
functions that make batches of in-memory and of encoded splits, and the grain iterator."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
from typing import Iterator

from absl import flags
import grain
import numpy as np

from qhnet.data import transforms
from qhnet.data.core import ArraySplit, RecordSplit

_PREFETCH_BATCHES = 2
_THREADS_WITHOUT_WORKERS = 2
ENDLESS = 2**40  # steps of a training stream


@dataclasses.dataclass(frozen=True)
class Plan:
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
    rng = np.random.default_rng((seed, transforms.SHUFFLE_STREAM, epoch))
    return rng.permutation(num_examples)


@dataclasses.dataclass(frozen=True)
class _Batch:
    """The rows of one process's batch."""
    indices: np.ndarray  # int [B], example index in the split (0 on padding rows)
    positions: np.ndarray  # int [B], position in the global stream
    mask: np.ndarray | None  # float32 [B] on eval, None in training


@dataclasses.dataclass(frozen=True)
class ArrayBatches:
    """Batch `step` of an in-memory split, augmented batch-wise (grain map function)."""
    split: ArraySplit
    plan: Plan
    transform: transforms.Transform

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        batch = self.plan.batch(step)
        pixels = self.split.images[batch.indices]
        transform = self.transform
        if transform.augment and transform.crop_padding:
            pixels = transforms.pad_crop_flip(
                pixels, transforms.hash_bits(transform.seed, batch.positions),
                transform.crop_padding)
        real = np.ones(len(pixels), bool) if batch.mask is None else batch.mask > 0
        if transform.rand_augment or transform.erasing:
            examples = [transform.finish(image, int(position), bool(keep))
                        for image, position, keep in zip(pixels, batch.positions, real)]
            out = stack(examples)
        else:
            if pixels.shape[-1] != transform.channels:
                pixels = np.repeat(pixels, transform.channels, axis=-1)
            out = {'image': np.where(real[:, None, None, None], pixels, 0).astype(np.uint8)}
        out['label'] = np.where(real, self.split.labels[batch.indices], 0).astype(np.int32)
        if batch.mask is not None:
            out['mask'] = batch.mask
        return out


@dataclasses.dataclass(frozen=True)
class RecordExamples:
    """Row `row` of a split of encoded images, decoded and augmented (grain map function)."""
    split: RecordSplit
    plan: Plan
    transform: transforms.Transform

    def __call__(self, row: int) -> dict[str, np.ndarray]:
        index, position, real = self.plan.example(row)
        transform = self.transform
        if real:
            data, label = self.split.read(index)
            pixels = transform.decode(data, position, lambda: self.split.describe(index))
        else:
            label = 0
            pixels = np.zeros((transform.size, transform.size, transform.native_channels),
                              np.uint8)
        example = transform.finish(pixels, position, real)
        example['label'] = np.int32(label)
        if not self.plan.train:
            example['mask'] = np.float32(real)
        return example


def stack(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.stack([example[key] for example in examples]) for key in examples[0]}


def batches(dataset: grain.MapDataset, num_workers: int) -> Iterator[dict[str, np.ndarray]]:
    """Iterates over `dataset` (batches), `_PREFETCH_BATCHES` ahead, decoded by `num_workers`
    grain worker processes (0: threads of this process); closes the workers when done."""
    stream = dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=1 if num_workers else _THREADS_WITHOUT_WORKERS,
        prefetch_buffer_size=_PREFETCH_BATCHES))
    if num_workers:
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=_PREFETCH_BATCHES))
    iterator = None
    try:
        with _starting_workers(num_workers):
            iterator = iter(stream)
            batch = next(iterator, None)
        while batch is not None:  # workers' batches live in shared memory: copied out at once
            yield {key: np.array(value) for key, value in batch.items()}
            batch = next(iterator, None)
    finally:
        if iterator is not None:
            iterator.close()


@contextlib.contextmanager
def _starting_workers(num_workers: int) -> Iterator[None]:
    """What grain's worker processes need while they start, undone afterwards.

    grain reads absl flags when it starts workers, and a library caller (a notebook, a test)
    may not have parsed them: they count as parsed (at their defaults) until the workers run.
    Closing the workers can leave a batch or two of shared memory in flight, which
    multiprocessing's resource tracker frees at exit with a warning each time; the tracker
    starts with the first workers and takes `sys.warnoptions` then, so that one warning is
    ignored there, in the tracker only.
    """
    if not num_workers:
        yield
        return
    parsed = flags.FLAGS.is_parsed()
    option = 'ignore:resource_tracker:UserWarning:multiprocessing.resource_tracker'
    added = option not in sys.warnoptions
    if not parsed:
        flags.FLAGS.mark_as_parsed()
    if added:
        sys.warnoptions.append(option)
    try:
        yield
    finally:
        if added:
            sys.warnoptions.remove(option)
        if not parsed:
            flags.FLAGS.unparse_flags()
