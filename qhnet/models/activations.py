"""Activations, selectable by name (docs/design.md, 'Activations').

`hardball` and `softball` act on the vector of channels at each pixel and use the
Euclidean norm over the channel axis with radius R = sqrt(n), n the channel
count, unless a `radius` is given: a sliced stream (`qhnet.symmetry.slicing`) keeps
the radius of its original width. With R = sqrt(n), |x|^2 / R^2 = mean(x^2) over
channels. They commute with every orthogonal channel mixing; hardtanh
commutes with signed permutations, relu with permutations and positive scalings.
"""

from typing import Callable

import functools

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


def _ratio_square(x: jax.Array, radius: float | None) -> jax.Array:
    """|x|^2 / R^2 over the channel axis, in float32 at least; R = sqrt(n) unless given, and
    then |x|^2 / R^2 is the mean square."""
    square = jnp.square(x.astype(jnp.promote_types(x.dtype, jnp.float32)))
    if radius is None:
        return jnp.mean(square, axis=-1, keepdims=True)
    return jnp.sum(square, axis=-1, keepdims=True) / radius ** 2


def hardball(x: jax.Array, radius: float | None = None) -> jax.Array:
    """hardball(x) = x if |x| < R else R x / |x|: projection onto the ball of radius R."""
    ratio_sq = _ratio_square(x, radius)  # (|x| / R)^2
    outside = ratio_sq >= 1.0
    scale = jnp.where(outside, jax.lax.rsqrt(jnp.where(outside, ratio_sq, 1.0)), 1.0)
    return (x * scale).astype(x.dtype)


def softball(x: jax.Array, radius: float | None = None) -> jax.Array:
    """softball(x) = x / sqrt(1 + |x|^2 / R^2): a smooth map of R^n into the ball of radius R."""
    return (x * jax.lax.rsqrt(1.0 + _ratio_square(x, radius))).astype(x.dtype)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'relu': relu,
    'hardtanh': hardtanh,
    'hardball': hardball,
    'softball': softball,
    'identity': identity,
}


BALLS = ('hardball', 'softball')  # the activations with a radius


def get(name: str, radius: float | None = None) -> Callable[[jax.Array], jax.Array]:
    """The activation called `name`, with ball radius `radius` (None: sqrt of the channel
    count; the other activations have none); a ValueError lists the valid names."""
    if name not in ACTIVATIONS:
        raise ValueError(f'unknown activation {name!r}; valid choices: {sorted(ACTIVATIONS)}')
    if radius is not None and name in BALLS:
        return functools.partial(ACTIVATIONS[name], radius=radius)
    return ACTIVATIONS[name]
