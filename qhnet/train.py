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

Other tools read a run back with `restore_variables(workdir)` and score
variables with `evaluate(config, variables)`.
"""

import dataclasses
import functools
import json
import math
import os
import queue
import tempfile
import threading
import time
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from absl import logging
import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import ml_collections
import numpy as np
import optax
import tqdm

from qhnet import augment, checkpoints, data, metrics, models
from qhnet import config as qhnet_config

# Config fields that fix what the parameters mean and how they were reached (the model,
# the data, the schedule, the random stream): a workdir holding a checkpoint that differs
# in any of them belongs to another experiment, and resuming it would mix two runs. Model
# fields that change only how the function is computed are not among them.
IDENTITY_FIELDS = ('model', 'data.name', 'data.image_size', 'data.channels', 'data.class_list',
                   'data.augment', 'data.rand_augment', 'data.rand_augment_magnitude',
                   'data.rand_augment_std', 'data.erasing', 'data.erasing_count', 'seed',
                   'batch_size', 'num_epochs', 'num_train_steps', 'optimizer', 'label_smoothing')
COMPUTE_ONLY_MODEL_FIELDS = ('dtype', 'remat', 'derivative_impl')
SUMMARY_FILE = 'summary.json'
PREFETCH_DEPTH = 2


class ConfigError(ValueError):
    """A config key or value is invalid; raised before anything is compiled or written."""


class IncompatibleWorkdirError(ValueError):
    """The workdir holds checkpoints of another experiment; nothing in it was changed."""


class WorkdirError(ValueError):
    """The workdir cannot hold a run: not a directory, or not writable."""


class TrainingDivergedError(RuntimeError):
    """The loss or gradient stayed non-finite through every allowed rollback."""


class SimulatedCrash(RuntimeError):
    """Raised by `config.debug.crash_after_step` to test resuming."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # updates applied so far
    params: Any
    batch_stats: Any
    opt_state: optax.OptState
    # Multiplies the scheduled learning rate; each breakdown rollback lowers it.
    lr_scale: jax.Array

    def variables(self) -> dict[str, Any]:
        return {'params': self.params, 'batch_stats': self.batch_stats}


# Config checks.

def _fail(message: str) -> None:
    raise ConfigError(message)


def _check_number(config: ml_collections.ConfigDict, path: str, *, low: float,
                  high: float = math.inf, low_open: bool = False, high_open: bool = False,
                  integer: bool = False) -> None:
    value = config
    for key in path.split('.'):
        value = value[key]
    kind = int if integer else (int, float)
    low_ok = isinstance(value, kind) and not isinstance(value, bool) and (
        value > low if low_open else value >= low)
    if not (low_ok and (value < high if high_open else value <= high)):
        bounds = f'{"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
        _fail(f'config.{path} must be {"an integer" if integer else "a number"} in {bounds}, '
              f'got {value!r}')


def validate_config(config: ml_collections.ConfigDict) -> data.Dataset:
    """Checks every key and value of `config` and that its dataset is present.

    Raises ConfigError (a ValueError) naming the bad field and the valid choices,
    data.DatasetNotFoundError with setup instructions, or data.CorruptDatasetError /
    data.CorruptImageError naming a damaged file. Returns the opened dataset.
    """
    try:
        qhnet_config.check_keys(config)
        models.validate(config.model)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    for path in ('seed', 'log_every_steps', 'checkpoint.every_steps', 'checkpoint.max_to_keep',
                 'optimizer.reference_batch_size', 'batch_size', 'eval_batch_size'):
        _check_number(config, path, low=0 if path == 'seed' else 1, integer=True)
    _check_number(config, 'num_epochs', low=0, low_open=True)
    _check_number(config, 'num_train_steps', low=-1, integer=True)
    _check_number(config, 'label_smoothing', low=0, high=1, high_open=True)
    _check_number(config, 'optimizer.base_lr', low=0, low_open=True)
    _check_number(config, 'optimizer.momentum', low=0, high=1, high_open=True)
    _check_number(config, 'optimizer.weight_decay', low=0)
    _check_number(config, 'optimizer.warmup_epochs', low=0)
    _check_number(config, 'optimizer.init_lr', low=0)
    _check_number(config, 'optimizer.end_lr', low=0)
    _check_number(config, 'breakdown.lr_factor', low=0, high=1, low_open=True, high_open=True)
    _check_number(config, 'breakdown.max_retries', low=0, integer=True)
    if not isinstance(config.optimizer.nesterov, bool):
        _fail(f'config.optimizer.nesterov must be True or False, got {config.optimizer.nesterov!r}')
    if config.init_from is not None and not checkpoints.has_checkpoints(config.init_from):
        _fail(f'config.init_from={config.init_from} holds no checkpoints; point it at a workdir '
              'of qhnet.main or of `python -m qhnet.symmetry slice`, or leave it unset')
    devices = jax.device_count()
    for path in ('batch_size', 'eval_batch_size'):
        if config[path] % devices:
            _fail(f'config.{path}={config[path]} must be a multiple of the {devices} devices '
                  f'(one equal shard each)')
    try:
        dataset = data.open_dataset(config.data)
    except (data.CorruptDatasetError, data.CorruptImageError):
        raise
    except ValueError as error:
        raise ConfigError(str(error)) from error
    info = dataset.info
    if config.model.num_classes != info.num_classes:
        where = (f' ({info.num_classes} class folders under {config.data.data_dir}/train)'
                 if config.data.name == 'imagefolder' else '')
        _fail(f'config.model.num_classes={config.model.num_classes} but {info.name} has '
              f'{info.num_classes} classes{where}; set '
              f'--config.model.num_classes={info.num_classes}')
    per_epoch = steps_per_epoch(config, info.num_train)
    if per_epoch < 1:
        _fail(f'config.batch_size={config.batch_size} exceeds the {info.num_train} training '
              f'images of {info.name}')
    if warmup_steps(config, per_epoch) >= total_train_steps(config, per_epoch):
        _fail(f'config.optimizer.warmup_epochs={config.optimizer.warmup_epochs} leaves no steps '
              'for the cosine decay')
    return dataset


# The recipe: schedule, optimizer, loss.

def steps_per_epoch(config: ml_collections.ConfigDict, num_train: int) -> int:
    return num_train // config.batch_size


def total_train_steps(config: ml_collections.ConfigDict, per_epoch: int) -> int:
    if config.num_train_steps > 0:
        return config.num_train_steps
    return max(1, round(config.num_epochs * per_epoch))


def warmup_steps(config: ml_collections.ConfigDict, per_epoch: int) -> int:
    return round(config.optimizer.warmup_epochs * per_epoch)


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
    """base_lr at reference_batch_size, scaled linearly to the global batch size."""
    return config.optimizer.base_lr * config.batch_size / config.optimizer.reference_batch_size


def learning_rate_schedule(config: ml_collections.ConfigDict, per_epoch: int,
                           total_steps: int) -> optax.Schedule:
    """Linear warmup from init_lr to the peak over warmup_epochs, then cosine decay to
    end_lr at `total_steps` (the LR of the update that makes `step + 1`)."""
    return optax.warmup_cosine_decay_schedule(
        init_value=config.optimizer.init_lr,
        peak_value=peak_learning_rate(config),
        warmup_steps=warmup_steps(config, per_epoch),
        decay_steps=total_steps,
        end_value=config.optimizer.end_lr)


def decay_mask(params: Any) -> Any:
    """True for the parameters weight decay applies to: as timm, every tensor with more
    than one dimension (conv kernels, dense matrices), not biases or BN scales/shifts."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
    """PyTorch-style SGD: weight decay added to the gradient, then momentum, then the LR."""
    return optax.chain(
        optax.add_decayed_weights(config.optimizer.weight_decay, mask=decay_mask),
        optax.sgd(schedule, momentum=config.optimizer.momentum,
                  nesterov=config.optimizer.nesterov))


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example cross-entropy against one-hot labels smoothed towards uniform."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def create_train_state(model: flax.linen.Module, optimizer: optax.GradientTransformation,
                       image_shape: tuple[int, int, int], rng: jax.Array) -> TrainState:
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=optimizer.init(params), lr_scale=jnp.ones((), jnp.float32))


# The jitted steps.

def model_inputs(info: data.DatasetInfo) -> Callable[[dict[str, jax.Array], jax.Array],
                                                     jax.Array]:
    """(batch, key) -> the float32 images a model reads: the batch's uint8 images
    normalised, and noise from `key` in its random-erasing boxes, if it has any."""
    def inputs(batch: dict[str, jax.Array], key: jax.Array) -> jax.Array:
        images = data.normalise(batch['image'], info)
        if 'erase' in batch:
            images = augment.erase(images, batch['erase'], key)
        return images
    return inputs


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               model: flax.linen.Module, optimizer: optax.GradientTransformation,
               schedule: optax.Schedule, label_smoothing: float,
               inputs: Callable[[dict[str, jax.Array], jax.Array], jax.Array]
               ) -> tuple[TrainState, dict]:
    """One SGD update on a global batch (`inputs` makes its images). Returns (new state,
    metrics). Dropout and erasing draw from `rng` folded with the step: the same numbers
    for any number of devices or processes.

    Under jit with the batch sharded over the mesh's 'data' axis, batch norm's mean
    and variance are plain reductions over the global batch, so XLA computes them
    across all devices and hosts: no axis_name or explicit all-reduce is needed.

    If the loss or the gradient is not finite, no update is applied (the returned
    state is `state`) and metrics['finite'] is False.
    """
    step_rng = jax.random.fold_in(rng, state.step)
    images = inputs(batch, jax.random.fold_in(step_rng, 1))

    def loss_fn(params):
        logits, updated = model.apply(
            {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
            mutable=['batch_stats'], rngs={'dropout': step_rng})
        loss = cross_entropy(logits, batch['label'], label_smoothing).mean()
        return loss, (logits, updated['batch_stats'])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda update: update * state.lr_scale, updates)
    updated = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            batch_stats=batch_stats, opt_state=opt_state)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
    step_metrics = {
        'loss': loss,
        'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
        'grad_norm': grad_norm,
        'learning_rate': schedule(state.step) * state.lr_scale,
        'finite': finite,
    }
    return new_state, step_metrics


def eval_step(variables: Any, batch: dict[str, jax.Array], *,
              logits_fn: Callable[[Any, jax.Array], jax.Array],
              info: data.DatasetInfo) -> dict[str, jax.Array]:
    """Sums over the real (mask == 1) examples of a batch: loss, top-1/top-5 hits, count."""
    logits = logits_fn(variables, data.normalise(batch['image'], info))
    labels, mask = batch['label'], batch['mask']
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    return {
        'loss': jnp.sum(cross_entropy(logits, labels) * mask),
        'top1': jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
        'top5': jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
        'count': jnp.sum(mask),
    }


def eval_logits(model: flax.linen.Module) -> Callable[[Any, jax.Array], jax.Array]:
    """(variables, images) -> the logits of `model` in eval mode."""
    return lambda variables, images: model.apply(variables, images, train=False)


def replicate(tree: Any, sharding: NamedSharding) -> Any:
    """`tree` (the same values on every process) as global arrays replicated by `sharding`.
    Unlike `jax.device_put`, this works when the mesh spans devices of other processes."""
    def put(x):
        if jax.dtypes.issubdtype(getattr(x, 'dtype', None), jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                            impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.tree.map(put, tree)


def make_mesh(devices: Iterable[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis 'data' over `devices` (default: all devices of all hosts)."""
    return Mesh(np.asarray(list(devices or jax.devices())), ('data',))


def jit_train_step(mesh: Mesh, **step_args) -> Callable:
    """`train_step` compiled for `mesh`: (state, batch, rng) -> (state, metrics), with the
    batch sharded over 'data', everything else replicated, and the input state donated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(functools.partial(train_step, **step_args),
                   in_shardings=(replicated, NamedSharding(mesh, PartitionSpec('data')), replicated),
                   out_shardings=(replicated, replicated), donate_argnums=0)


def jit_eval_step(mesh: Mesh, logits_fn: Callable[[Any, jax.Array], jax.Array],
                  info: data.DatasetInfo) -> Callable:
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(functools.partial(eval_step, logits_fn=logits_fn, info=info),
                   in_shardings=(replicated, NamedSharding(mesh, PartitionSpec('data'))),
                   out_shardings=replicated)


# Feeding the devices.

class DeviceBatches:
    """Iterates over global batches on the mesh, made from this process's numpy batches
    by a background thread that stays `depth` batches ahead."""
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


def _evaluate(eval_fn: Callable, variables: dict[str, Any], config: ml_collections.ConfigDict,
              dataset: data.Dataset, mesh: Mesh, split: str) -> dict[str, float]:
    host_batches = dataset.batches(
        split, batch_size=config.eval_batch_size // jax.process_count(),
        seed=config.seed, train=False, process_index=jax.process_index(),
        process_count=jax.process_count())
    totals = None
    with DeviceBatches(host_batches, NamedSharding(mesh, PartitionSpec('data'))) as batches:
        for batch in batches:
            sums = eval_fn(variables, batch)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals['count'])
    return {name: float(totals[name]) / count for name in ('top1', 'top5', 'loss')}


def evaluate(config: ml_collections.ConfigDict, variables: Any, split: str = 'test',
             logits_fn: Callable[[Any, jax.Array], jax.Array] | None = None,
             dataset: data.Dataset | None = None) -> dict[str, float]:
    """Top-1 and top-5 accuracy (fractions) and mean cross-entropy on a whole split of
    `config.data` (or of `dataset`, opened already), sharded over all devices: of `variables`
    (a model of `config.model`), or of whatever `logits_fn(variables, images)` computes (e.g.
    an inference form's logits; images normalised)."""
    mesh = make_mesh()
    dataset = dataset or data.open_dataset(config.data)
    variables = replicate(variables, NamedSharding(mesh, PartitionSpec()))
    logits_fn = logits_fn or eval_logits(models.build(config.model))
    return _evaluate(jit_eval_step(mesh, logits_fn, dataset.info), variables, config, dataset,
                     mesh, split)


class Restored(NamedTuple):
    """What `restore_variables` read: the step it restored, the run's config, the variables."""
    step: int
    config: ml_collections.ConfigDict
    variables: dict[str, Any]


def restore_variables(workdir: str) -> Restored:
    """(step, config, {'params', 'batch_stats'}) of the newest readable checkpoint in `workdir`,
    on the default device: `step` is the checkpoint actually restored, after any fallback from
    unreadable newer ones. Reads only; never changes the workdir."""
    if not checkpoints.has_checkpoints(workdir):
        raise checkpoints.CheckpointRestoreError(
            f'{workdir} has no checkpoints; point --workdir at the workdir of a training run')
    store = checkpoints.CheckpointStore(workdir, read_only=True)
    try:
        found = store.latest_config()
        if found is None:
            raise checkpoints.CheckpointRestoreError(
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
    store = checkpoints.CheckpointStore(workdir)
    try:
        store.save(step, variables, {'step': np.asarray(step)}, config)
    finally:
        store.close()


# The training run.

def _identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The IDENTITY_FIELDS of `config`, flattened to 'section.key' -> JSON value."""
    flat = {}
    for field in IDENTITY_FIELDS:
        section, _, key = field.partition('.')
        value = config[section][key] if key else config[section]
        if isinstance(value, ml_collections.ConfigDict):
            items = {f'{field}.{name}': item
                     for name, item in checkpoints.config_to_json(value).items()}
        else:
            items = {field: json.loads(json.dumps(value))}
        for name, item in items.items():
            if name.removeprefix('model.') not in COMPUTE_ONLY_MODEL_FIELDS:
                flat[name] = item
    return flat


def _leaf_shapes(tree) -> dict[str, tuple]:
    """'params/a/b' -> (shape, dtype) of every leaf of a nested dict of arrays."""
    return {'/'.join(str(getattr(k, 'key', k)) for k in path): (leaf.shape, str(leaf.dtype))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Raises IncompatibleWorkdirError if `workdir` holds a checkpoint of a different
    model or dataset. Reads only."""
    if not checkpoints.has_checkpoints(workdir):
        return
    store = checkpoints.CheckpointStore(workdir, read_only=True)
    try:
        found = store.latest_config()
    finally:
        store.close()
    if found is None:
        return
    step, saved = found
    ours, theirs = _identity(config), _identity(saved)
    differences = [f'  {name}: checkpoint has {theirs.get(name)!r}, config has {ours.get(name)!r}'
                   for name in sorted(set(ours) | set(theirs)) if ours.get(name) != theirs.get(name)]
    if differences:
        raise IncompatibleWorkdirError(
            f'{workdir} holds a checkpoint (step {step}) of a different experiment:\n'
            + '\n'.join(differences)
            + f'\nNothing in {workdir} was changed. Pick another --workdir, or delete that one '
              'to start over.')


def prepare_workdir(workdir: str) -> None:
    """Creates `workdir` if needed and checks that files can be written there; raises
    WorkdirError naming the problem otherwise."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f'--workdir={workdir} is a file, not a directory; pick a directory')
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as error:
        raise WorkdirError(f'cannot write to --workdir={workdir} ({error.strerror or error}); '
                           'pick a writable directory') from error


@dataclasses.dataclass
class _NonFiniteStep(Exception):
    step: int
    metrics: dict[str, float]


class _TrainingRun:
    """The state of one `train_and_evaluate` call: compiled steps, checkpoints, writers."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, dataset: data.Dataset):
        self.config = config
        self.workdir = workdir
        self.dataset = dataset
        self.info = info = dataset.info
        self.model = models.build(config.model)
        self.mesh = make_mesh()
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec('data'))
        self.steps_per_epoch = steps_per_epoch(config, info.num_train)
        self.total_steps = total_train_steps(config, self.steps_per_epoch)
        self.schedule = learning_rate_schedule(config, self.steps_per_epoch, self.total_steps)
        self.optimizer = make_optimizer(config, self.schedule)
        self.train_step = jit_train_step(
            self.mesh, model=self.model, optimizer=self.optimizer, schedule=self.schedule,
            label_smoothing=config.label_smoothing, inputs=model_inputs(info))
        self.eval_step = jit_eval_step(self.mesh, eval_logits(self.model), info)
        init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
        self.init_rng = init_rng
        self.dropout_rng = replicate(dropout_rng, self.replicated)
        self.is_chief = jax.process_index() == 0
        self.store = checkpoints.CheckpointStore(workdir, max_to_keep=config.checkpoint.max_to_keep)
        self.writer = metrics.MetricWriter(workdir, enabled=self.is_chief)
        self.rollbacks = 0
        self.rollback_step: int | None = None  # the checkpoint the last rollback restored
        self.nan_injections_left = config.debug.inject_nan_times
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
        self.store.save(step, items['variables'], items['optimizer'], self.config)

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
        """`state` with the variables of the newest checkpoint in `workdir` (config.init_from),
        which must be exactly this model's."""
        step, _, variables = restore_variables(workdir)
        ours, theirs = _leaf_shapes(state.variables()), _leaf_shapes(variables)
        if ours != theirs:
            differences = [f'{name}: {theirs.get(name)}' for name in sorted(set(ours) | set(theirs))
                           if ours.get(name) != theirs.get(name)][:3]
            raise ConfigError(
                f'config.init_from={workdir} (step {step}) holds variables of another model '
                f'(differing: {differences}); pass the config that model was written '
                f'with (a sliced model\'s is <output_workdir>/config.py)')
        variables = replicate(variables, self.replicated)
        logging.info('Variables from step %d of %s (config.init_from); a fresh optimizer.', step,
                     workdir)
        return state.replace(params=variables['params'], batch_stats=variables['batch_stats'])

    # Data.

    def _train_batches(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
        """This process's batches for the updates start_step + 1, start_step + 2, ..."""
        batches = self.dataset.batches(
            'train', batch_size=self.config.batch_size // jax.process_count(),
            seed=self.config.seed, train=True, start_step=start_step,
            process_index=jax.process_index(), process_count=jax.process_count())
        for step, batch in enumerate(batches, start=start_step + 1):
            if step == self.config.debug.inject_nan_at_step and self.nan_injections_left > 0:
                self.nan_injections_left -= 1
                logging.warning('debug.inject_nan_at_step: the batch of step %d is all NaN', step)
                batch = dict(batch, image=np.full(batch['image'].shape, np.nan, np.float32))
            yield batch

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
        found = (f'non-finite loss or gradient at step {breakdown.step} (loss '
                 f'{breakdown.metrics["loss"]:g}, gradient norm {breakdown.metrics["grad_norm"]:g})')
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
        state = state.replace(lr_scale=replicate(jnp.float32(self.lr_scale), self.replicated))
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
        batches = DeviceBatches(self._train_batches(step), self.batch_sharding)
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
                if step == config.debug.crash_after_step:
                    raise SimulatedCrash(f'debug.crash_after_step: stopping after step {step}')
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
        self.last_eval = _evaluate(self.eval_step, state.variables(), self.config, self.dataset,
                                   self.mesh, 'test')
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
    dataset = validate_config(config)
    info = dataset.info
    check_workdir(workdir, config)
    prepare_workdir(workdir)
    logging.info('Training %s on %s (%s train / %s test images of shape %s) in %s; %d devices '
                 '(%d processes), global batch %d.', config.model.name, info.name,
                 f'{info.num_train:,}', f'{info.num_test:,}', info.image_shape, workdir,
                 jax.device_count(), jax.process_count(), config.batch_size)
    run = _TrainingRun(config, workdir, dataset)
    try:
        logging.info('%d steps (%d per epoch), peak learning rate %.4g after %d warmup steps.',
                     run.total_steps, run.steps_per_epoch, peak_learning_rate(config),
                     warmup_steps(config, run.steps_per_epoch))
        state = run.train()
        if not run.last_eval:  # resumed a finished run
            run.log_eval(run.total_steps, state)
        summary = {
            'dataset': info.name,
            'model': checkpoints.config_to_json(config.model),
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
