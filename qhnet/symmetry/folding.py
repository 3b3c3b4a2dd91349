"""What both model families fold and compute with: BatchNorms, variables, dtypes.

A BatchNorm with running statistics is the affine map BN(x) = x s + t, per channel, with

    s = gamma / sqrt(var + eps),   t = beta - mean * s        (RepVGG's fold),

read in float64 (`batch_norm`); written back, a BN is x -> x + bias (`identity_bn`).
`check_variables` refuses variables that are not exactly the model's. A form holds arrays of
one dtype (`form_dtype`), which its forward pass computes in (`compute_dtype`) with full
precision products (`HIGHEST`, `dense`).
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST

# A forward pass's tap: tap(point, x) sees a named value and returns what the pass goes on with.
Tap = Callable[[str, jax.Array], jax.Array]


def no_tap(point: str, x: jax.Array) -> jax.Array:
    return x


def bn_point(layer: str) -> str:
    """The tap point of the value that a BatchNorm wrote in the trained model, after `layer`
    (its map folded into that layer): 'bn:<layer>'. A linear map reads such values only
    through the activation after them, so they are corrected (`align.repair`), not rounded."""
    return f'bn:{layer}'


def is_bn_point(point: str) -> bool:
    return point.startswith('bn:')


# Variables.

def read(tree, *path: str) -> np.ndarray:
    for key in path:
        tree = tree[key]
    return np.asarray(tree, dtype=np.float64)


def batch_norm(structure, variables, *path: str) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) with BN(x) = x s + t in eval mode."""
    gamma = read(variables, 'params', *path, 'scale')
    beta = read(variables, 'params', *path, 'bias')
    mean = read(variables, 'batch_stats', *path, 'mean')
    var = read(variables, 'batch_stats', *path, 'var')
    s = gamma / np.sqrt(var + structure.epsilon('/'.join(path)))
    return s, beta - mean * s


def identity_bn(structure, path: str, bias: np.ndarray):
    """BN params and statistics with BN(x) = x + bias: scale 1, mean 0, var = 1 - eps."""
    n = bias.shape[0]
    return ({'scale': np.ones(n), 'bias': bias},
            {'mean': np.zeros(n), 'var': np.full(n, 1.0 - structure.epsilon(path))})


def leaves(tree) -> list[tuple[str, object]]:
    """[('params/stem_conv/kernel', leaf), ...] for every leaf of a nested dict of arrays."""
    return [('/'.join(str(getattr(key, 'key', key)) for key in path), leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def short_list(items: list[str], limit: int = 6) -> str:
    """'a, b, c' of the first `limit` items, then ' and 3 more'."""
    more = f' and {len(items) - limit} more' if len(items) > limit else ''
    return ', '.join(items[:limit]) + more


def _brief(paths: set[str], other: set[str]) -> list[str]:
    """`paths`, a layer that `other` has nothing of by the layer's name ('params/stage1_block2'),
    any other path in full."""
    other_layers = {'/'.join(path.split('/')[:2]) for path in other}
    names = []
    for path in sorted(paths):
        layer = '/'.join(path.split('/')[:2])
        name = path if layer in other_layers else layer
        if name not in names:
            names.append(name)
    return names


def check_variables(structure, variables) -> None:
    """Exactly the variables the model has (`structure.variable_shapes`), with its shapes: a
    ValueError names the arrays or layers (blocks) that are missing, extra or misshapen."""
    expected = dict(structure.variable_shapes)
    got = {name: tuple(np.shape(leaf)) for name, leaf in leaves(variables)}
    problems = []
    missing, extra = set(expected) - set(got), set(got) - set(expected)
    if missing:
        problems.append(f'missing {short_list(_brief(missing, set(got)))}')
    if extra:
        problems.append(
            f'extra {short_list(_brief(extra, set(expected)))}, which the model has not')
    for path in sorted(set(expected) & set(got)):
        shape, need = got[path], expected[path]
        if len(shape) != len(need) or any(n is not None and n != s for n, s in zip(need, shape)):
            problems.append(f'{path} has shape {shape}, the model needs {need}')
    if problems:
        raise ValueError(f'the variables do not match the model: {"; ".join(problems[:3])}; '
                         'fold them with the spec of the model they were initialised or trained '
                         'with, group_spec(that model)')


# Forms.

def form_dtype(form) -> np.dtype:
    """The floating dtype of a form (all its arrays share it)."""
    dtypes = {np.dtype(x.dtype) for x in jax.tree_util.tree_leaves(form)}
    if len(dtypes) != 1:
        raise ValueError(f'a form holds arrays of one dtype; got {sorted(map(str, dtypes))}')
    return dtypes.pop()


def compute_dtype(form) -> np.dtype:
    """The dtype `apply` computes a form in: its own (float64 needs 64-bit JAX)."""
    dtype = form_dtype(form)
    if dtype == np.float64 and not jax.config.jax_enable_x64:
        raise ValueError('a float64 form needs 64-bit JAX: run inside `with jax.enable_x64(True):` '
                         "or set jax.config.update('jax_enable_x64', True)")
    return dtype


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """x W at full precision."""
    return jnp.dot(x, w, precision=HIGHEST)
