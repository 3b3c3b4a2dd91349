"""The model zoo: QHNet (the ResNet50-shaped network of quasi-linear blocks), QLNet (the same
network of QLNet's blocks, the authors' released model) and the baselines, all built from a
config's `model` section by `build`.

Every model is a linen Module on NHWC float images:

    model = build(config.model)
    variables = model.init(rng, images, train=False)        # {'params', 'batch_stats'}
    logits = model.apply(variables, images, train=False)
    logits, updates = model.apply(variables, images, train=True,
                                  mutable=['batch_stats'], rngs={'dropout': key})

    activations.py   relu, hardtanh, hardball, softball, identity
    derivative.py    the learned derivative operator K and its XLA programs
    fused.py         Eq. (3)'s product as fused Pallas kernels (model.block_impl='pallas')
    fused_kernels.py those kernels
    blocks.py        the quasi-linear block family, Eqs. (3)-(7) and QLNet's
    network.py       QHNet (and QLNet): stem, stages of blocks, pooling, head
    baselines.py     ResNet50, MobileNetV3-Large
"""

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from qhnet import config
from qhnet.models.baselines import MobileNetV3Large, ResNet50
from qhnet.models.blocks import QuasiLinearBlock
from qhnet.models.network import QHNet

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

__all__ = ['DTYPES', 'MobileNetV3Large', 'QHNet', 'QuasiLinearBlock', 'ResNet50', 'build']


def build(model_config: ml_collections.ConfigDict) -> nn.Module:
    """The linen Module that `model_config` (a config's `model` section) describes; a bad
    field raises `config.ConfigError` naming it."""
    config.validate_section(model_config, 'model')
    dtype = DTYPES[model_config.dtype]
    if model_config.name == 'resnet50':
        return ResNet50(num_classes=model_config.num_classes, dtype=dtype,
                        stem=model_config.stem, widths=tuple(model_config.widths),
                        depths=tuple(model_config.depths))
    if model_config.name == 'mobilenet_v3_large':
        return MobileNetV3Large(num_classes=model_config.num_classes, dtype=dtype,
                                stem=model_config.stem)
    qlnet = model_config.name == 'qlnet'  # QLNet's block: K with 2 kernels per channel
    return QHNet(
        equation='qlnet' if qlnet else model_config.equation,
        activation=model_config.activation,
        placement=model_config.placement,
        multiplier=2 if qlnet else model_config.multiplier,
        weight_sharing=False if qlnet else model_config.weight_sharing,
        mixing=False if qlnet else model_config.mixing,
        stem=model_config.stem,
        widths=tuple(model_config.widths),
        depths=tuple(model_config.depths),
        num_classes=model_config.num_classes,
        dtype=dtype,
        remat=model_config.remat,
        derivative_impl=model_config.derivative_impl,
        block_impl=model_config.block_impl,
        stream_widths=(None if model_config.stream_widths is None
                       else tuple(model_config.stream_widths)))
