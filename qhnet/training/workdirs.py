"""The workdir of a run: that it can hold one (writable, with its files of the right kinds),
that the checkpoints already in it belong to the same experiment (an identity check that reads
only, of the config and of the dataset's fingerprint), and a lock that keeps a second run out.
"""

import contextlib
import datetime
import fcntl
import json
import os
import socket
import tempfile
from typing import Any, Iterator

from absl import logging

import jax
import ml_collections

from qhnet import config as qhnet_config
from qhnet.training import checkpoints

# Config fields that fix what the parameters mean and how they were reached (the model,
# the data, the schedule, the random stream): a workdir holding a checkpoint that differs
# in any of them belongs to another experiment, and resuming it would mix two runs. Model
# fields that change only how the function is computed are not among them.
IDENTITY_FIELDS = ('model', 'data.name', 'data.image_size', 'data.channels', 'data.class_list',
                   'data.augment', 'data.rand_augment', 'data.rand_augment_magnitude',
                   'data.rand_augment_std', 'data.erasing', 'data.erasing_count', 'seed',
                   'batch_size', 'num_epochs', 'num_train_steps', 'optimizer', 'label_smoothing')
COMPUTE_ONLY_MODEL_FIELDS = ('dtype', 'remat', 'derivative_impl', 'block_impl')


class IncompatibleWorkdirError(ValueError):
    """The workdir holds checkpoints of another experiment; nothing in it was changed."""


class WorkdirError(ValueError):
    """The workdir cannot hold a run: not a directory, not writable, or a file of the wrong
    kind where a run keeps its records."""


class WorkdirLockedError(WorkdirError):
    """Another process is training in the workdir."""


LOCK_FILE = 'run.lock'
# What a run keeps in its workdir, and whether each is a file or a directory.
_LAYOUT = {'checkpoints': 'directory', 'checkpoint_digests': 'directory',
           'corrupt_checkpoints': 'directory', 'abandoned_checkpoints': 'directory',
           'tensorboard': 'directory', 'metrics.jsonl': 'file', 'summary.json': 'file',
           'curves.png': 'file', LOCK_FILE: 'file'}
# Of those, what a run writes into (a read-only one fails at the first save, an epoch later).
_WRITTEN = ('checkpoints', 'checkpoint_digests', 'tensorboard', 'metrics.jsonl')


def identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The IDENTITY_FIELDS of `config`, flattened to 'section.key' -> JSON value."""
    flat = {}
    for field in IDENTITY_FIELDS:
        section, _, key = field.partition('.')
        value = config[section][key] if key else config[section]
        if isinstance(value, ml_collections.ConfigDict):
            items = {f'{field}.{name}': item
                     for name, item in qhnet_config.to_json(value).items()}
        else:
            items = {field: json.loads(json.dumps(value))}
        for name, item in items.items():
            if name.removeprefix('model.') not in COMPUTE_ONLY_MODEL_FIELDS:
                flat[name] = item
    return flat


def differing(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """The names, sorted, whose values differ between two flat records (`identity`,
    `leaf_shapes`); a name only one of them has differs."""
    return [name for name in sorted(set(ours) | set(theirs)) if ours.get(name) != theirs.get(name)]


def leaf_shapes(tree) -> dict[str, tuple]:
    """'params/a/b' -> (shape, dtype) of every leaf of a nested dict of arrays."""
    return {'/'.join(str(getattr(k, 'key', k)) for k in path): (leaf.shape, str(leaf.dtype))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_workdir(workdir: str, config: ml_collections.ConfigDict,
                  dataset: dict[str, Any] | None = None) -> None:
    """Raises IncompatibleWorkdirError if `workdir` holds a checkpoint of a different
    experiment: another model, recipe or seed (`identity`), or another dataset (its
    `fingerprint`, where the checkpoint stored one); CheckpointRestoreError if none of its
    checkpoints can be verified (`CheckpointStore.require_verifiable`). Reads only."""
    if not checkpoints.has_checkpoints(workdir):
        return
    store = checkpoints.CheckpointStore(workdir, read_only=True,
                                        trust_unverified=config.checkpoint.trust_unverified)
    try:
        store.require_verifiable()
        found = store.latest_config()
        stored_dataset = store.dataset_fingerprint(found[0]) if found else None
    finally:
        store.close()
    if found is None:
        return
    step, saved = found
    ours, theirs = identity(config), identity(saved)
    if dataset is not None and stored_dataset is not None:
        ours.update(_flat('dataset', dataset))
        theirs.update(_flat('dataset', stored_dataset))
    differences = [f'  {name}: checkpoint has {theirs.get(name)!r}, config has {ours.get(name)!r}'
                   for name in differing(ours, theirs)]
    if differences:
        raise IncompatibleWorkdirError(
            f'{workdir} holds a checkpoint (step {step}) of a different experiment:\n'
            + '\n'.join(differences)
            + f'\nNothing in {workdir} was changed. Pick another --workdir, or delete that one '
              'to start over.')


def _flat(prefix: str, tree: Any) -> dict[str, Any]:
    if isinstance(tree, dict):
        return {name: value for key, item in tree.items()
                for name, value in _flat(f'{prefix}.{key}', item).items()}
    return {prefix: json.loads(json.dumps(tree))}


def prepare_workdir(workdir: str) -> None:
    """Creates `workdir` if needed and checks that a run can keep its records there: the
    workdir and what the run writes into are writable, and each of its files and folders is
    of the right kind. Raises WorkdirError naming the problem otherwise."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f'--workdir={workdir} is a file, not a directory; pick a directory')
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as error:
        raise WorkdirError(f'cannot write to --workdir={workdir} ({error.strerror or error}); '
                           'pick a writable directory') from error
    for name, kind in _LAYOUT.items():
        path = os.path.join(workdir, name)
        if os.path.lexists(path) and os.path.isdir(path) != (kind == 'directory'):
            raise WorkdirError(f'{path} should be a {kind}, and it is not; a run keeps its '
                               f'{name} there. Move it out of the way, or pick another --workdir')
        if name in _WRITTEN and os.path.exists(path) and not _writable(path):
            raise WorkdirError(f'{path} is not writable, and the run writes there; make it '
                               'writable, or pick another --workdir')


def _writable(path: str) -> bool:
    """Whether a file can be created in the folder `path`, or the file `path` appended to
    (tried, not inferred from the mode bits, which root ignores and a read-only mount
    overrides)."""
    try:
        if os.path.isdir(path):
            with tempfile.TemporaryFile(dir=path):
                pass
        else:
            with open(path, 'a', encoding='utf-8'):
                pass
        return True
    except OSError:
        return False


@contextlib.contextmanager
def locked(workdir: str) -> Iterator[None]:
    """Holds an advisory lock on `<workdir>/run.lock` (fcntl.flock) while the run trains: a
    second run in the same workdir gets WorkdirLockedError naming the holder. The lock dies
    with its process, so a run that was killed leaves one that the next run takes over."""
    path = os.path.join(workdir, LOCK_FILE)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirLockedError(
                f'another run is training in --workdir={workdir} ({_holder(descriptor)}); wait '
                'for it to end (or stop it), or pick another --workdir') from None
        stale = _holder(descriptor, default='')
        if stale:
            logging.info('Took over the lock of a run that ended without releasing it (%s).',
                         stale)
        record = {'pid': os.getpid(), 'host': socket.gethostname(),
                  'since': datetime.datetime.now().isoformat(timespec='seconds')}
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(record).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(descriptor, 0)
    finally:
        os.close(descriptor)  # releases the lock


def _holder(descriptor: int, default: str = 'a process that did not say which') -> str:
    try:
        record = json.loads(os.pread(descriptor, 4096, 0) or b'null')
        return f'process {record["pid"]} on {record["host"]}, since {record["since"]}'
    except (OSError, ValueError, TypeError, KeyError):
        return default
