"""Baseline CNNs in Flax linen: torchvision's ResNet-50 and MobileNetV3-Large.

Both models take NHWC float images, compute in ``dtype`` with float32
parameters, keep BatchNorm running statistics in the ``'batch_stats'``
collection and return float32 logits. Layouts, padding and parameter counts
match torchvision exactly, and so does BatchNorm: momentum 0.9 in flax's
convention (torch 0.1) for ResNet-50, 0.99 (torch 0.01) and epsilon 1e-3 for
MobileNetV3.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from qhnet.models import derivative

ModuleDef = Any

# torchvision initialises every conv kernel with kaiming_normal_(mode="fan_out").
_KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_RESNET_BN_MOMENTUM = 0.9
_MOBILENET_BN_MOMENTUM = 0.99


def _torch_conv(features: int, kernel_size: int, strides: int = 1, **kwargs) -> nn.Conv:
    """Square conv padded (kernel_size - 1) // 2 on each side, as torchvision."""
    pad = (kernel_size - 1) // 2
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=strides,
        padding=((pad, pad), (pad, pad)),
        kernel_init=_KAIMING_FAN_OUT,
        **kwargs,
    )


# Depthwise convolutions as stencils on the CPU: XLA:CPU runs a convolution with one group per
# channel, and its input gradient at stride 2, many times slower than these elementwise sums.

_NHWC = ("NHWC", "HWIO", "NHWC")


def _correlate(padded, kernel, stride, out_h, out_w):
    """sum over taps (dy, dx) of padded[:, s*o + dy, s*o' + dx, c] * kernel[dy, dx, 0, c],
    accumulated in float32 (float64 for float64 inputs)."""
    accumulate = jnp.promote_types(padded.dtype, jnp.float32)
    size = kernel.shape[0]
    total = None
    for dy in range(size):
        for dx in range(size):
            window = derivative.window(padded, dy, dx, stride, out_h, out_w)
            term = window.astype(accumulate) * kernel[dy, dx, 0].astype(accumulate)
            total = term if total is None else total + term
    return total


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x, kernel, stride, padding):
    """y[b, o, c] = sum over taps t of window_t(x)[b, o, c] * kernel[t, 0, c], in x's dtype:
    a depthwise convolution (kernel (k, k, 1, C)), zero padding `padding` ((lo, hi) per axis)."""
    return _depthwise_forward(x, kernel, stride, padding)[0]


def _depthwise_forward(x, kernel, stride, padding):
    (top, bottom), (left, right) = padding
    size = kernel.shape[0]
    out_h = (x.shape[1] + top + bottom - size) // stride + 1
    out_w = (x.shape[2] + left + right - size) // stride + 1
    padded = derivative.pad_hw(x, (top, bottom, 0), (left, right, 0))
    return _correlate(padded, kernel, stride, out_h, out_w).astype(x.dtype), (x, kernel)


def _depthwise_backward(stride, padding, residuals, g):
    """dx: the cotangent dilated by the stride and correlated with the flipped kernel, cropped
    to x. dkernel[t, 0, c]: one reduction of window_t(x) * g per tap."""
    x, kernel = residuals
    (top, bottom), (left, right) = padding
    size = kernel.shape[0]
    height, width = x.shape[1:3]
    out_h, out_w = g.shape[1:3]
    padded_h, padded_w = height + top + bottom, width + left + right
    dilated = derivative.pad_hw(g, (size - 1, padded_h - stride * (out_h - 1) - 1, stride - 1),
                                (size - 1, padded_w - stride * (out_w - 1) - 1, stride - 1))
    dx_padded = _correlate(dilated, kernel[::-1, ::-1], 1, padded_h, padded_w)
    dx = dx_padded[:, top:top + height, left:left + width].astype(x.dtype)
    accumulate = jnp.promote_types(x.dtype, jnp.float32)
    x_padded = derivative.pad_hw(x, (top, bottom, 0), (left, right, 0)).astype(accumulate)
    g = g.astype(accumulate)
    taps = [jnp.sum(derivative.window(x_padded, dy, dx_, stride, out_h, out_w) * g,
                    axis=(0, 1, 2)) for dy in range(size) for dx_ in range(size)]
    return dx, jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)


_depthwise.defvjp(_depthwise_forward, _depthwise_backward)


def depthwise_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                   rhs_dilation=None, dimension_numbers=None,
                                   feature_group_count=1, precision=None, **kwargs):
    """`jax.lax.conv_general_dilated` for `nn.Conv`'s `conv_general_dilated`. On the CPU a
    depthwise NHWC convolution (a square kernel per channel, equal strides, no dilation) runs
    as `_depthwise`, accumulated at full precision; anything else, and every convolution on
    other backends (whose libraries have fast depthwise kernels), goes to XLA as it is."""
    depthwise = (jax.default_backend() == "cpu"
                 and feature_group_count == lhs.shape[-1] == rhs.shape[-1] and rhs.shape[2] == 1
                 and rhs.shape[0] == rhs.shape[1] and len(set(window_strides)) == 1
                 and not kwargs and not isinstance(padding, str)
                 and all(d in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
                 and dimension_numbers is not None
                 and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
                 == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
    if not depthwise:
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
            precision=precision, **kwargs)
    return _depthwise(lhs, rhs, window_strides[0], tuple(map(tuple, padding)))


def _global_avg_pool(x: jnp.ndarray, keepdims: bool = False) -> jnp.ndarray:
    return jnp.mean(x, axis=(1, 2), keepdims=keepdims)


# --------------------------------------------------------------------------- #
# ResNet-50
# --------------------------------------------------------------------------- #

_RESNET50_STAGE_SIZES = (3, 4, 6, 3)
_RESNET50_STAGE_WIDTHS = (64, 128, 256, 512)
_BOTTLENECK_EXPANSION = 4


class _Bottleneck(nn.Module):
    """torchvision v1.5 bottleneck: 1x1 -> 3x3 (strided) -> 1x1, expansion 4."""

    width: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        out_features = self.width * _BOTTLENECK_EXPANSION
        y = nn.relu(self.norm()(self.conv(self.width, 1)(x)))
        y = nn.relu(self.norm()(self.conv(self.width, 3, strides=self.strides)(y)))
        # Zero-init the last BN scale so each block starts as the identity.
        y = self.norm(scale_init=nn.initializers.zeros)(self.conv(out_features, 1)(y))
        if x.shape[-1] != out_features or self.strides != 1:
            x = self.conv(out_features, 1, strides=self.strides, name="shortcut_conv")(x)
            x = self.norm(name="shortcut_bn")(x)
        return nn.relu(x + y)


class ResNet50(nn.Module):
    """ResNet-50 with torchvision's ``resnet50`` layout (v1.5).

    Stem: 7x7/2 conv (64, no bias), BN, ReLU, 3x3/2 max pool (padding 1).
    Four stages of [3, 4, 6, 3] bottlenecks with widths 64/128/256/512 and
    expansion 4; the stride sits in the 3x3 conv, and the first block of each
    stage has a 1x1 conv + BN projection shortcut. Global average pool and a
    Dense head with bias. Convs have no bias. As in the timm recipe, the last
    BN scale of every bottleneck is zero-initialised.

    Parameters: 23,712,932 at 100 classes, 25,557,032 at 1000 (torchvision).

    Small input (``stem="small"`` or ``"small_stride2"``, the small datasets' variants): a
    3x3 conv stem of stride 1 or 2 and no max pool, as QHNet's small stems; ``widths``
    (bottleneck widths, the stem's width ``widths[0]``) and ``depths`` then come from the
    variant, the same numbers as QHNet's.
    """

    num_classes: int = 100
    dtype: Any = jnp.float32
    stem: str = "imagenet"
    widths: Sequence[int] = _RESNET50_STAGE_WIDTHS
    depths: Sequence[int] = _RESNET50_STAGE_SIZES

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        conv = functools.partial(_torch_conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=_RESNET_BN_MOMENTUM,
            epsilon=1e-5,
            dtype=self.dtype,
        )

        if self.stem == "imagenet":
            x = conv(self.widths[0], 7, strides=2, name="stem_conv")(images)
        else:
            stride = 2 if self.stem == "small_stride2" else 1
            x = conv(self.widths[0], 3, strides=stride, name="stem_conv")(images)
        x = nn.relu(norm(name="stem_bn")(x))
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, (num_blocks, width) in enumerate(zip(self.depths, self.widths)):
            for block in range(num_blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = _Bottleneck(
                    width, strides, conv, norm, name=f"stage{stage + 1}_block{block + 1}"
                )(x)
        x = _global_avg_pool(x)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return logits.astype(jnp.float32)


# --------------------------------------------------------------------------- #
# MobileNetV3-Large
# --------------------------------------------------------------------------- #

_ACTIVATIONS = {"RE": nn.relu, "HS": nn.hard_swish}

# torchvision's mobilenet_v3_large table:
# (input, kernel, expanded, output, use_se, activation, stride)
_MOBILENET_V3_LARGE_BLOCKS = (
    (16, 3, 16, 16, False, "RE", 1),
    (16, 3, 64, 24, False, "RE", 2),
    (24, 3, 72, 24, False, "RE", 1),
    (24, 5, 72, 40, True, "RE", 2),
    (40, 5, 120, 40, True, "RE", 1),
    (40, 5, 120, 40, True, "RE", 1),
    (40, 3, 240, 80, False, "HS", 2),
    (80, 3, 200, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 480, 112, True, "HS", 1),
    (112, 3, 672, 112, True, "HS", 1),
    (112, 5, 672, 160, True, "HS", 2),
    (160, 5, 960, 160, True, "HS", 1),
    (160, 5, 960, 160, True, "HS", 1),
)
_MOBILENET_V3_LARGE_LAST_CONV = 960
_MOBILENET_V3_LARGE_LAST_DENSE = 1280


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of divisor, not going below 90% of value."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class _SqueezeExcitation(nn.Module):
    """torchvision SqueezeExcitation: pool, 1x1 fc1, ReLU, 1x1 fc2, hardsigmoid."""

    squeeze_features: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        fc = functools.partial(_torch_conv, kernel_size=1, dtype=self.dtype)
        scale = nn.relu(fc(self.squeeze_features, name="fc1")(_global_avg_pool(x, True)))
        scale = nn.hard_sigmoid(fc(x.shape[-1], name="fc2")(scale))
        return x * scale


class _InvertedResidual(nn.Module):
    """torchvision InvertedResidual: expand, depthwise, optional SE, project."""

    in_features: int
    kernel_size: int
    expanded_features: int
    out_features: int
    use_se: bool
    activation: str  # "RE" (ReLU) or "HS" (hardswish), as in torchvision's table
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    dtype: Any

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        activation = _ACTIVATIONS[self.activation]
        y = x
        if self.expanded_features != self.in_features:
            y = activation(self.norm()(self.conv(self.expanded_features, 1)(y)))
        y = self.conv(
            self.expanded_features,
            self.kernel_size,
            strides=self.strides,
            feature_group_count=self.expanded_features,
            conv_general_dilated=depthwise_conv_general_dilated,
        )(y)
        y = activation(self.norm()(y))
        if self.use_se:
            squeeze_features = _make_divisible(self.expanded_features // 4)
            y = _SqueezeExcitation(squeeze_features, self.dtype)(y)
        y = self.norm()(self.conv(self.out_features, 1)(y))
        if self.strides == 1 and self.in_features == self.out_features:
            y = x + y
        return y


class MobileNetV3Large(nn.Module):
    """MobileNetV3-Large with torchvision's ``mobilenet_v3_large`` layout.

    Stem 3x3/2 conv 3->16 + BN + hardswish; the 15 inverted-residual blocks of
    torchvision's table; 1x1 conv 160->960 + BN + hardswish; global average
    pool; Dense(1280) + hardswish + Dropout(0.2) + Dense(num_classes). BN eps
    is 1e-3 as in torchvision; convs other than the SE fcs have no bias.

    Parameters: 4,330,132 at 100 classes, 5,483,032 at 1000 (torchvision).

    Small input (``stem="small"``): the stem conv has stride 1 (``"small_stride2"``: 2, as
    the ImageNet stem); the block table stays torchvision's (the variants' widths and
    depths are not read).
    """

    num_classes: int = 100
    dtype: Any = jnp.float32
    stem: str = "imagenet"

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        conv = functools.partial(_torch_conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=_MOBILENET_BN_MOMENTUM,
            epsilon=1e-3,
            dtype=self.dtype,
        )
        # torchvision initialises Linear layers with N(0, 0.01) and zero bias.
        dense = functools.partial(
            nn.Dense, dtype=self.dtype, kernel_init=nn.initializers.normal(0.01)
        )

        x = conv(16, 3, strides=1 if self.stem == "small" else 2, name="stem_conv")(images)
        x = nn.hard_swish(norm(name="stem_bn")(x))
        for index, block_config in enumerate(_MOBILENET_V3_LARGE_BLOCKS):
            x = _InvertedResidual(
                *block_config, conv, norm, self.dtype, name=f"block{index + 1}"
            )(x)
        x = conv(_MOBILENET_V3_LARGE_LAST_CONV, 1, name="last_conv")(x)
        x = nn.hard_swish(norm(name="last_bn")(x))
        x = _global_avg_pool(x)
        x = nn.hard_swish(dense(_MOBILENET_V3_LARGE_LAST_DENSE, name="fc1")(x))
        x = nn.Dropout(0.2, deterministic=not train)(x)
        logits = dense(self.num_classes, name="fc2")(x)
        return logits.astype(jnp.float32)
