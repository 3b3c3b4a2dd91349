"""Training and evaluation of every model that `qhnet.config` describes, on one device or many.

`train_and_evaluate(config, workdir)` runs the paper's recipe (SGD with momentum,
linear warmup then cosine decay, weight decay, label smoothing; see
qhnet/config.py) under `jax.jit` over a `Mesh` of all devices: each global
batch is sharded over the mesh's 'data' axis, parameters and optimizer state are
replicated. It evaluates top-1, top-5 and loss on the test split after every
epoch, saves orbax checkpoints (periodic, per epoch, final; the newest
`checkpoint.max_to_keep` kept) and resumes from the newest one in `workdir`.

Breakdown guard: the paper reports runs whose loss turns NaN and never recovers,
fixed by hand by resuming from before the failure with a lower learning rate.
Here `train_step` flags a non-finite loss or gradient and leaves the state as it
was; the host then rolls back to the last checkpoint (only finite states are ever
saved) and continues with the learning rate multiplied by
`config.breakdown.lr_factor`, giving up after `config.breakdown.max_retries`
rollbacks. Every such event is logged and recorded in `metrics.jsonl`.

Other tools read a run back with `checkpoints.restore_variables(workdir)` and score
variables with `evaluation.evaluate(config, variables)`.
"""

import dataclasses
import json
import math
import os
import time
from typing import Any, Iterator

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from qhnet import config as qhnet_config
from qhnet import data, models
from qhnet.training import checkpoints, evaluation, feeding, metrics, preflight, recipe
from qhnet.training import workdirs
from qhnet.training.steps import TrainState, create_train_state, jit_train_step, model_inputs

SUMMARY_FILE = 'summary.json'


class TrainingDivergedError(RuntimeError):
    """The loss or gradient stayed non-finite through every allowed rollback."""


@dataclasses.dataclass
class _NonFiniteStep(Exception):
    step: int
    metrics: dict[str, float]


class TrainingRun:
    """The state of one `train_and_evaluate` call: compiled steps, checkpoints, writers."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, dataset: data.Dataset):
        self.config = config
        self.workdir = workdir
        self.dataset = dataset
        self.info = info = dataset.info
        self.model = models.build(config.model)
        self.mesh = feeding.make_mesh()
        self.replicated = feeding.replicated(self.mesh)
        self.steps_per_epoch = recipe.steps_per_epoch(config, info.num_train)
        self.total_steps = recipe.total_train_steps(config, self.steps_per_epoch)
        self.schedule = recipe.learning_rate_schedule(config, self.steps_per_epoch,
                                                      self.total_steps)
        self.optimizer = recipe.make_optimizer(config, self.schedule)
        self.train_step = jit_train_step(
            self.mesh, model=self.model, optimizer=self.optimizer, schedule=self.schedule,
            label_smoothing=config.label_smoothing, inputs=model_inputs(info))
        self.eval_step = evaluation.jit_eval_step(self.mesh, evaluation.eval_logits(self.model),
                                                  info)
        init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
        self.init_rng = init_rng
        self.dropout_rng = feeding.replicate(dropout_rng, self.replicated)
        self.is_chief = jax.process_index() == 0
        self.store = checkpoints.CheckpointStore(
            workdir, max_to_keep=config.checkpoint.max_to_keep,
            trust_unverified=config.checkpoint.trust_unverified)
        self.writer = metrics.MetricWriter(workdir, enabled=self.is_chief)
        self.rollbacks = 0
        self.rollback_step: int | None = None  # the checkpoint the last rollback restored
        self.lr_scale = 1.0
        self.images_trained = 0
        self.train_seconds = 0.0
        self.last_eval: dict[str, float] = {}

    # Checkpoints.

    def _abstract_items(self) -> dict[str, Any]:
        abstract = jax.eval_shape(self._create_state, self.init_rng)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated), abstract)
        return self._items(abstract)

    @staticmethod
    def _items(state: TrainState) -> dict[str, Any]:
        return {'variables': state.variables(),
                'optimizer': {'step': state.step, 'opt_state': state.opt_state,
                              'lr_scale': state.lr_scale}}

    def _create_state(self, rng: jax.Array) -> TrainState:
        return create_train_state(self.model, self.optimizer, self.info.image_shape, rng)

    def _save(self, state: TrainState, step: int) -> None:
        items = self._items(state)
        self.store.save(step, items['variables'], items['optimizer'], self.config,
                        self.dataset.fingerprint)

    def _restore(self, before: int | None = None) -> TrainState | None:
        abstract = self._abstract_items()
        restored = self.store.restore(
            lambda step: abstract,
            warn=lambda step, message: self.writer.event(step, 'corrupt_checkpoint', message),
            before=before)
        if restored is None:
            return None
        _, items = restored
        optimizer = items['optimizer']
        self.lr_scale = float(optimizer['lr_scale'])
        return TrainState(step=optimizer['step'], params=items['variables']['params'],
                          batch_stats=items['variables']['batch_stats'],
                          opt_state=optimizer['opt_state'], lr_scale=optimizer['lr_scale'])

    def initial_state(self) -> TrainState:
        state = self._restore()
        if state is not None:
            step = int(state.step)
            self.writer.supersede_after(step)
            self.writer.event(step, 'resume', f'resumed from the checkpoint at step {step} in '
                              f'{self.store.directory} (learning-rate scale {self.lr_scale:g})',
                              warning=False)
            evaluated = step % self.steps_per_epoch == 0 or step == self.total_steps
            if step > 0 and evaluated and not self.writer.has_scalars(step, 'test'):
                logging.info('The checkpoint of step %d ends an epoch whose evaluation was not '
                             'recorded (the run stopped in between): evaluating it first.', step)
                self.log_eval(step, state)
            return state
        state = jax.jit(self._create_state, out_shardings=self.replicated)(self.init_rng)
        if self.config.init_from is not None:
            state = self._initialised_from(state, self.config.init_from)
        num_params = sum(x.size for x in jax.tree.leaves(state.params))
        logging.info('Initialised %s (%s parameters); saving step 0 as the first rollback target.',
                     self.config.model.name, f'{num_params:,}')
        self._save(state, 0)  # a workdir that cannot hold checkpoints fails here, before training
        return state

    def _initialised_from(self, state: TrainState, workdir: str) -> TrainState:
        """`state` with the variables of the newest checkpoint in `workdir` (config.init_from;
        `preflight` checked that they are exactly this model's)."""
        step, _, variables = checkpoints.restore_variables(
            workdir, trust_unverified=self.config.checkpoint.trust_unverified)
        variables = feeding.replicate(variables, self.replicated)
        logging.info('Variables from step %d of %s (config.init_from); a fresh optimizer.', step,
                     workdir)
        return state.replace(params=variables['params'], batch_stats=variables['batch_stats'])

    # Data.

    def host_batches(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
        """This process's batches for the updates start_step + 1, start_step + 2, ..."""
        return self.dataset.batches(
            'train', batch_size=self.config.batch_size // jax.process_count(),
            seed=self.config.seed, train=True, start_step=start_step,
            process_index=jax.process_index(), process_count=jax.process_count())

    # The loop.

    def train(self) -> TrainState:
        state = self.initial_state()
        while True:
            try:
                return self._train_from(state)
            except _NonFiniteStep as breakdown:
                state = self._roll_back(breakdown)

    @staticmethod
    def _checked(pending: list[tuple[int, dict[str, jax.Array]]]) -> list[dict[str, float]]:
        """The metrics of the updates in `pending`, read from the devices at once; raises
        _NonFiniteStep at the first that was not finite (it and the later ones were not
        saved: the run rolls back to a checkpoint from before them)."""
        window = []
        for step, values in jax.device_get(pending):
            values = {name: float(value) for name, value in values.items()}
            if not values.pop('finite'):
                raise _NonFiniteStep(step, values)
            window.append(values)
        return window

    def _roll_back(self, breakdown: _NonFiniteStep) -> TrainState:
        self.rollbacks += 1
        max_retries = self.config.breakdown.max_retries
        loss, grad_norm = breakdown.metrics['loss'], breakdown.metrics['grad_norm']
        found = (f'non-finite loss or gradient at step {breakdown.step} (loss {loss:g}, '
                 f'gradient norm {grad_norm:g})')
        if self.rollbacks > max_retries:
            self.writer.event(breakdown.step, 'breakdown', f'{found}; giving up after '
                              f'{max_retries} rollbacks', rollbacks=max_retries)
            raise TrainingDivergedError(
                f'Training broke down: {found}, and {max_retries} rollbacks with the learning '
                f'rate multiplied by {self.config.breakdown.lr_factor} each did not get past it. '
                f'The last good checkpoint is in {self.store.directory}. Try a lower '
                '--config.optimizer.base_lr, a clipping activation (hardtanh, hardball, softball), '
                'or more --config.breakdown.max_retries.')
        lr_scale = self.lr_scale * self.config.breakdown.lr_factor
        # A run that breaks down again before saving past its last rollback walks back further:
        # that checkpoint itself may be what breaks down. It is set aside, not deleted. With no
        # older checkpoint left, the oldest is retried (at the lower learning rate).
        newest = next(iter(self.store.steps()), None)
        state = None
        if newest is not None and newest == self.rollback_step:
            state = self._restore(before=newest)
            if state is not None:
                self.store.set_aside(newest, checkpoints.ABANDONED_DIR)
        state = state or self._restore()
        self.rollback_step = int(state.step)
        self.writer.supersede_after(self.rollback_step)
        self.lr_scale = lr_scale
        state = state.replace(
            lr_scale=feeding.replicate(jnp.float32(self.lr_scale), self.replicated))
        self.writer.event(
            breakdown.step, 'rollback',
            f'{found}; rolled back to step {int(state.step)} with the learning rate scaled by '
            f'{self.lr_scale:g} (rollback {self.rollbacks} of at most {max_retries})',
            restored_step=int(state.step), lr_scale=self.lr_scale, rollbacks=self.rollbacks)
        return state

    def _train_from(self, state: TrainState) -> TrainState:
        config = self.config
        step = int(state.step)
        progress = tqdm.tqdm(
            total=self.total_steps * config.batch_size, initial=step * config.batch_size,
            unit='img', unit_scale=True, dynamic_ncols=True,
            disable=not (self.is_chief and config.progress_bar))
        batches = feeding.DeviceBatches(self.host_batches(step),
                                         feeding.batch_sharded(self.mesh))
        # (step, metrics) of the updates since the last log, left on the devices until then:
        # no step waits for the one before it.
        pending: list[tuple[int, dict[str, jax.Array]]] = []
        window_start = time.time()
        try:
            while step < self.total_steps:
                state, step_metrics = self.train_step(state, next(batches), self.dropout_rng)
                step += 1
                pending.append((step, step_metrics))
                progress.update(config.batch_size)
                epoch_end = step % self.steps_per_epoch == 0
                last = step == self.total_steps
                save_due = step % config.checkpoint.every_steps == 0 or epoch_end or last
                if not (step % config.log_every_steps == 0 or save_due):
                    continue
                window, pending = self._checked(pending), []
                seconds = time.time() - window_start
                self.train_seconds += seconds
                self.images_trained += len(window) * config.batch_size
                self._log_train(step, window, seconds, progress)
                if save_due:
                    self._save(state, step)
                if epoch_end or last:
                    self.log_eval(step, state)
                window_start = time.time()
        finally:
            batches.close()
            progress.close()
        return state

    def _log_train(self, step: int, window: list[dict[str, float]], seconds: float,
                   progress: tqdm.tqdm) -> None:
        values = {name: float(np.mean([row[name] for row in window]))
                  for name in ('loss', 'accuracy', 'grad_norm')}
        values['learning_rate'] = window[-1]['learning_rate']
        values['images_per_second'] = len(window) * self.config.batch_size / seconds
        values['epoch'] = step / self.steps_per_epoch
        self.writer.scalars(step, 'train', values)
        progress.set_postfix(loss=f'{values["loss"]:.3f}', epoch=f'{values["epoch"]:.2f}',
                             refresh=False)
        logging.info('step %d/%d (epoch %.2f): loss %.4f, accuracy %.2f%%, lr %.4g, %.0f img/s',
                     step, self.total_steps, values['epoch'], values['loss'],
                     100 * values['accuracy'], values['learning_rate'],
                     values['images_per_second'])

    def log_eval(self, step: int, state: TrainState) -> None:
        self.last_eval = evaluation.evaluate_split(self.eval_step, state.variables(), self.config,
                                                   self.dataset, self.mesh, 'test')
        self.writer.scalars(step, 'test', {**self.last_eval, 'epoch': step / self.steps_per_epoch})
        logging.info('step %d (epoch %.2f): test top-1 %.2f%%, top-5 %.2f%%, loss %.4f', step,
                     step / self.steps_per_epoch, 100 * self.last_eval['top1'],
                     100 * self.last_eval['top5'], self.last_eval['loss'])

    def close(self) -> None:
        self.store.close()
        self.writer.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming the run there, if any) and returns the summary:
    final test top-1/top-5/loss, wall time and training throughput.

    Everything about the config, the dataset and the workdir is checked before anything
    is compiled or written.
    """
    start = time.time()
    dataset = preflight.validate(config)
    workdirs.check_workdir(workdir, config, dataset.fingerprint)
    workdirs.prepare_workdir(workdir)
    if jax.process_index() == 0:
        with workdirs.locked(workdir):
            return _train_and_evaluate(config, workdir, dataset, start)
    return _train_and_evaluate(config, workdir, dataset, start)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, dataset: data.Dataset,
                        start: float) -> dict[str, Any]:
    info = dataset.info
    logging.info('Training %s on %s (%s train / %s test images of shape %s) in %s; %d devices '
                 '(%d processes), global batch %d.', config.model.name, info.name,
                 f'{info.num_train:,}', f'{info.num_test:,}', info.image_shape, workdir,
                 jax.device_count(), jax.process_count(), config.batch_size)
    run = TrainingRun(config, workdir, dataset)
    try:
        logging.info('%d steps (%d per epoch), peak learning rate %.4g after %d warmup steps.',
                     run.total_steps, run.steps_per_epoch, recipe.peak_learning_rate(config),
                     recipe.warmup_steps(config, run.steps_per_epoch))
        state = run.train()
        if not run.last_eval:  # resumed a finished run
            run.log_eval(run.total_steps, state)
        summary = {
            'dataset': info.name,
            'model': qhnet_config.to_json(config.model),
            **{f'test_{name}': value for name, value in run.last_eval.items()},
            'params': int(sum(x.size for x in jax.tree.leaves(state.params))),
            'steps': run.total_steps,
            'epochs': run.total_steps / run.steps_per_epoch,
            'rollbacks': run.rollbacks,
            'wall_seconds': time.time() - start,
            'train_images_per_second': run.images_trained / max(run.train_seconds, 1e-9),
            'devices': jax.device_count(),
        }
        if run.is_chief:
            with open(os.path.join(workdir, SUMMARY_FILE), 'w', encoding='utf-8') as f:
                json.dump(summary, f, indent=2)
            curves = metrics.plot_curves(workdir, run.steps_per_epoch)
            logging.info('Training curves: %s', curves)
        logging.info(
            'Done: test top-1 %.2f%%, top-5 %.2f%%, loss %.4f after %.3g epochs; wall time %.1f '
            'min, %.0f images/s in training, %d rollbacks.', 100 * summary.get('test_top1', 0),
            100 * summary.get('test_top5', 0), summary.get('test_loss', math.nan),
            summary['epochs'], summary['wall_seconds'] / 60, summary['train_images_per_second'],
            run.rollbacks)
        return summary
    finally:
        run.close()

