"""Helpers for the symmetry tests and benchmark.

`random_variables`: a freshly initialised QHNet is a poor test of the symmetry: BN_o's
scale starts at zero, so every block's update q(u) is zero and the blocks are invisible.
This draws every parameter and running statistic instead, at magnitudes that keep a deep
network's activations of order one (so that relu, hardtanh and the balls all clip).
"""

import jax
import jax.numpy as jnp
import numpy as np


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

