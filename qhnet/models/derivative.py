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
  shared bank tiled to one kernel per output channel. The textbook form, for
  backends with a native depthwise conv (cuDNN). On XLA:CPU its backward pass (the
  kernel gradient, a conv with batch_group_count) takes seconds per layer.
- 'folded': weight-shared only. Channels move into the batch and a dense conv
  with the m-kernel bank (1 -> m channels; with `expand=False`, m -> m depthwise)
  does the work; costs two transposes. Without weight sharing there is nothing
  to fold and it is 'grouped'.
- 'stencil': the 3x3 conv written out as the sum of its 9 shifted (and, at stride
  2, strided) slices times the kernel taps, broadcast over channels: elementwise
  work that XLA fuses into one loop, accumulated in float32 (float64 for float64
  inputs). Its backward pass is hand-written (a custom VJP): the input gradient is
  the transposed stencil, per stride phase; the kernel gradient of one bank shared
  by every channel is, on the CPU, one variadic reduction of the 9*m window-cotangent
  products (one pass over both; elsewhere 9*m reductions), of per-channel kernels a
  reduction per tap.
  Forward-mode autodiff (`jax.jvp`, `jax.jacfwd`) is not defined for it; reverse
  mode of any order is.

`DEFAULT_IMPL` is the fastest on every backend measured, by far on XLA:CPU
(`benchmarks/results/<device>/derivative.md`). On another accelerator run
`python -m benchmarks.derivative` and pick with `config.model.derivative_impl`.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from qhnet import config

DERIVATIVE_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

IMPLEMENTATIONS = config.DERIVATIVE_IMPLS
DEFAULT_IMPL = 'stencil'

_PADDING = ((1, 1), (1, 1))
_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def per_channel_kernel(kernel: jax.Array, outputs: int) -> jax.Array:
    """The (3, 3, 1, outputs) kernel stack that `kernel` stands for: a shared bank of m
    kernels repeats along the output axis (output channel c uses kernel c mod m)."""
    return jnp.tile(kernel, (1, 1, 1, outputs // kernel.shape[-1]))


def _conv(x, kernel, stride, groups):
    """A 3x3 conv at full precision, accumulated in float32 (float64 for float64 inputs;
    XLA's default precision may round float64 and float32 convolutions), in x's dtype."""
    return jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), window_strides=(stride, stride), padding=_PADDING,
        dimension_numbers=_DIMENSIONS, feature_group_count=groups,
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.promote_types(x.dtype, jnp.float32)).astype(x.dtype)


def _grouped(x, kernel, outputs, stride):
    return _conv(x, per_channel_kernel(kernel, outputs), stride, x.shape[-1])


def _folded(x, kernel, group, stride):
    """A shared bank of m kernels: (B, H, W, n*group) -> (B*n, H, W, group), one conv
    (1 -> m if group == 1, else m -> m depthwise), and back to (B, H', W', n*m)."""
    batch, height, width, channels = x.shape
    m = kernel.shape[-1]
    n = channels // group
    folded = x.reshape(batch, height, width, n, group).transpose(0, 3, 1, 2, 4)
    folded = folded.reshape(batch * n, height, width, group)
    y = _conv(folded, kernel, stride, group)
    out_h, out_w = y.shape[1:3]
    y = y.reshape(batch, n, out_h, out_w, m).transpose(0, 2, 3, 1, 4)
    return y.reshape(batch, out_h, out_w, n * m)


def window(padded, dy, dx, stride, out_h, out_w):
    """padded[:, s*o + dy, s*o' + dx, ...] at the out_h x out_w output positions (o, o') of
    a stencil: one tap's (strided) window of a spatially padded (B, H, W, ...) array."""
    trailing = padded.shape[3:]
    return jax.lax.slice(
        padded, (0, dy, dx) + (0,) * len(trailing),
        (padded.shape[0], dy + stride * (out_h - 1) + 1, dx + stride * (out_w - 1) + 1,
         *trailing),
        (1, stride, stride) + (1,) * len(trailing))


def pad_hw(x, rows=(1, 1, 0), cols=(1, 1, 0)):
    """Zero padding of the spatial axes 1 and 2: (low, high, interior) each."""
    config = [(0, 0, 0)] * x.ndim
    config[1], config[2] = rows, cols
    return jax.lax.pad(x, jnp.zeros((), x.dtype), config)


def _shifted(padded, out_h, out_w, stride):
    """The 9 windows of a 3x3 stencil, tap-major."""
    return [window(padded, dy, dx, stride, out_h, out_w) for dy in range(3) for dx in range(3)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _stencil_core(x, taps, stride):
    """x (B, H, W, A, S, 1), taps (9, S, R) -> (B, H', W', A, S, R) in taps' dtype (float32 or 64):
    sum over taps t of window_t(x) * taps[t]. A custom VJP because XLA:CPU runs JAX's own
    transpose (9 pads of the cotangent, reductions onto a 4-wide minor axis, a dilated
    cotangent at stride 2) many times slower than the forward pass."""
    return _stencil_forward(x, taps, stride)[0]


def _stencil_forward(x, taps, stride):
    batch, height, width, groups, shared = x.shape[:5]
    out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
    ratio = taps.shape[-1]
    windows = _shifted(pad_hw(x), out_h, out_w, stride)
    if shared == 1 and groups > 1:
        # One bank for all channels: one output plane per kernel r, each a sum of windows
        # times scalar taps, then interleaved. XLA:CPU vectorises this 1.6x better than
        # the broadcast of a (1, R) bank against every channel.
        planes = [sum(w[..., 0, 0].astype(taps.dtype) * taps[t, 0, r] for t, w in enumerate(windows))
                  for r in range(ratio)]
        total = jnp.stack(planes, axis=-1).reshape(batch, out_h, out_w, groups, 1, ratio)
        # Computed once: XLA:CPU otherwise recomputes the stencil inside each consumer.
        total = _stored_on_cpu(total)
    else:
        total = None
        for t, window in enumerate(windows):
            term = window.astype(taps.dtype) * taps[t]
            total = term if total is None else total + term
    return total, (x, taps)


def _transposed_stencil(g, taps, stride, height, width):
    """The input gradient of the stencil: dx[p] = sum over taps (dy, dx) and R of
    g[o] * taps[dy, dx] wherever o*stride + (dy, dx) - 1 = p.

    g (B, H', W', C, R), taps (9, C, R) -> (B, height, width, C). Computed per phase
    (p mod stride in each direction) so that a stride-2 layer does 9 taps' work at the
    output resolution, not on a dilated cotangent; the phases are then interleaved.
    """
    batch, out_h, out_w, channels, ratio = g.shape
    # g padded once: g[o] sits at padded[o + 1], so offsets -1, 0, +1 stay in range.
    # The sum over r is written out as elementwise terms, not a reduction over the minor
    # axis: XLA fuses all 9*R terms into one loop (the reduction form was much slower on CPU).
    padded = pad_hw(g)

    def phase_taps(r):  # (tap index d, offset) with p = stride*q + r reading o = q + offset
        return [(d, (r + 1 - d) // stride) for d in range(3) if (r + 1 - d) % stride == 0]

    rows, cols = -(-height // stride), -(-width // stride)
    phases = []
    for ry in range(stride):
        row = []
        for rx in range(stride):
            total = None
            for dy, oy in phase_taps(ry):
                for dx, ox in phase_taps(rx):
                    for r in range(ratio):
                        window = jax.lax.slice(padded, (0, 1 + oy, 1 + ox, 0, r),
                                               (batch, 1 + oy + rows, 1 + ox + cols, channels, r + 1))[..., 0]
                        term = window * taps[3 * dy + dx, :, r]
                        total = term if total is None else total + term
            row.append(total)
        phases.append(row)
    if stride == 1:
        return phases[0][0]
    # (B, rows, stride, cols, stride, C) -> (B, rows*stride, cols*stride, C), cropped.
    grid = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)
    return grid.reshape(batch, rows * stride, cols * stride, channels)[:, :height, :width]


def _stored_on_cpu(x):
    """x, materialised (an optimization barrier) on the CPU only: there it stops XLA from
    recomputing x's producer inside each consumer; on the GPU it would stop the fusions that
    keep x (mn channels, float32 for a cotangent) from being written at all."""
    return jax.lax.platform_dependent(x, cpu=jax.lax.optimization_barrier, default=lambda x: x)


def _variadic_sums(terms, axes):
    """jnp.stack([t.sum(axes) for t in terms]) as one variadic reduction: XLA:CPU fuses every
    term's producer into a single pass over the inputs instead of one pass per term."""
    zeros = tuple(jnp.zeros((), t.dtype) for t in terms)
    sums = jax.lax.reduce(tuple(terms), zeros, lambda a, b: tuple(x + y for x, y in zip(a, b)), axes)
    return jnp.stack(sums)


def _separate_sums(terms, axes):
    return jnp.stack([t.sum(axes) for t in terms])


def _sums(terms, axes):
    """jnp.stack([t.sum(axes) for t in terms]): one variadic reduction on the CPU, separate
    sums elsewhere (XLA:GPU cannot fit a 36-way variadic reduction in a block's shared
    memory: ptxas rejects the kernel)."""
    return jax.lax.platform_dependent(
        *terms, cpu=lambda *t: _variadic_sums(t, axes), default=lambda *t: _separate_sums(t, axes))


def _stencil_backward(stride, residuals, g):
    x, taps = residuals
    batch, height, width, groups, shared = x.shape[:5]
    out_h, out_w = g.shape[1:3]
    ratio = taps.shape[-1]
    # Input gradient on (B, H', W', channels, R), the kernels broadcast to every channel.
    g = g.astype(taps.dtype).reshape(batch, out_h, out_w, groups * shared, ratio)
    # Computed once: XLA:CPU otherwise fuses the cotangent's producer (BN_d's backward)
    # into every consumer below.
    g = _stored_on_cpu(g)
    per_channel = jnp.broadcast_to(taps[:, None], (9, groups, shared, ratio)).reshape(9, -1, ratio)
    dx = _transposed_stencil(g, per_channel, stride, height, width)
    # Kernel gradient: dtaps[t] = sum of window_t(x) * g over batch, space and the channels
    # that share a kernel.
    x_flat = x.reshape(batch, height, width, groups * shared)
    if groups > 1 and shared == 1:
        # One bank of R kernels for every channel: dtaps[t, r] = <window_t(x), g[..., r]>, all
        # 9*R sums in one variadic reduction that reads x and g once (no stacked windows);
        # it keeps the batch and channel axes, over which XLA:CPU splits it between threads.
        windows = _shifted(pad_hw(x_flat), out_h, out_w, stride)
        dtaps = _sums([w.astype(taps.dtype) * g[..., r] for w in windows for r in range(ratio)],
                      axes=(1, 2))
        dtaps = dtaps.sum(axis=(1, 2)).reshape(taps.shape)
    elif groups > 1 and ratio == 1:
        # A bank shared within groups of channels (Eq. 7): the filter gradient of the folded
        # conv (channels in the batch), which XLA computes as one convolution.
        kernel = taps.reshape(3, 3, 1, shared * ratio)
        _, vjp = jax.vjp(lambda k: _folded(x_flat.astype(taps.dtype), k, shared, stride), kernel)
        (dkernel,) = vjp(g.reshape(batch, out_h, out_w, -1))
        dtaps = dkernel.reshape(taps.shape)
    elif ratio == 1:
        # One kernel per channel (Eq. 7's (j, k) channels): the input is as wide as the
        # output, so the 9 windows must not all be live at once (XLA:CPU materialises
        # them): one tap at a time in a loop, which is also faster.
        padded = pad_hw(x_flat)
        channels = x_flat.shape[-1]

        def tap(t):
            window = jax.lax.dynamic_slice(
                padded, (0, t // 3, t % 3, 0),
                (batch, stride * (out_h - 1) + 1, stride * (out_w - 1) + 1, channels))
            window = window[:, ::stride, ::stride].astype(taps.dtype)
            return jnp.sum(window * g[..., 0], axis=(0, 1, 2))

        dtaps = jax.lax.map(tap, jnp.arange(9)).reshape(9, groups, shared, 1).sum(axis=1)
    else:  # per tap and r, a reduction onto the channel axis
        windows = _shifted(pad_hw(x_flat), out_h, out_w, stride)
        dtaps = jnp.stack([
            jnp.stack([jnp.sum(w.astype(taps.dtype) * g[..., r], axis=(0, 1, 2)) for r in range(ratio)], -1)
            for w in windows])
        dtaps = dtaps.reshape(9, groups, shared, ratio).sum(axis=1)
    return dx.reshape(x.shape).astype(x.dtype), dtaps


_stencil_core.defvjp(_stencil_forward, _stencil_backward)


def _stencil(x, kernel, outputs, stride):
    """sum over the 9 taps t of shift_t(x)[..., j, None] * kernel_t[j, i], accumulated in
    float32 (float64 for float64 inputs) and returned in x's dtype."""
    batch, height, width, channels = x.shape
    ratio = outputs // channels
    if kernel.shape[-1] % ratio:
        kernel = per_channel_kernel(kernel, outputs)
    stored = kernel.shape[-1]
    # Output channel c = j*ratio + i uses kernel c mod stored: view the kernels as
    # (stored // ratio, ratio) and the input channels as (channels*ratio // stored, stored // ratio).
    taps = kernel.reshape(9, stored // ratio, ratio).astype(jnp.promote_types(x.dtype, jnp.float32))
    dtype = x.dtype
    x = x.reshape(batch, height, width, channels * ratio // stored, stored // ratio, 1)
    y = _stencil_core(x, taps, stride)
    return y.reshape(*y.shape[:3], outputs).astype(dtype)


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
    kernel_init: nn.initializers.Initializer = DERIVATIVE_INIT

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        outputs = x.shape[-1] * (self.multiplier if self.expand else 1)
        stored = self.multiplier if self.shared else outputs
        kernel = self.param('kernel', self.kernel_init, (3, 3, 1, stored), jnp.float32)
        return depthwise_conv(x.astype(self.dtype), kernel, self.stride,
                              channel_multiplier=self.multiplier if self.expand else 1, impl=self.impl)
