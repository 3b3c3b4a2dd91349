"""Checkpoints of a training run: an orbax CheckpointManager under `<workdir>/checkpoints`.

Every step directory holds three items:

  variables  {'params', 'batch_stats'}: all that evaluation and the symmetry tools need
  optimizer  {'step', 'opt_state', 'lr_scale'}: the rest of the training state
  config     the run's whole config, as JSON

A checkpoint that cannot be read (truncated or corrupt files) is skipped with a
warning in favour of the previous one; a writable store then moves it to
`<workdir>/corrupt_checkpoints/` so that training can save past it again.
"""

import json
import os
import shutil
from typing import Any, Callable, Mapping

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import orbax.checkpoint as ocp

CHECKPOINT_DIR = 'checkpoints'
CORRUPT_DIR = 'corrupt_checkpoints'
ARRAY_ITEMS = ('variables', 'optimizer')


def config_to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`config` as plain JSON data (tuples become lists, unset placeholders None)."""
    return json.loads(config.to_json_best_effort())


def config_from_json(data: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The inverse of `config_to_json`, with lists turned back into tuples."""

    def tuples(value):
        if isinstance(value, Mapping):
            return {key: tuples(item) for key, item in value.items()}
        if isinstance(value, list):
            return tuple(tuples(item) for item in value)
        return value

    return ml_collections.ConfigDict(tuples(data))


def has_checkpoints(workdir: str) -> bool:
    return os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR))


def _describe(error: Exception) -> str:
    return f'{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ""}'


class CheckpointStore:
    """Saves and restores the checkpoints of one workdir.

    `read_only=True` never writes to the workdir (used to inspect a workdir before
    deciding to train in it, and by `qhnet.train.restore_variables`).
    """

    def __init__(self, workdir: str, *, max_to_keep: int | None = None, read_only: bool = False):
        self.workdir = workdir
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, read_only=read_only, create=not read_only,
            cleanup_tmp_directories=not read_only)
        handlers = {name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS}
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={**handlers, 'config': ocp.JsonCheckpointHandler()})

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
        """Starts writing a checkpoint (asynchronously; `wait` or `close` to finish)."""
        self._manager.save(step, force=True, args=ocp.args.Composite(
            variables=ocp.args.StandardSave(variables),
            optimizer=ocp.args.StandardSave(optimizer),
            config=ocp.args.JsonSave(config_to_json(config))))

    def restore(self, abstract_items: Callable[[int], Mapping[str, Any]],
                warn: Callable[[int, str], None]) -> tuple[int, dict[str, Any]] | None:
        """Restores the items that `abstract_items(step)` describes (item name -> tree of
        jax.ShapeDtypeStruct with shardings) from the newest readable checkpoint:
        (step, items), or None when the workdir has no checkpoints.

        Unreadable newer checkpoints are reported through `warn(step, message)` and,
        in a writable store, moved aside. If no checkpoint reads back, nothing is moved
        (the cause is then more likely a different model than corruption) and this raises.
        """
        steps = self.steps()
        failures = []
        for step in steps:
            try:
                abstract = abstract_items(step)
                restored = self._manager.restore(step, args=ocp.args.Composite(**{
                    name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()}))
            except Exception as error:  # pylint: disable=broad-except
                failures.append((step, _describe(error)))
                continue
            for bad_step, reason in failures:
                warn(bad_step, f'checkpoint at step {bad_step} is unreadable ({reason}); '
                               f'falling back to step {step}')
                self._set_aside(bad_step)
            return step, {name: restored[name] for name in abstract}
        if failures:
            details = '\n'.join(f'  step {step}: {reason}' for step, reason in failures)
            raise RuntimeError(f'None of the checkpoints in {self.directory} could be restored '
                               f'(nothing was changed there):\n{details}')
        return None

    def _set_aside(self, step: int) -> None:
        if self.read_only:
            return
        if jax.process_index() == 0:
            destination = os.path.join(self.workdir, CORRUPT_DIR, str(step))
            if os.path.exists(destination):
                shutil.rmtree(destination)
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), destination)
            logging.warning('Moved the unreadable checkpoint to %s', destination)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f'qhnet_set_aside_checkpoint_{step}')
        self._manager.reload()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
