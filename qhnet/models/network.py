"""QHNet: a stem, stages of quasi-linear blocks (`qhnet.models.blocks`), global average pooling
and a linear head; the ResNet50 layout at expansion 1."""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qhnet.models.blocks import CONV_INIT, LINEAR_INIT, QuasiLinearBlock, qlnet_width
from qhnet.models.derivative import DEFAULT_IMPL, window


class Conv3x3Patches(nn.Module):
    """A 3x3 convolution, zero padding 1, stride `stride`, no bias, as one matrix product of
    the 9 shifted (strided) copies of the input with the kernel: the parameters and results
    of `nn.Conv(features, (3, 3), strides=stride, padding=1)`, faster on XLA:CPU for the
    few input channels of the small stems."""
    features: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = CONV_INIT
    # What nn.Conv's fields would say (qhnet.symmetry reads the stem's geometry).
    padding = ((1, 1), (1, 1))

    @property
    def strides(self) -> tuple[int, int]:
        return (self.stride, self.stride)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        out_h, out_w = (height - 1) // self.stride + 1, (width - 1) // self.stride + 1
        kernel = self.param('kernel', self.kernel_init, (3, 3, channels, self.features))
        padded = jnp.pad(x.astype(self.dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
        patches = jnp.concatenate([window(padded, dy, dx, self.stride, out_h, out_w)
                                   for dy in range(3) for dx in range(3)], axis=-1)
        weights = kernel.reshape(9 * channels, self.features).astype(self.dtype)
        return (patches.reshape(-1, 9 * channels) @ weights).reshape(batch, out_h, out_w,
                                                                    self.features)


class QHNet(nn.Module):
    """Stem, stages of quasi-linear blocks, global average pool, linear head.

    `stem='imagenet'`: 7x7/2 conv, BN, ReLU, 3x3/2 max pool (timm ResNet50 layout,
    expansion 1: widths (64, 128, 256, 512), depths (3, 4, 6, 3)). `stem='small'`:
    3x3/1 conv, BN, ReLU, no pool, for 28x28 and 32x32 images; `'small_stride2'`: the
    same at stride 2, stage 1 at half the resolution (the Fashion-MNIST variant's). Every stage after the
    first starts with a downsampling block: stride 2 and a projection shortcut.

    Activation placement (docs/design.md, 'Network and placement'), as in the authors'
    code: `placement='ds'` applies the activation after every downsampling block and
    after the last block, before global pooling: blocks 4, 8, 14 and 16 of the ResNet50
    layout, none in stage 1, where the stem's ReLU is the last activation. `'all'`
    applies it after every block. When the last block is itself a downsampling block
    (depths ending in 1, as in the small-input variants), it carries the activation
    once, not twice. `remat=True` recomputes
    each block's activations in the backward pass (`nn.remat`: less memory, more compute);
    `derivative_impl` picks K's XLA program (`qhnet.models.derivative.IMPLEMENTATIONS`);
    `block_impl='pallas'` computes Eq. (3)'s blocks without mixing maps by fused kernels
    (`qhnet.models.fused`; 'auto': per platform). None of them changes the parameters or the
    function.

    `equation='qlnet'`: QLNet's block (`QuasiLinearBlock.qlnet`, product width
    `qlnet_width(n)`), every conv initialised as QLNet's (Kaiming normal, fan_out, gain 1).

    `stream_widths` (a sliced model, `qhnet.symmetry.slicing`; Eq. (3) with mixing maps, or
    QLNet):
    the residual stream of stage s, the stem's for stage 1, has `stream_widths[s]` channels
    instead of `widths[s]`. `widths` stay the hidden widths: a block's product keeps its
    `multiplier * widths` channels (`QuasiLinearBlock.hidden`, read through a rectangular
    E), and the ball activations keep the radius sqrt(widths[s]).
    """
    equation: int | str = 3  # 3-7, or 'qlnet' (QLNet's block; QLNet's Kaiming 'linear' init)
    activation: str = 'softball'
    placement: str = 'ds'
    multiplier: int = 4
    weight_sharing: bool = True
    mixing: bool = False
    stem: str = 'imagenet'
    widths: Sequence[int] = (64, 128, 256, 512)
    depths: Sequence[int] = (3, 4, 6, 3)
    num_classes: int = 100
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    derivative_impl: str = DEFAULT_IMPL
    block_impl: str = 'xla'
    stream_widths: Sequence[int] | None = None

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        block = nn.remat(QuasiLinearBlock, static_argnums=(2,)) if self.remat else QuasiLinearBlock
        sliced = self.stream_widths is not None
        streams = tuple(self.stream_widths) if sliced else tuple(self.widths)
        x = images.astype(self.dtype)
        stem_init = LINEAR_INIT if self.equation == 'qlnet' else CONV_INIT
        if self.stem == 'imagenet':
            x = nn.Conv(streams[0], (7, 7), strides=2, padding=((3, 3), (3, 3)), use_bias=False,
                        kernel_init=stem_init, dtype=self.dtype, name='stem_conv')(x)
        else:
            x = Conv3x3Patches(streams[0], stride=2 if self.stem == 'small_stride2' else 1,
                               dtype=self.dtype, kernel_init=stem_init, name='stem_conv')(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         dtype=self.dtype, name='stem_bn')(x)
        x = nn.relu(x)
        if self.stem == 'imagenet':
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        last = (len(self.depths) - 1, self.depths[-1] - 1)
        for stage, (width, depth) in enumerate(zip(self.widths, self.depths)):
            for index in range(depth):
                downsamples = stage > 0 and index == 0
                carries_activation = (self.placement == 'all' or downsamples
                                      or (stage, index) == last)
                hidden = self.widths[stage - 1] if downsamples else width
                if self.equation == 'qlnet':
                    hidden = qlnet_width(hidden)
                x = block(
                    features=streams[stage],
                    equation=self.equation,
                    multiplier=self.multiplier,
                    weight_sharing=self.weight_sharing,
                    stride=2 if downsamples else 1,
                    mixing=self.mixing,
                    activation=self.activation if carries_activation else 'identity',
                    dtype=self.dtype,
                    derivative_impl=self.derivative_impl,
                    block_impl=self.block_impl,
                    hidden=hidden if sliced else None,
                    radius=float(np.sqrt(width)) if sliced else None,
                    name=f'stage{stage + 1}_block{index + 1}')(x, train)
        pooled = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(pooled)
        return logits.astype(jnp.promote_types(self.dtype, jnp.float32))
