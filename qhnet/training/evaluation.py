"""Evaluation: top-1, top-5 and cross-entropy over a whole split, sharded over every device,
of a model's variables or of any function of them (an inference form's logits)."""

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections

from qhnet import data, models
from qhnet.training import feeding
from qhnet.training.recipe import cross_entropy


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


def jit_eval_step(mesh: Mesh, logits_fn: Callable[[Any, jax.Array], jax.Array],
                  info: data.DatasetInfo) -> Callable:
    replicated = feeding.replicated(mesh)
    return jax.jit(functools.partial(eval_step, logits_fn=logits_fn, info=info),
                   in_shardings=(replicated, feeding.batch_sharded(mesh)), out_shardings=replicated)


def evaluate_split(eval_fn: Callable, variables: dict[str, Any],
                   config: ml_collections.ConfigDict, dataset: data.Dataset, mesh: Mesh,
                   split: str) -> dict[str, float]:
    """Top-1, top-5 and mean loss of `split` with `eval_fn` (a `jit_eval_step`), the batches
    of every process together."""
    host_batches = dataset.batches(
        split, batch_size=config.eval_batch_size // jax.process_count(),
        seed=config.seed, train=False, process_index=jax.process_index(),
        process_count=jax.process_count())
    totals = None
    with feeding.DeviceBatches(host_batches, feeding.batch_sharded(mesh)) as batches:
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
    return evaluator(config, split, logits_fn, dataset)(variables)


def evaluator(config: ml_collections.ConfigDict, split: str = 'test',
              logits_fn: Callable[[Any, jax.Array], jax.Array] | None = None,
              dataset: data.Dataset | None = None) -> Callable[[Any], dict[str, float]]:
    """`evaluate` as a function of the variables alone, compiled once: for evaluating many
    variables of one model (the points of a line between two models)."""
    mesh = feeding.make_mesh()
    dataset = dataset or data.open_dataset(config.data)
    logits_fn = logits_fn or eval_logits(models.build(config.model))
    eval_fn = jit_eval_step(mesh, logits_fn, dataset.info)
    return lambda variables: evaluate_split(
        eval_fn, feeding.replicate(variables, feeding.replicated(mesh)), config, dataset, mesh,
        split)
