"""The jitted training step: one SGD update on a global batch sharded over the mesh, which
leaves the state as it was when the loss or the gradient is not finite."""

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import optax

from qhnet import data
from qhnet.data import augment
from qhnet.training import feeding
from qhnet.training.recipe import cross_entropy


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


def create_train_state(model: flax.linen.Module, optimizer: optax.GradientTransformation,
                       image_shape: tuple[int, int, int], rng: jax.Array) -> TrainState:
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=optimizer.init(params), lr_scale=jnp.ones((), jnp.float32))


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


def jit_train_step(mesh: Mesh, **step_args) -> Callable:
    """`train_step` compiled for `mesh`: (state, batch, rng) -> (state, metrics), with the
    batch sharded over 'data', everything else replicated, and the input state donated."""
    replicated = feeding.replicated(mesh)
    return jax.jit(functools.partial(train_step, **step_args),
                   in_shardings=(replicated, feeding.batch_sharded(mesh), replicated),
                   out_shardings=(replicated, replicated), donate_argnums=0)
