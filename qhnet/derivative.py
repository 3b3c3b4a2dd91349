"""The learned derivative operator K: depthwise 3x3 convolutions.

Channel `j` of an n-channel input yields output channels `j*m + k`, k = 0..m-1
("derivative k of channel j"). With weight sharing (the paper's default) one bank
of m kernels, a single parameter of shape (3, 3, 1, m), serves every channel;
without it each channel has its own m kernels, a parameter of shape (3, 3, 1, n*m).

Eq. (7) differentiates a product that already has n*m channels laid out as
(j, k): there K applies derivative k to channel (j, k), one kernel per channel
(`expand=False`); the shared bank is still (3, 3, 1, m).

Implementations (`impl`), all computing the same function (tests/test_derivative.py)
with the same parameters; they differ only in the XLA program:

- 'grouped': one depthwise conv (`feature_group_count` = input channels) with the
  shared bank tiled to one kernel per output channel. The textbook form; fast
  where the backend has a native depthwise conv (cuDNN), slow on XLA:CPU, which
  rewrites a grouped conv into a dense conv over a block-diagonal kernel.
- 'folded': weight-shared only. Channels move into the batch and a dense conv
  with the m-kernel bank (1 -> m channels; with `expand=False`, m -> m depthwise)
  does the work; costs two transposes. Without weight sharing there is nothing
  to fold and it is 'grouped'.
- 'stencil': the 3x3 conv written out as the sum of its 9 shifted (and, at stride
  2, strided) slices times the kernel taps, broadcast over channels. Pure
  elementwise work that XLA fuses into one loop (backward too), accumulated in
  float32.

`DEFAULT_IMPL` is the one that measured fastest for the whole training step
(benchmarks/derivative.md, benchmarks/models_cpu.md).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

DERIVATIVE_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

IMPLEMENTATIONS = ('grouped', 'folded', 'stencil')
DEFAULT_IMPL = 'stencil'

_PADDING = ((1, 1), (1, 1))
_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def per_channel_kernel(kernel: jax.Array, outputs: int) -> jax.Array:
    """The (3, 3, 1, outputs) kernel stack that `kernel` stands for: a shared bank of m
    kernels repeats along the output axis (output channel c uses kernel c mod m)."""
    return jnp.tile(kernel, (1, 1, 1, outputs // kernel.shape[-1]))


def _grouped(x, kernel, outputs, stride):
    return jax.lax.conv_general_dilated(
        x, per_channel_kernel(kernel, outputs).astype(x.dtype),
        window_strides=(stride, stride), padding=_PADDING,
        dimension_numbers=_DIMENSIONS, feature_group_count=x.shape[-1])


def _folded(x, kernel, group, stride):
    """A shared bank of m kernels: (B, H, W, n*group) -> (B*n, H, W, group), one conv
    (1 -> m if group == 1, else m -> m depthwise), and back to (B, H', W', n*m)."""
    batch, height, width, channels = x.shape
    m = kernel.shape[-1]
    n = channels // group
    folded = x.reshape(batch, height, width, n, group).transpose(0, 3, 1, 2, 4)
    folded = folded.reshape(batch * n, height, width, group)
    y = jax.lax.conv_general_dilated(
        folded, kernel.astype(x.dtype), window_strides=(stride, stride), padding=_PADDING,
        dimension_numbers=_DIMENSIONS, feature_group_count=group)
    out_h, out_w = y.shape[1:3]
    y = y.reshape(batch, n, out_h, out_w, m).transpose(0, 2, 3, 1, 4)
    return y.reshape(batch, out_h, out_w, n * m)


def _stencil(x, kernel, outputs, stride):
    """sum over the 9 taps t of shift_t(x)[..., j, None] * kernel_t[j, i], in float32."""
    batch, height, width, channels = x.shape
    ratio = outputs // channels
    out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    stored = kernel.shape[-1]
    if stored % ratio == 0:
        # Kernel c mod stored for output channel c = j*ratio + i: view the bank as
        # (stored // ratio, ratio) and the input channels as (channels*ratio // stored, stored // ratio).
        taps = kernel.reshape(3, 3, stored // ratio, ratio).astype(jnp.float32)
        x_view = (channels * ratio // stored, stored // ratio, 1)
    else:
        taps = per_channel_kernel(kernel, outputs).reshape(3, 3, channels, ratio).astype(jnp.float32)
        x_view = (channels, 1)
    total = None
    for dy in range(3):
        for dx in range(3):
            shifted = jax.lax.slice(
                padded, (0, dy, dx, 0),
                (batch, dy + stride * (out_h - 1) + 1, dx + stride * (out_w - 1) + 1, channels),
                (1, stride, stride, 1))
            term = shifted.astype(jnp.float32).reshape(batch, out_h, out_w, *x_view) * taps[dy, dx]
            total = term if total is None else total + term
    return total.reshape(batch, out_h, out_w, outputs).astype(x.dtype)


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int = 1, *,
                   channel_multiplier: int | None = None, impl: str = DEFAULT_IMPL) -> jax.Array:
    """A depthwise 3x3 conv, zero padding 1: (B, H, W, C) -> (B, H', W', C * r), in x's dtype.

    `kernel` is the stored parameter, (3, 3, 1, s): output channel j*r + i (input channel j)
    uses kernel (j*r + i) mod s. So a shared bank of m kernels is s = m (r = m for K on u,
    r = 1 for Eq. (7)'s (j, k) channels) and per-channel kernels are s = C*r.
    `channel_multiplier` r defaults to max(1, s // C). Every `impl` gives the same result.
    """
    channels, stored = x.shape[-1], kernel.shape[-1]
    ratio = channel_multiplier or max(1, stored // channels)
    outputs = channels * ratio
    if kernel.shape[:3] != (3, 3, 1) or outputs % stored:
        raise ValueError(f'kernel {kernel.shape} does not fit {channels} channels x {ratio}: '
                         'expected (3, 3, 1, s) with s dividing the output channels')
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f'unknown derivative impl {impl!r}; valid choices: {list(IMPLEMENTATIONS)}')
    if impl == 'folded' and stored < outputs:
        if stored == ratio:
            return _folded(x, kernel, 1, stride)
        if ratio == 1 and channels % stored == 0:
            return _folded(x, kernel, stored, stride)
    if impl == 'stencil':
        return _stencil(x, kernel, outputs, stride)
    return _grouped(x, kernel, outputs, stride)


class Derivative(nn.Module):
    """K: `multiplier` learned 3x3 derivatives of every input channel.

    `expand=True`: (B, H, W, n) -> (B, H', W', n*m). `expand=False`: the input's n*m
    channels are (j, k) pairs and channel (j, k) gets derivative k. `impl` picks the
    XLA program (see the module docstring); it does not change parameters or results.
    """
    multiplier: int
    shared: bool = True
    expand: bool = True
    stride: int = 1
    dtype: jnp.dtype = jnp.float32
    impl: str = DEFAULT_IMPL

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        outputs = x.shape[-1] * (self.multiplier if self.expand else 1)
        stored = self.multiplier if self.shared else outputs
        kernel = self.param('kernel', DERIVATIVE_INIT, (3, 3, 1, stored), jnp.float32)
        return depthwise_conv(x.astype(self.dtype), kernel, self.stride,
                              channel_multiplier=self.multiplier if self.expand else 1, impl=self.impl)
