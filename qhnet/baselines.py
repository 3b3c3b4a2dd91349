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
import jax.numpy as jnp

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

    Small input (``stem="small"``, the small datasets' variants): a 3x3/1 conv stem and no
    max pool, as QHNet's small stem; ``widths`` (bottleneck widths, the stem's width
    ``widths[0]``) and ``depths`` then come from the variant, the same numbers as QHNet's.
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

        if self.stem == "small":
            x = nn.relu(norm(name="stem_bn")(conv(self.widths[0], 3, name="stem_conv")(images)))
        else:
            x = conv(self.widths[0], 7, strides=2, name="stem_conv")(images)
            x = nn.relu(norm(name="stem_bn")(x))
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

    Small input (``stem="small"``): the stem conv has stride 1; the block table stays
    torchvision's (the variants' widths and depths are not read).
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
