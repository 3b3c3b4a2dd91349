"""The paper's recipe as optax objects: the learning-rate schedule, SGD with Nesterov momentum
and weight decay, and the label-smoothed loss (the numbers: `qhnet.config`)."""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax


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
