"""Checkpoints of a training run: an orbax CheckpointManager under `<workdir>/checkpoints`.

Every step directory holds these items:

  variables  {'params', 'batch_stats'}: all that evaluation and the symmetry tools need
  optimizer  {'step', 'opt_state', 'lr_scale'}: the rest of the training state
  config     the run's whole config, as JSON
  dataset    the fingerprint of the data it was trained on (`qhnet.data.Dataset.fingerprint`)

Integrity. Every save is waited for, and then the SHA-256 digest of each of its files
is written to `<workdir>/checkpoint_digests/<step>.json`. A restore checks the files
against it first, so a checkpoint whose bytes changed after it was written (a flipped
block, a truncated file) is never loaded: like one that orbax cannot read, it is skipped
with a warning in favour of the previous one, and a writable store moves it (and its
digest) to `<workdir>/corrupt_checkpoints/` so that training can save past it again.
A checkpoint without a digest, where the others have one, is one whose save did not finish,
and is treated the same way. Where no checkpoint has one (`checkpoint_digests/` deleted),
nothing can be verified: the checkpoints are refused, and nothing is moved, unless the
store is asked to trust them (`trust_unverified=True`), and then restored with a warning.

A save that fails, e.g. on a full disk, raises `CheckpointWriteError`; what it wrote of
the new checkpoint is removed, and the checkpoints written before are left as they were.
A rollback that walks back past a checkpoint (its state broke down again) moves it to
`<workdir>/abandoned_checkpoints/`.
"""

import logging as std_logging
import os
import shutil
from typing import Any, Callable, Mapping, NamedTuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from qhnet import config as qhnet_config
from qhnet.training import integrity

CHECKPOINT_DIR = 'checkpoints'
CORRUPT_DIR = 'corrupt_checkpoints'
ABANDONED_DIR = 'abandoned_checkpoints'  # checkpoints a walk-back rollback went past
DIGEST_DIR = integrity.DIGEST_DIR
ARRAY_ITEMS = ('variables', 'optimizer')
JSON_ITEMS = ('config', 'dataset')


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the ones written before are intact."""


class CheckpointRestoreError(RuntimeError):
    """The workdir has checkpoints, but none of them reads back or can be verified; nothing
    was changed."""


class _DropReadOnlyNotices(std_logging.Filter):
    def filter(self, record: std_logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ('read_only=True' in message or 'is read only' in message)


def has_checkpoints(workdir: str) -> bool:
    return os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR))


class CheckpointStore:
    """Saves and restores the checkpoints of one workdir.

    `read_only=True` never writes to the workdir (used to inspect a workdir before
    deciding to train in it, and by `restore_variables`). `trust_unverified=True` restores
    checkpoints that have no digest at all (see the module docstring).
    """

    def __init__(self, workdir: str, *, max_to_keep: int | None = None, read_only: bool = False,
                 trust_unverified: bool = False):
        self.workdir = workdir
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        self.read_only = read_only
        self.trust_unverified = trust_unverified
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
                item_handlers={**handlers, **{name: ocp.JsonCheckpointHandler()
                                              for name in JSON_ITEMS}})
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
                return step, qhnet_config.from_json(restored['config'])
            except Exception as error:  # pylint: disable=broad-except
                logging.warning('Checkpoint at step %d in %s has an unreadable config (%s); '
                                'looking at the previous one.', step, self.directory,
                                integrity.describe(error))
        return None

    def dataset_fingerprint(self, step: int) -> dict[str, Any] | None:
        """The fingerprint of the data that checkpoint `step` was trained on, or None if it
        stored none (a checkpoint written by `save_variables`)."""
        if not os.path.isdir(os.path.join(self._step_dir(step), 'dataset')):
            return None
        restored = self._manager.restore(
            step, args=ocp.args.Composite(dataset=ocp.args.JsonRestore()))
        return restored['dataset']

    def variables_metadata(self, step: int) -> Any:
        """The saved `variables` tree of `step`, with shape and dtype at every leaf."""
        return self._manager.item_metadata(step)['variables'].tree

    def save(self, step: int, variables: Any, optimizer: Any, config: ml_collections.ConfigDict,
             dataset: dict[str, Any] | None = None) -> None:
        """Writes a checkpoint (with the data's fingerprint, if given) and its digest; returns
        once both are on disk."""
        existed = step in self.steps()
        items = dict(variables=ocp.args.StandardSave(variables),
                     optimizer=ocp.args.StandardSave(optimizer),
                     config=ocp.args.JsonSave(qhnet_config.to_json(config)))
        if dataset is not None:
            items['dataset'] = ocp.args.JsonSave(dataset)
        with integrity.orbax_errors_held() as held:
            try:
                self._manager.save(step, force=True, args=ocp.args.Composite(**items))
                self._manager.wait_until_finished()
                if jax.process_index() == 0:
                    integrity.write_digest(self.workdir, self._step_dir(step), step, self.steps())
            except Exception as error:  # pylint: disable=broad-except
                if not existed:
                    self._discard_unfinished(step)
                kept = [s for s in self.steps() if s != step]
                reason = ('the disk is full' if integrity.disk_full(error)
                          else integrity.describe(error))
                raise CheckpointWriteError(
                    f'could not write the checkpoint of step {step} to {self.directory}: '
                    f'{reason}. The checkpoints already there '
                    f'({", ".join(map(str, kept)) or "none"}) are intact; free some space (or '
                    'fix the cause) and run the same command again to resume from the newest '
                    'of them') from error
        for message in held:  # errors of a save that still succeeded: shown, briefly
            logging.warning('orbax reported while saving step %d: %s', step, message)

    def _discard_unfinished(self, step: int) -> None:
        """Removes what a failed save of `step` wrote (a checkpoint without its digest, a
        partial digest), so that the store lists only checkpoints whose saves finished."""
        if jax.process_index() == 0:
            shutil.rmtree(self._step_dir(step), ignore_errors=True)
            digest = integrity.digest_path(self.workdir, step)
            for path in (digest, digest + '.tmp'):
                if os.path.exists(path):
                    os.remove(path)
        self._manager.reload()

    def require_verifiable(self) -> None:
        """Raises CheckpointRestoreError if the store has checkpoints and no digest to verify
        any of them by, unless it was asked to trust them."""
        steps = self.steps()
        if steps and not integrity.has_digests(self.workdir) and not self.trust_unverified:
            raise CheckpointRestoreError(
                f'the checkpoints in {self.directory} (steps {", ".join(map(str, steps))}) have '
                f'no content digests ({os.path.join(self.workdir, DIGEST_DIR)} is missing or '
                'empty), so their bytes cannot be verified; nothing was changed. If you trust '
                'them, restore them anyway: --config.checkpoint.trust_unverified=True '
                '(qhnet.main), --trust_unverified (python -m qhnet.symmetry)')

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def restore(self, abstract_items: Callable[[int], Mapping[str, Any]],
                warn: Callable[[int, str], None],
                before: int | None = None) -> tuple[int, dict[str, Any]] | None:
        """Restores the items that `abstract_items(step)` describes (item name -> tree of
        jax.ShapeDtypeStruct with shardings) from the newest intact checkpoint, older than
        step `before` if given: (step, items), or None when there is no checkpoint.

        Corrupt newer checkpoints (digest mismatch, or unreadable) are reported through
        `warn(step, message)` and, in a writable store, moved aside. If none reads back,
        nothing is moved (the cause is then more likely a different model than corruption)
        and this raises; so it does if no checkpoint can be verified (no digests at all) and
        the store does not trust them.
        """
        steps = [step for step in self.steps() if before is None or step < before]
        self.require_verifiable()
        verifiable = integrity.has_digests(self.workdir)
        failures = []
        for step in steps:
            problem = (integrity.check_digest(self.workdir, self._step_dir(step), step)
                       if verifiable else None)
            if problem:
                failures.append((step, problem))
                continue
            try:
                abstract = abstract_items(step)
                restored = self._manager.restore(step, args=ocp.args.Composite(**{
                    name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()}))
            except Exception as error:  # pylint: disable=broad-except
                failures.append((step, integrity.describe(error)))
                continue
            if not verifiable:
                warn(step, f'checkpoint at step {step} has no content digest; restored '
                           'unverified, as trust_unverified asks')
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
        """Moves checkpoint `step` (and its digest) to `<workdir>/<into>/<step>` in one rename,
        so that nothing is half-moved; a read-only store, or one where the rename fails,
        leaves it where it is, with a warning."""
        if self.read_only:
            return
        if jax.process_index() == 0:
            destination = os.path.join(self.workdir, into, str(step))
            digest = integrity.digest_path(self.workdir, step)
            try:
                os.makedirs(os.path.dirname(destination), exist_ok=True)
                if os.path.exists(destination):
                    shutil.rmtree(destination)
                os.rename(self._step_dir(step), destination)
            except OSError as error:
                logging.warning('Could not move checkpoint %d to %s (%s); it stays in %s.', step,
                                destination, integrity.describe(error), self.directory)
            else:
                if os.path.exists(digest):
                    os.replace(digest, os.path.join(destination, 'digest.json'))
                logging.warning('Moved checkpoint %d to %s', step, destination)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f'qhnet_set_aside_checkpoint_{step}')
        self._manager.reload()

    def close(self) -> None:
        self._manager.close()


# Variables only: what evaluation, the symmetry tools and `config.init_from` read.

class Restored(NamedTuple):
    """What `restore_variables` read: the step it restored, the run's config, the variables."""
    step: int
    config: ml_collections.ConfigDict
    variables: dict[str, Any]


def restore_variables(workdir: str, trust_unverified: bool = False) -> Restored:
    """(step, config, {'params', 'batch_stats'}) of the newest readable checkpoint in `workdir`,
    on the default device: `step` is the checkpoint actually restored, after any fallback from
    unreadable newer ones. Reads only; never changes the workdir. `trust_unverified=True`
    restores checkpoints that have no content digest at all (`CheckpointStore`)."""
    if not has_checkpoints(workdir):
        raise CheckpointRestoreError(
            f'{workdir} has no checkpoints; point --workdir at the workdir of a training run')
    store = CheckpointStore(workdir, read_only=True, trust_unverified=trust_unverified)
    try:
        found = store.latest_config()
        if found is None:
            raise CheckpointRestoreError(
                f'no checkpoint in {workdir} has a readable config; point --workdir at the '
                'workdir of a training run')
        config = found[1]
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

        def abstract_variables(step: int) -> dict[str, Any]:
            return {'variables': jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                store.variables_metadata(step))}

        step, items = store.restore(abstract_variables,
                                    warn=lambda bad, message: logging.warning('%s', message))
    finally:
        store.close()
    logging.info('Restored the variables of step %d from %s', step, workdir)
    return Restored(step, config, items['variables'])


def save_variables(workdir: str, step: int, variables: dict[str, Any],
                   config: ml_collections.ConfigDict) -> None:
    """A checkpoint of `variables` and `config` only, no optimizer state, at `step` in
    `workdir`: what `restore_variables` reads and `config.init_from` starts from."""
    store = CheckpointStore(workdir)
    try:
        store.save(step, variables, {'step': np.asarray(step)}, config)
    finally:
        store.close()
