"""Feeding the devices: the mesh, host values made global arrays, and batches put on the
devices by a background thread ahead of the step that reads them."""

import queue
import threading
from typing import Any, Iterable, Iterator

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

PREFETCH_DEPTH = 2


def make_mesh(devices: Iterable[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis 'data' over `devices` (default: all devices of all hosts)."""
    return Mesh(np.asarray(list(devices or jax.devices())), ('data',))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis split over the mesh's 'data' axis."""
    return NamedSharding(mesh, PartitionSpec('data'))


def replicate(tree: Any, sharding: NamedSharding) -> Any:
    """`tree` (the same values on every process) as global arrays replicated by `sharding`.
    Unlike `jax.device_put`, this works when the mesh spans devices of other processes."""
    def put(x):
        if jax.dtypes.issubdtype(getattr(x, 'dtype', None), jax.dtypes.prng_key):
            # A computation on a multi-process array: finished here, so that every process
            # runs its collectives before any process starts the next (a checkpoint sync).
            return jax.block_until_ready(jax.random.wrap_key_data(
                put(jax.random.key_data(x)), impl=jax.random.key_impl(x)))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.tree.map(put, tree)


class DeviceBatches:
    """Iterates over global batches on the mesh, made from this process's numpy batches
    by a background thread that stays `depth` batches ahead. An exception of the host
    batches is raised where the batch it stopped would have been."""
    _END = object()

    def __init__(self, host_batches: Iterable[dict[str, np.ndarray]], sharding: NamedSharding,
                 depth: int = PREFETCH_DEPTH):
        self._queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(host_batches, sharding),
                                        daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, host_batches: Iterable[dict[str, np.ndarray]], sharding: NamedSharding) -> None:
        try:
            for batch in host_batches:
                global_batch = {key: jax.make_array_from_process_local_data(sharding, value)
                                for key, value in batch.items()}
                if not self._put(global_batch):
                    return
            self._put(self._END)
        except Exception as error:  # pylint: disable=broad-except
            self._put(error)
        finally:
            if hasattr(host_batches, 'close'):
                host_batches.close()

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        item = self._queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> 'DeviceBatches':
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
