"""Helpers for the symmetry tests and benchmark.

`random_variables`: a freshly initialised QHNet is a poor test of the symmetry: BN_o's
scale starts at zero, so every block's update q(u) is zero and the blocks are invisible.
This draws every parameter and running statistic instead, at magnitudes that keep a deep
network's activations of order one (so that relu, hardtanh and the balls all clip).

`exact_float64`: a temporary workaround while the model code rounds float64 through
float32 (the balls' mean square is computed in float32; the 'stencil' derivative
accumulates in float32 and XLA's CPU grouped convolution rounds float64 at default
precision). Remove it once `qhnet.activations` and `qhnet.derivative` keep float64.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

from qhnet import activations, derivative


def random_variables(model, image_shape: tuple[int, ...], seed: int = 0,
                     update: tuple[float, float] = (0.2, 0.6)) -> dict:
    """Float32 {'params', 'batch_stats'} of `model` for NHWC images of `image_shape` (with batch).

    Kernels ~ N(0, 1/fan_in); BN scales +-U(0.5, 1.5), BN_o's +-U(*update) (small updates:
    without a clipping activation the quadratic blocks of a deep model need smaller ones);
    shifts ~ N(0, 0.3^2); running means ~ N(0, 0.3^2), variances ~ U(0.5, 2); mixing maps
    near the identity, I + N(0, 0.3^2 / n).
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                            jax.ShapeDtypeStruct(image_shape, jnp.float32))

    def draw(path, leaf):
        collection, layer, name = path[0].key, path[-2].key, path[-1].key
        shape = leaf.shape
        if collection == 'batch_stats':
            value = (0.3 * rng.standard_normal(shape) if name == 'mean'
                     else rng.uniform(0.5, 2.0, shape))
        elif name == 'scale':
            low, high = update if layer == 'out_bn' else (0.5, 1.5)
            value = rng.uniform(low, high, shape) * rng.choice([-1.0, 1.0], shape, p=[0.2, 0.8])
        elif name == 'bias':
            value = 0.3 * rng.standard_normal(shape)
        elif layer in ('mix_in', 'mix_out'):
            value = np.eye(shape[0]) + 0.3 * rng.standard_normal(shape) / np.sqrt(shape[0])
        else:
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        return value.astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _mean_square(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return jnp.mean(jnp.square(x), axis=-1, keepdims=True)


def _depthwise_conv(x, kernel, stride=1, *, channel_multiplier=None, impl=None):
    del impl  # every implementation computes this function
    outputs = x.shape[-1] * (channel_multiplier or max(1, kernel.shape[-1] // x.shape[-1]))
    return jax.lax.conv_general_dilated(
        x, derivative.per_channel_kernel(kernel, outputs).astype(x.dtype), (stride, stride),
        ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=x.shape[-1], precision=jax.lax.Precision.HIGHEST)


@contextlib.contextmanager
def exact_float64():
    """Within it, `qhnet.activations` and `qhnet.derivative` compute float64 in float64
    (float32 is unchanged). The model fix this stands in for: `_mean_square` computes in
    `jnp.promote_types(x.dtype, jnp.float32)`, and `depthwise_conv` accumulates in that type
    too (and passes `precision=HIGHEST` to the grouped convolution)."""
    saved = activations._mean_square, derivative.depthwise_conv
    activations._mean_square, derivative.depthwise_conv = _mean_square, _depthwise_conv
    try:
        yield
    finally:
        activations._mean_square, derivative.depthwise_conv = saved
