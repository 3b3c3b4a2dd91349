"""Activations, selectable by name (docs/design.md, 'Activations').

`hardball` and `softball` act on the vector of channels at each pixel and use the
Euclidean norm over the channel axis with radius R = sqrt(n), n the channel
count. Since |x|^2 / R^2 = mean(x^2) over channels, both read naturally in terms
of the mean square. They commute with every orthogonal channel mixing; hardtanh
commutes with signed permutations, relu with permutations and positive scalings.
"""

from typing import Callable

import jax
import jax.numpy as jnp


def identity(x: jax.Array) -> jax.Array:
    """No activation: the block stays GL(n)-equivariant."""
    return x


def relu(x: jax.Array) -> jax.Array:
    return jax.nn.relu(x)


def hardtanh(x: jax.Array) -> jax.Array:
    """hardtanh(x) = clip(x, -1, 1), elementwise (PyTorch's default +-1)."""
    return jnp.clip(x, -1.0, 1.0)


def _mean_square(x: jax.Array) -> jax.Array:
    """|x|^2 / R^2 with R = sqrt(n): the mean square over the channel axis, in float32 at least."""
    return jnp.mean(jnp.square(x.astype(jnp.promote_types(x.dtype, jnp.float32))), axis=-1,
                    keepdims=True)


def hardball(x: jax.Array) -> jax.Array:
    """hardball(x) = x if |x| < R else R x / |x|: projection onto the ball of radius R."""
    ratio_sq = _mean_square(x)  # (|x| / R)^2
    outside = ratio_sq >= 1.0
    scale = jnp.where(outside, jax.lax.rsqrt(jnp.where(outside, ratio_sq, 1.0)), 1.0)
    return (x * scale).astype(x.dtype)


def softball(x: jax.Array) -> jax.Array:
    """softball(x) = x / sqrt(1 + |x|^2 / R^2): a smooth map of R^n into the ball of radius R."""
    return (x * jax.lax.rsqrt(1.0 + _mean_square(x))).astype(x.dtype)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'relu': relu,
    'hardtanh': hardtanh,
    'hardball': hardball,
    'softball': softball,
    'identity': identity,
}


def get(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation called `name`; a ValueError lists the valid names."""
    if name not in ACTIVATIONS:
        raise ValueError(f'unknown activation {name!r}; valid choices: {sorted(ACTIVATIONS)}')
    return ACTIVATIONS[name]
