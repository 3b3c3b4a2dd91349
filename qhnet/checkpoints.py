"""Checkpoints of a training run: an orbax CheckpointManager under `<workdir>/checkpoints`.

Every step directory holds three items:

  variables  {'params', 'batch_stats'}: all that evaluation and the symmetry tools need
  optimizer  {'step', 'opt_state', 'lr_scale'}: the rest of the training state
  config     the run's whole config, as JSON

Integrity. Every save is waited for, and then the SHA-256 digest of each of its files
is written to `<workdir>/checkpoint_digests/<step>.json`. A restore checks the files
against it first, so a checkpoint whose bytes changed after it was written (a flipped
block, a truncated file) is never loaded: like one that orbax cannot read, it is skipped
with a warning in favour of the previous one, and a writable store moves it (and its
digest) to `<workdir>/corrupt_checkpoints/` so that training can save past it again.
A checkpoint without a digest is trusted only in a workdir that has none at all (one
written before digests existed).

A save that fails, e.g. on a full disk, raises `CheckpointWriteError`; what it wrote of
the new checkpoint is removed, and the checkpoints written before are left as they were.
A rollback that walks back past a checkpoint (its state broke down again) moves it to
`<workdir>/abandoned_checkpoints/`.
"""

import errno
import hashlib
import json
import logging as std_logging
import os
import shutil
import sys
import threading
import warnings
from typing import Any, Callable, Mapping

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import orbax.checkpoint as ocp

from qhnet import config as qhnet_config

CHECKPOINT_DIR = 'checkpoints'
CORRUPT_DIR = 'corrupt_checkpoints'
ABANDONED_DIR = 'abandoned_checkpoints'  # checkpoints a walk-back rollback went past
DIGEST_DIR = 'checkpoint_digests'
ARRAY_ITEMS = ('variables', 'optimizer')
ITEMS = ARRAY_ITEMS + ('config',)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the ones written before are intact."""


class CheckpointRestoreError(RuntimeError):
    """The workdir has checkpoints, but none of them reads back; nothing was changed."""


def config_to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`config` as plain JSON data (tuples become lists, unset placeholders None)."""
    return json.loads(config.to_json_best_effort())


def config_from_json(data: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The inverse of `config_to_json`, with lists turned back into tuples. Keys added to
    the config schema after the checkpoint was written get their default (all None: they
    leave an older run's function as it was)."""
    def tuples(value):
        if isinstance(value, Mapping):
            return {key: tuples(item) for key, item in value.items()}
        if isinstance(value, list):
            return tuple(tuples(item) for item in value)
        return value

    def with_new_keys(stored: dict, schema: ml_collections.ConfigDict) -> dict:
        for key in schema.keys():
            if key not in stored and schema[key] is None:
                stored[key] = None
            elif isinstance(stored.get(key), dict) and isinstance(schema[key],
                                                                  ml_collections.ConfigDict):
                with_new_keys(stored[key], schema[key])
        return stored

    return ml_collections.ConfigDict(with_new_keys(tuples(data), qhnet_config.get_config()))


class _DropReadOnlyNotices(std_logging.Filter):
    def filter(self, record: std_logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ('read_only=True' in message or 'is read only' in message)


class _HoldOrbaxErrors(std_logging.Filter):
    """Holds back what orbax's background threads report while a save runs (error records and
    uncaught exceptions, a traceback each): a failed save is reported once, by
    CheckpointWriteError. `hold()` before the save installs it; `release()` after a save that
    succeeded restores the hooks. After a failed save it stays installed: orbax's threads keep
    failing until the process exits."""

    def __init__(self):
        super().__init__()
        self.held: list[str] = []
        self._hooks = (sys.excepthook, threading.excepthook, sys.unraisablehook)

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno >= std_logging.ERROR and ('/orbax/' in record.pathname
                                                    or record.name == 'asyncio'):
            self.held.append(record.getMessage().splitlines()[0])
            return False
        return True

    def _hold_exception(self, *args) -> None:
        error = getattr(args[0], 'exc_value', None) if len(args) == 1 else args[1]
        self.held.append(_describe(error) if isinstance(error, BaseException) else str(args))

    def hold(self) -> None:
        for name in ('absl', 'asyncio'):
            std_logging.getLogger(name).addFilter(self)
        sys.excepthook = threading.excepthook = sys.unraisablehook = self._hold_exception

    def release(self) -> None:
        for name in ('absl', 'asyncio'):
            std_logging.getLogger(name).removeFilter(self)
        sys.excepthook, threading.excepthook, sys.unraisablehook = self._hooks


def has_checkpoints(workdir: str) -> bool:
    return os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR))


def _describe(error: Exception) -> str:
    return f'{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ""}'


def file_digests(step_dir: str) -> dict[str, str]:
    """{path relative to `step_dir`: SHA-256} of every file of the checkpoint's items."""
    digests = {}
    for item in ITEMS:
        for root, _, files in os.walk(os.path.join(step_dir, item)):
            for name in files:
                path = os.path.join(root, name)
                sha = hashlib.sha256()
                with open(path, 'rb') as f:
                    for chunk in iter(lambda: f.read(1 << 20), b''):
                        sha.update(chunk)
                digests[os.path.relpath(path, step_dir)] = sha.hexdigest()
    return dict(sorted(digests.items()))


def _disk_full(error: BaseException) -> bool:
    while error is not None:
        if getattr(error, 'errno', None) == errno.ENOSPC or 'No space left' in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


class CheckpointStore:
    """Saves and restores the checkpoints of one workdir.

    `read_only=True` never writes to the workdir (used to inspect a workdir before
    deciding to train in it, and by `qhnet.train.restore_variables`).
    """

    def __init__(self, workdir: str, *, max_to_keep: int | None = None, read_only: bool = False):
        self.workdir = workdir
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        self.read_only = read_only
        handlers = {name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS}
        # A read-only manager announces itself with two warnings; here it is read-only on purpose.
        quiet = _DropReadOnlyNotices()
        std_logging.getLogger('absl').addFilter(quiet)
        try:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, read_only=read_only, create=not read_only,
                cleanup_tmp_directories=not read_only)
            self._manager = ocp.CheckpointManager(
                self.directory, options=options,
                item_handlers={**handlers, 'config': ocp.JsonCheckpointHandler()})
        finally:
            std_logging.getLogger('absl').removeFilter(quiet)

    def steps(self) -> list[int]:
        """Saved steps, newest first."""
        return sorted(self._manager.all_steps(), reverse=True)

    def latest_config(self) -> tuple[int, ml_collections.ConfigDict] | None:
        """(step, config) of the newest checkpoint whose config reads back, or None."""
        for step in self.steps():
            try:
                restored = self._manager.restore(
                    step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
                return step, config_from_json(restored['config'])
            except Exception as error:  # pylint: disable=broad-except
                logging.warning('Checkpoint at step %d in %s has an unreadable config (%s); '
                                'looking at the previous one.', step, self.directory, _describe(error))
        return None

    def variables_metadata(self, step: int) -> Any:
        """The saved `variables` tree of `step`, with shape and dtype at every leaf."""
        return self._manager.item_metadata(step)['variables'].tree

    def save(self, step: int, variables: Any, optimizer: Any,
             config: ml_collections.ConfigDict) -> None:
        """Writes a checkpoint and its digest; returns once both are on disk."""
        existed = step in self.steps()
        held = _HoldOrbaxErrors()
        held.hold()
        try:
            self._manager.save(step, force=True, args=ocp.args.Composite(
                variables=ocp.args.StandardSave(variables),
                optimizer=ocp.args.StandardSave(optimizer),
                config=ocp.args.JsonSave(config_to_json(config))))
            self._manager.wait_until_finished()
            if jax.process_index() == 0:
                self._write_digest(step)
        except Exception as error:  # pylint: disable=broad-except
            # The failed save leaves orbax's write coroutines unawaited; Python would warn of
            # each as the process exits, after the one-line error.
            warnings.filterwarnings('ignore', message="coroutine '.*' was never awaited",
                                    category=RuntimeWarning)
            if not existed:
                self._discard_unfinished(step)
            kept = [s for s in self.steps() if s != step]
            reason = 'the disk is full' if _disk_full(error) else _describe(error)
            raise CheckpointWriteError(
                f'could not write the checkpoint of step {step} to {self.directory}: {reason}. '
                f'The checkpoints already there ({", ".join(map(str, kept)) or "none"}) are '
                'intact; free some space (or fix the cause) and run the same command again to '
                'resume from the newest of them') from error
        held.release()
        for message in held.held:  # errors of a save that still succeeded: shown, briefly
            logging.warning('orbax reported while saving step %d: %s', step, message)

    def _discard_unfinished(self, step: int) -> None:
        """Removes what a failed save of `step` wrote (a checkpoint without its digest, a
        partial digest), so that the store lists only checkpoints whose saves finished."""
        if jax.process_index() == 0:
            shutil.rmtree(os.path.join(self.directory, str(step)), ignore_errors=True)
            for path in (self._digest_path(step), self._digest_path(step) + '.tmp'):
                if os.path.exists(path):
                    os.remove(path)
        self._manager.reload()

    def _digest_path(self, step: int) -> str:
        return os.path.join(self.workdir, DIGEST_DIR, f'{step}.json')

    def _write_digest(self, step: int) -> None:
        digest_dir = os.path.join(self.workdir, DIGEST_DIR)
        os.makedirs(digest_dir, exist_ok=True)
        path = self._digest_path(step)
        with open(path + '.tmp', 'w', encoding='utf-8') as f:
            json.dump({'step': step, 'sha256': file_digests(os.path.join(self.directory, str(step)))},
                      f, indent=1)
        os.replace(path + '.tmp', path)
        kept = {f'{s}.json' for s in self.steps()}
        for name in os.listdir(digest_dir):  # digests of checkpoints that max_to_keep removed
            if name.endswith('.json') and name not in kept:
                os.remove(os.path.join(digest_dir, name))

    def check_digest(self, step: int) -> str | None:
        """None if the files of `step` are the ones that were written, else what differs."""
        path = self._digest_path(step)
        if not os.path.exists(path):
            digest_dir = os.path.join(self.workdir, DIGEST_DIR)
            if os.path.isdir(digest_dir) and any(n.endswith('.json') for n in os.listdir(digest_dir)):
                return 'it has no content digest (its save did not finish)'
            return None  # a workdir written before digests existed
        try:
            with open(path, encoding='utf-8') as f:
                expected = json.load(f)['sha256']
        except (OSError, ValueError, KeyError) as error:
            return f'its digest file {path} is unreadable ({_describe(error)})'
        actual = file_digests(os.path.join(self.directory, str(step)))
        changed = sorted(name for name in expected.keys() | actual.keys()
                         if expected.get(name) != actual.get(name))
        if changed:
            more = f' and {len(changed) - 1} more' if len(changed) > 1 else ''
            return (f'content digest mismatch in {changed[0]}{more}: the files changed after '
                    'they were written')
        return None

    def restore(self, abstract_items: Callable[[int], Mapping[str, Any]],
                warn: Callable[[int, str], None],
                before: int | None = None) -> tuple[int, dict[str, Any]] | None:
        """Restores the items that `abstract_items(step)` describes (item name -> tree of
        jax.ShapeDtypeStruct with shardings) from the newest intact checkpoint, older than
        step `before` if given: (step, items), or None when there is no checkpoint.

        Corrupt newer checkpoints (digest mismatch, or unreadable) are reported through
        `warn(step, message)` and, in a writable store, moved aside. If none reads back,
        nothing is moved (the cause is then more likely a different model than corruption)
        and this raises.
        """
        steps = [step for step in self.steps() if before is None or step < before]
        failures = []
        for step in steps:
            problem = self.check_digest(step)
            if problem:
                failures.append((step, problem))
                continue
            try:
                abstract = abstract_items(step)
                restored = self._manager.restore(step, args=ocp.args.Composite(**{
                    name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()}))
            except Exception as error:  # pylint: disable=broad-except
                failures.append((step, _describe(error)))
                continue
            for bad_step, reason in failures:
                warn(bad_step, f'checkpoint at step {bad_step} is corrupt ({reason}); '
                               f'falling back to step {step}')
                self.set_aside(bad_step, CORRUPT_DIR)
            return step, {name: restored[name] for name in abstract}
        if failures:
            details = '; '.join(f'step {step}: {reason}' for step, reason in failures)
            raise CheckpointRestoreError(
                f'none of the checkpoints in {self.directory} could be restored ({details}); '
                'nothing was changed there. If the model changed since they were written, use '
                'another --workdir')
        return None

    def set_aside(self, step: int, into: str) -> None:
        """Moves checkpoint `step` (and its digest) to `<workdir>/<into>/<step>`; a read-only
        store leaves it where it is."""
        if self.read_only:
            return
        if jax.process_index() == 0:
            destination = os.path.join(self.workdir, into, str(step))
            if os.path.exists(destination):
                shutil.rmtree(destination)
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), destination)
            if os.path.exists(self._digest_path(step)):
                shutil.move(self._digest_path(step), os.path.join(destination, 'digest.json'))
            logging.warning('Moved checkpoint %d to %s', step, destination)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f'qhnet_set_aside_checkpoint_{step}')
        self._manager.reload()

    def close(self) -> None:
        self._manager.close()
