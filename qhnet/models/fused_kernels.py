"""The Pallas kernels of Eq. (3)'s fused product (`qhnet.models.fused`) and the calls that
launch them: Triton on the GPU, the Pallas interpreter elsewhere.

Arrays are per image and flat over pixels: u (B, H*W, n), z (B, H'*W', n'). The channel axis
of every mn-channel array is derivative-major (k*n + j): C_k (m, n, n), A_k (m, n, n'), K's
taps (9, m) for one bank shared by every channel or (9, m, n) per channel, BN_d's folded
scale and shift (m, n).

- moments:    per image and channel chunk, the sums of K u and (K u)^2;
- forward:    per image, block of output pixels and block of output channels, z, with C u,
              K u and the product in registers, one derivative at a time;
- uncombined: per image, block of output pixels and channel chunk, the product itself, for
              XLA to apply A (where the forward kernel's repeats of C u would cost more);
- backward:   per image, channel chunk and derivative, the product recomputed: the
              cotangents of the coefficients and of K u, the product itself for dA, and the
              per-channel sums that give BN_d's gradients;
- input:      per image, block of input pixels and channel chunk, u's gradient (K's
              cotangent taken back through the transposed stencil, plus C's at the strided
              centre pixels) and the block's share of K's gradient.

The derivatives are a `fori_loop`, not unrolled, so that one derivative's values are live
at a time (unrolled, the kernels would spill registers on sm_90: `python -m
benchmarks.registers`); only the moments of a shared bank take every derivative in one pass.
`Tiles` sets the programs' sizes (`TILES` by default); `python -m benchmarks.kernels` times
each kernel under other tiles.
"""

import dataclasses
import functools
import itertools
import math
import re

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # a jax without Pallas' Triton backend: only block_impl='xla' runs
    pltriton = None

TAPS = [(dy, dx) for dy in range(3) for dx in range(3)]


@dataclasses.dataclass(frozen=True)
class Tiles:
    """How the kernels split the work: output (or input) pixels per program, channels j per
    step, output channels per forward program (powers of two; a width's step is the largest
    that divides it), and Triton's warps and software-pipelining stages per program."""
    pixels: int = 64
    channels: int = 32
    outputs: int = 64
    warps: int = 4
    stages: int = 1

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if name != 'stages' and (value < 1 or value & (value - 1)):
                raise ValueError(f'Tiles.{name} must be a power of two, got {value}')
        if self.stages < 1:
            raise ValueError(f'Tiles.stages must be at least 1, got {self.stages}')

    def __str__(self):
        return f'{self.pixels}x{self.channels}x{self.outputs}/w{self.warps}s{self.stages}'

    @classmethod
    def parse(cls, text: str) -> 'Tiles':
        """The inverse of str(): 'PIXELSxCHANNELSxOUTPUTS/wWARPSsSTAGES', e.g. '64x32x64/w4s1'."""
        match = re.fullmatch(r'(\d+)x(\d+)x(\d+)/w(\d+)s(\d+)', text.strip())
        if not match:
            raise ValueError(f'tiles {text!r}: expected PIXELSxCHANNELSxOUTPUTS/wWARPSsSTAGES, '
                             'e.g. 64x32x64/w4s1')
        return cls(*map(int, match.groups()))


TILES = Tiles()  # what `qhnet.models.fused.product` uses unless given others


def _chunk(size: int, cap: int) -> int:
    """The largest power of two up to `cap` (a power of two) that divides `size`."""
    return math.gcd(size, cap)


def _range(start, size):  # start, start + 1, ..., start + size - 1
    return start + jnp.arange(size, dtype=jnp.int32)


def _load(ref, rows, cols, mask, dtype=jnp.float32):
    """ref[rows, cols] (a 2-d gather) as `dtype`, zero where `mask` (one per row) is False."""
    safe = jnp.where(mask, rows, 0)
    return pltriton.load(ref.at[safe[:, None], cols[None, :]], mask=mask[:, None], other=0).astype(dtype)


def _store(ref, rows, cols, mask, values):
    """ref[rows, cols] = values where `mask` (rows past the end are masked: not clamped, they
    stay distinct, so the interpreter's scatter drops them)."""
    pltriton.store(ref.at[rows[:, None], cols[None, :]],
                   values.astype(ref.dtype), mask=mask[:, None])


def _dot(a, b, transpose_b=False):
    """a @ b (or a @ b.T), float32 accumulation; float32 operands at full precision."""
    dims = (((1,), (1 if transpose_b else 0,)), ((), ()))
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The spatial shapes of one layer, the kernels' tiles and the output pixels of program
    block `block`."""
    height: int
    width: int
    stride: int
    tiles: Tiles = TILES

    @property
    def out_h(self):
        return (self.height - 1) // self.stride + 1

    @property
    def out_w(self):
        return (self.width - 1) // self.stride + 1

    @property
    def outputs(self):
        return self.out_h * self.out_w

    @property
    def blocks(self):  # blocks of output pixels
        return pl.cdiv(self.outputs, self.tiles.pixels)

    def channel_step(self, channels):  # channels per step over a width of `channels`
        return _chunk(channels, self.tiles.channels)

    def output_step(self, outputs):  # output channels per forward program
        return _chunk(outputs, self.tiles.outputs)

    def pixels(self, block):
        size = self.tiles.pixels
        pixels = _range(block * size, size)
        return pixels, pixels < self.outputs

    def window(self, pixels, valid, dy, dx):
        """The input pixel that tap (dy, dx) of each output pixel reads, and whether it is
        inside the image (zero padding outside)."""
        oy, ox = pixels // self.out_w, pixels % self.out_w
        iy, ix = self.stride * oy + dy - 1, self.stride * ox + dx - 1
        inside = valid & (iy >= 0) & (iy < self.height) & (ix >= 0) & (ix < self.width)
        return iy * self.width + ix, inside


def _shared(taps_ref):
    """Whether K is one bank shared by every channel (taps (9, m)), not per channel (9, m, n)."""
    return len(taps_ref.shape) == 2


def _tap(taps_ref, t, k, chans):
    """Tap t of derivative k: a scalar for a shared bank, a row over `chans` per channel."""
    return taps_ref[t, k] if _shared(taps_ref) else taps_ref[t, k, chans][None, :]


def _derivative(u_ref, taps_ref, geometry, pixels, valid, chans, k):
    """(K_k u)[pixels, chans] = sum_t taps[t, k] * window_t(u)."""
    der = 0.0
    for t, (dy, dx) in enumerate(TAPS):
        index, inside = geometry.window(pixels, valid, dy, dx)
        der = der + _tap(taps_ref, t, k, chans) * _load(u_ref, index, chans, inside)
    return der


def _coefficient(u_ref, ck_ref, geometry, pixels, valid, chans, k):
    """(C_k u)[pixels, chans], u read at the strided centre pixels."""
    index, inside = geometry.window(pixels, valid, 1, 1)
    n = ck_ref.shape[1]
    step = geometry.channel_step(n)

    def body(ic, total):
        inputs = _range(ic * step, step)
        stream = _load(u_ref, index, inputs, inside, u_ref.dtype)
        return total + _dot(stream, ck_ref[k, inputs[:, None], chans[None, :]])

    zeros = jnp.zeros((geometry.tiles.pixels, chans.shape[0]), jnp.float32)
    return jax.lax.fori_loop(0, n // step, body, zeros)


def _product(u_ref, ck_ref, taps_ref, scale_ref, shift_ref, geometry, pixels, valid, chans, k):
    """(C_k u) * BN_d(K_k u), BN_d(d) = scale_k d + shift_k, on a (pixels, chans) tile."""
    coef = _coefficient(u_ref, ck_ref, geometry, pixels, valid, chans, k)
    der = _derivative(u_ref, taps_ref, geometry, pixels, valid, chans, k)
    return coef * (scale_ref[k, chans][None, :] * der + shift_ref[k, chans][None, :])


def _moments_kernel(u_ref, taps_ref, sums_ref, *, geometry, m):
    """sums[0, k, j] = sum of d_k, sums[1, k, j] = sum of d_k^2 over one image's pixels."""
    step = geometry.channel_step(u_ref.shape[-1])
    chans = _range(pl.program_id(1) * step, step)

    def over_pixels(ks):
        def body(block, sums):
            pixels, valid = geometry.pixels(block)
            ders = [_derivative(u_ref, taps_ref, geometry, pixels, valid, chans, k) for k in ks]
            return (tuple(s + d.sum(0) for s, d in zip(sums[0], ders)),
                    tuple(s + (d * d).sum(0) for s, d in zip(sums[1], ders)))

        zeros = tuple(jnp.zeros((step,), jnp.float32) for _ in ks)
        sums = jax.lax.fori_loop(0, geometry.blocks, body, (zeros, zeros))
        for power, (i, k) in itertools.product(range(2), enumerate(ks)):
            sums_ref[power, k, chans] = sums[power][i]

    def per_k(k, carry):
        over_pixels([k])
        return carry

    if _shared(taps_ref):  # a shared bank's taps are scalars: every k in one pass
        over_pixels(range(m))
    else:  # per-channel taps are rows: one k at a time keeps only its taps in registers
        jax.lax.fori_loop(0, m, per_k, 0)


def _forward_kernel(u_ref, ck_ref, taps_ref, scale_ref, shift_ref, ak_ref, z_ref, *, geometry, m):
    """z = sum over channel chunks and k of (C_k u * (scale_k K_k u + shift_k)) A_k on one
    block of output pixels and output channels; one (chunk, k) at a time (a loop, not
    unrolled: only one C_k u and K_k u live in registers)."""
    pixels, valid = geometry.pixels(pl.program_id(1))
    n, outputs = u_ref.shape[-1], z_ref.shape[-1]
    width = geometry.output_step(outputs)
    outs = _range(pl.program_id(2) * width, width)
    step = geometry.channel_step(n)

    def body(index, total):
        k, chans = jax.lax.rem(index, m), _range(jax.lax.div(index, m) * step, step)
        product = _product(u_ref, ck_ref, taps_ref, scale_ref, shift_ref, geometry, pixels, valid,
                           chans, k).astype(ak_ref.dtype)
        return total + _dot(product, ak_ref[k, chans[:, None], outs[None, :]])

    total = jax.lax.fori_loop(0, n // step * m, body,
                              jnp.zeros((geometry.tiles.pixels, width), jnp.float32))
    _store(z_ref, pixels, outs, valid, total)


def _uncombined_kernel(u_ref, ck_ref, taps_ref, scale_ref, shift_ref, product_ref, *, geometry, m):
    """The product (C_k u) * (scale_k K_k u + shift_k) on one block of output pixels and one
    channel chunk, for every k: for XLA to apply A where the forward kernel's repeats of C u
    would cost more."""
    pixels, valid = geometry.pixels(pl.program_id(1))
    n = u_ref.shape[-1]
    step = geometry.channel_step(n)
    chans = _range(pl.program_id(2) * step, step)

    def per_k(k, carry):
        product = _product(u_ref, ck_ref, taps_ref, scale_ref, shift_ref, geometry, pixels, valid,
                           chans, k)
        _store(product_ref, pixels, k * n + chans, valid, product)
        return carry

    jax.lax.fori_loop(0, m, per_k, 0)


def _backward_kernel(u_ref, dz_ref, ck_ref, taps_ref, scale_ref, shift_ref, ak_ref,
                     dcoef_ref, product_ref, dnorm_ref, der_ref, sums_ref, *, geometry, m):
    """Per channel chunk and derivative k of one image, over all its output pixels: with
    e_k = dprod_k * coef_k (the cotangent of BN_d's output), writes dcoef_k = dprod_k * BN_d(d_k),
    the product, e_k * scale_k and d_k, and sums e_k * d_k and e_k (BN_d's scale and shift
    gradients)."""
    n, outputs = u_ref.shape[-1], dz_ref.shape[-1]
    step = geometry.channel_step(n)
    chans, k = _range(pl.program_id(1) * step, step), pl.program_id(2)
    width = geometry.output_step(outputs)
    scale, shift = scale_ref[k, chans][None, :], shift_ref[k, chans][None, :]
    columns = k * n + chans

    def per_block(block, sums):
        pixels, valid = geometry.pixels(block)

        def dprod_step(oc, total):  # dprod_k = dz A_k^T
            outs = _range(oc * width, width)
            cotangent = _load(dz_ref, pixels, outs, valid, ak_ref.dtype)
            return total + _dot(cotangent, ak_ref[k, chans[:, None], outs[None, :]], True)

        dprod = jax.lax.fori_loop(0, outputs // width, dprod_step,
                                  jnp.zeros((geometry.tiles.pixels, step), jnp.float32))
        coef = _coefficient(u_ref, ck_ref, geometry, pixels, valid, chans, k)
        der = _derivative(u_ref, taps_ref, geometry, pixels, valid, chans, k)
        normed = scale * der + shift  # as in _product, with scale and shift loaded once
        dnorm = dprod * coef
        _store(dcoef_ref, pixels, columns, valid, dprod * normed)
        _store(product_ref, pixels, columns, valid, coef * normed)
        _store(dnorm_ref, pixels, columns, valid, dnorm * scale)
        _store(der_ref, pixels, columns, valid, der)
        return sums[0] + (dnorm * der).sum(0), sums[1] + dnorm.sum(0)

    zeros = jnp.zeros((step,), jnp.float32)
    dscale, dshift = jax.lax.fori_loop(0, geometry.blocks, per_block, (zeros, zeros))
    sums_ref[0, k, chans] = dscale
    sums_ref[1, k, chans] = dshift


def _input_kernel(dnorm_ref, der_ref, u_ref, dcentres_ref, taps_ref, dmean_ref, dsquare_ref,
                  du_ref, dtaps_ref, *, geometry, m):
    """K's cotangent dd_k = e_k * scale_k + ds1_k + 2 ds2_k d_k (ds: the gradients of BN_d's
    batch sums) taken back through K on one block of input pixels, plus u's cotangent through
    C: du[p, j] = sum over taps t and k of taps[t, k, j] * dd_k[o, j], o the output pixel that
    reads p through tap t, + dcentres[c, j] where p is the centre pixel of output pixel c; and
    the block's share of K's gradient, dtaps[t, k] = sum over p (and j, for a shared bank) of
    u[p, j] * dd_k[o, j]."""
    n = du_ref.shape[-1]
    step = geometry.channel_step(n)
    chans = _range(pl.program_id(2) * step, step)
    size = geometry.tiles.pixels
    pixels = _range(pl.program_id(1) * size, size)
    valid = pixels < geometry.height * geometry.width
    stream = _load(u_ref, pixels, chans, valid)
    py, px = pixels // geometry.width, pixels % geometry.width
    s = geometry.stride
    total = jnp.zeros((size, step), jnp.float32)
    for t, (dy, dx) in enumerate(TAPS):
        ny, nx = py - dy + 1, px - dx + 1
        oy, ox = ny // s, nx // s
        reads = (valid & (ny >= 0) & (nx >= 0) & (ny % s == 0) & (nx % s == 0)
                 & (oy < geometry.out_h) & (ox < geometry.out_w))
        index = oy * geometry.out_w + ox
        for k in range(m):
            columns = k * n + chans
            cotangent = (_load(dnorm_ref, index, columns, reads)
                         + jnp.where(reads[:, None], dmean_ref[k, chans][None, :], 0.0)
                         + 2 * dsquare_ref[k, chans][None, :] * _load(der_ref, index, columns, reads))
            total = total + _tap(taps_ref, t, k, chans) * cotangent
            share = (stream * cotangent).sum(0)
            if _shared(taps_ref):
                dtaps_ref[pl.program_id(2), t, k] = share.sum()
            else:
                dtaps_ref[t, k, chans] = share
    centre = valid & (py % s == 0) & (px % s == 0)
    total = total + _load(dcentres_ref, py // s * geometry.out_w + px // s, chans, centre)
    _store(du_ref, pixels, chans, valid, total)


def _image(rows, cols):
    """One image's (rows, cols) slab of a (B, rows, cols) array."""
    return pl.BlockSpec((None, rows, cols), lambda b, *_: (b, 0, 0))


def _whole(shape):  # the whole array in every program
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _call(kernel, grid, in_specs, out_shapes, out_specs, interpret, **static):
    tiles = static['geometry'].tiles
    params = (None if interpret
              else pltriton.CompilerParams(num_warps=tiles.warps, num_stages=tiles.stages))
    return pl.pallas_call(functools.partial(kernel, **static), out_shape=out_shapes, grid=grid,
                          in_specs=in_specs, out_specs=out_specs, compiler_params=params,
                          interpret=interpret)


def moments(u, taps, *, geometry, interpret):
    batch, pixels, n = u.shape
    m = taps.shape[1]
    return _call(_moments_kernel, (batch, n // geometry.channel_step(n)),
                 [_image(pixels, n), _whole(taps.shape)],
                 jax.ShapeDtypeStruct((batch, 2, m, n), jnp.float32),
                 pl.BlockSpec((None, 2, m, n), lambda b, c: (b, 0, 0, 0)),
                 interpret, geometry=geometry, m=m)(u, taps)


def forward(u, ck, taps, scale, shift, ak, *, geometry, interpret):
    batch, pixels, n = u.shape
    m, outputs = ak.shape[0], ak.shape[-1]
    grid = (batch, geometry.blocks, outputs // geometry.output_step(outputs))
    weights = (ck, taps, scale, shift, ak)
    return _call(_forward_kernel, grid, [_image(pixels, n)] + [_whole(w.shape) for w in weights],
                 jax.ShapeDtypeStruct((batch, geometry.outputs, outputs), u.dtype),
                 _image(geometry.outputs, outputs), interpret, geometry=geometry, m=m)(u, *weights)


def uncombined(u, ck, taps, scale, shift, *, geometry, interpret):
    batch, pixels, n = u.shape
    m = scale.shape[0]
    weights = (ck, taps, scale, shift)
    return _call(_uncombined_kernel, (batch, geometry.blocks, n // geometry.channel_step(n)),
                 [_image(pixels, n)] + [_whole(w.shape) for w in weights],
                 jax.ShapeDtypeStruct((batch, geometry.outputs, m * n), u.dtype),
                 _image(geometry.outputs, m * n), interpret, geometry=geometry, m=m)(u, *weights)


def backward(u, dz, ck, taps, scale, shift, ak, *, geometry, interpret):
    batch, pixels, n = u.shape
    m = ak.shape[0]
    weights = (ck, taps, scale, shift, ak)
    wide = jax.ShapeDtypeStruct((batch, geometry.outputs, m * n), u.dtype)
    return _call(_backward_kernel, (batch, n // geometry.channel_step(n), m),
                 [_image(pixels, n), _image(geometry.outputs, dz.shape[-1])]
                 + [_whole(w.shape) for w in weights],
                 [wide] * 4 + [jax.ShapeDtypeStruct((batch, 2, m, n), jnp.float32)],
                 [_image(geometry.outputs, m * n)] * 4
                 + [pl.BlockSpec((None, 2, m, n), lambda b, *_: (b, 0, 0, 0))],
                 interpret, geometry=geometry, m=m)(u, dz, *weights)


def input_gradient(dnorm, der, u, dcentres, taps, dmean, dsquare, *, geometry, interpret):
    """u's gradient (through K and, from `dcentres`, through C), and K's gradient per image and
    block of input pixels: (B, blocks, chunks, 9, m) for a shared bank (a value per channel
    chunk), (B, blocks, 9, m, n) for per-channel kernels."""
    batch, pixels, n = u.shape
    m = dmean.shape[0]
    chunks = n // geometry.channel_step(n)
    blocks = pl.cdiv(pixels, geometry.tiles.pixels)
    share = (chunks,) + taps.shape if taps.ndim == 2 else taps.shape
    return _call(_input_kernel, (batch, blocks, chunks),
                 [_image(geometry.outputs, m * n)] * 2
                 + [_image(pixels, n), _image(geometry.outputs, n)]
                 + [_whole(a.shape) for a in (taps, dmean, dsquare)],
                 [jax.ShapeDtypeStruct((batch, pixels, n), u.dtype),
                  jax.ShapeDtypeStruct((batch, blocks) + share, jnp.float32)],
                 [_image(pixels, n),
                  pl.BlockSpec((None, None) + share, lambda b, p, c: (b, p) + (0,) * len(share))],
                 interpret, geometry=geometry, m=m)(dnorm, der, u, dcentres, taps, dmean, dsquare)
