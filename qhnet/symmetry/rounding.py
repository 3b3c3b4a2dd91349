"""Integer grids for weights and activations, and the quantized forward pass of an inference
form (`fold`): simulated quantization, every value rounded to the integer grid a deployed
kernel would hold and computed in float. `qhnet.symmetry.quantize` applies group elements
first; this module rounds.

- Weights: every linear map (the stem, and per block C, K, E, A, E_out and the shortcut S, the
  head; a ResNet50's convs and Dense) as symmetric integers per output channel (the last axis),
  round to nearest: W ~ q s, q in [-(2^(b-1) - 1), 2^(b-1) - 1]. Each channel's s is the one
  of `CLIP_RATIOS` times max|W| that minimises the squared rounding error. Biases stay float:
  a deployed kernel adds them to its int32 accumulator.
- Activations: every value a linear map reads after a nonlinearity, the tap points of the
  forward pass: each block's input u (read by C, E and S), its elementwise product (read by A
  or E_out), a ResNet50's hidden activations, and the pooled features (read by the head). Each
  is a static per-tensor asymmetric integer x ~ (q - z) s, q in [0, 2^b - 1]. Its range is
  calibrated on training images, point after point (each sees the points before it quantized),
  as the one of `CLIP_RATIOS` times [min, max] with the least squared error. A linear map
  applied right after another (K after E, the head after pooling) reads no new value: the two
  fuse into one linear map. The images stay as given: the stem reads them in float.
"""

import dataclasses
import functools
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from qhnet.symmetry import families
from qhnet.symmetry.families import check_images
from qhnet.symmetry.folding import is_bn_point
from qhnet.symmetry.spec import GroupSpec
from qhnet.symmetry.structure import BaselineStructure

CLIP_RATIOS = tuple(float(r) for r in np.linspace(1.0, 0.3, 15))
WEIGHT_KEYS = ('kernel', 'coef', 'derivative', 'mix_in', 'combine', 'mix_out', 'shortcut')


@dataclasses.dataclass(frozen=True)
class Bits:
    weights: int
    activations: int

    def __str__(self) -> str:
        return f'w{self.weights}a{self.activations}'


def parse_bits(bits: str | Bits) -> Bits:
    """'w4a8' -> Bits(4, 8); each width in 2..16."""
    if isinstance(bits, Bits):
        parsed = bits
    else:
        match = re.fullmatch(r'w(\d+)a(\d+)', str(bits).strip().lower())
        if not match:
            raise ValueError(f'bits={bits!r} is not of the form w<bits>a<bits>; pass e.g. w8a8, '
                             'w4a8 or w4a4')
        parsed = Bits(int(match[1]), int(match[2]))
    for what, width in (('weight', parsed.weights), ('activation', parsed.activations)):
        if not 2 <= width <= 16:
            raise ValueError(f'{width} {what} bits is outside 2..16 in bits={bits!s}; pass '
                             'widths in 2..16, e.g. w8a8, w4a8 or w4a4')
    return parsed


def check_model(spec: GroupSpec) -> None:
    """A ValueError unless the rounding covers the model: a QHNet or a ResNet50."""
    if isinstance(spec.structure, BaselineStructure) and spec.structure.model != 'ResNet50':
        raise ValueError(f'quantization covers QHNets and ResNet50; this model is a '
                         f'{spec.structure.model} (its squeeze-excite gates and hard-swish '
                         'head have no integer path here); quantize a QHNet or a ResNet50')


def is_quantized(point: str) -> bool:
    """Whether the activation at a tap point is quantized: all but the last block's unpooled
    output, which the head reads only through the pooling ('pooled'), and the values before an
    activation (`folding.is_bn_point`)."""
    return point != 'output' and not is_bn_point(point)


# The integer grids.

def weight_codes(w: np.ndarray, bits: int, ratios=CLIP_RATIOS) -> tuple[np.ndarray, np.ndarray]:
    """(q, s): integers q in [-(2^(b-1) - 1), 2^(b-1) - 1] and one scale per output channel (the
    last axis), W ~ q s, with the clipping ratio of least squared error per channel."""
    w = np.asarray(w, np.float64)
    top = 2 ** (bits - 1) - 1
    flat = w.reshape(-1, w.shape[-1])
    peak = np.abs(flat).max(axis=0)
    peak = np.where(peak > 0, peak, 1.0)
    best, best_error = None, np.full(flat.shape[1], np.inf)
    for ratio in ratios:
        scale = ratio * peak / top
        error = ((np.clip(np.round(flat / scale), -top, top) * scale - flat) ** 2).sum(axis=0)
        better = error < best_error
        best = scale if best is None else np.where(better, scale, best)
        best_error = np.minimum(error, best_error)
    codes = np.clip(np.round(w / best), -top, top).astype(np.int32)
    return codes, best


def quantize_weights(form: dict, bits: int) -> tuple[dict, dict[str, float]]:
    """(the form with every weight of `WEIGHT_KEYS` on its grid, {array: relative error})."""
    out, errors = {}, {}
    for layer, arrays in form.items():
        out[layer] = dict(arrays)
        for key, w in arrays.items():
            if key in WEIGHT_KEYS:
                codes, scale = weight_codes(w, bits)
                rounded = codes * scale
                out[layer][key] = rounded.astype(np.asarray(w).dtype)
                norm = np.linalg.norm(np.asarray(w, np.float64))
                errors[f'{layer}/{key}'] = float(np.linalg.norm(rounded - w) / max(norm, 1e-30))
    return out, errors


def activation_grid(lo, hi, bits: int):
    """(scale, zero point) of the grid x ~ (q - z) s, q in [0, 2^b - 1], that holds [lo, hi]
    (widened to hold 0, so that zero is exact)."""
    lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    levels = 2.0 ** bits - 1
    scale = jnp.maximum(hi - lo, 1e-12) / levels
    return scale, jnp.clip(jnp.round(-lo / scale), 0, levels)


def activation_codes(x, lo, hi, bits: int):
    """Integers q in [0, 2^b - 1] with x ~ (q - z) s on the grid of [lo, hi]; and (s, z)."""
    scale, zero = activation_grid(lo, hi, bits)
    return jnp.clip(jnp.round(x / scale) + zero, 0, 2.0 ** bits - 1), scale, zero


def fake_quantize(x, lo, hi, bits: int):
    """x rounded to the grid of [lo, hi] (values outside clip to its ends)."""
    codes, scale, zero = activation_codes(x, lo, hi, bits)
    return (codes - zero) * scale


def straight_through(x, rounded):
    return x + jax.lax.stop_gradient(rounded - x)


# Calibration and the quantized forward pass.

def tapped_logits(spec: GroupSpec) -> Callable:
    """(form of JAX arrays, images, tap) -> logits, through the family's tap points, for a
    model the rounding covers (`check_model`)."""
    check_model(spec)
    return families.tapped_logits(spec)


@functools.lru_cache(maxsize=16)
def _calibration_fn(spec: GroupSpec):
    logits = tapped_logits(spec)
    ratios = jnp.asarray(CLIP_RATIOS, jnp.float32)

    @jax.jit
    def calibrate_points(form, images, bits):
        ranges, errors = {}, {}

        def tap(point, x):
            if not is_quantized(point):
                return x
            lo, hi = jnp.min(x), jnp.max(x)
            mse = jax.lax.map(
                lambda r: jnp.mean((fake_quantize(x, r * lo, r * hi, bits) - x) ** 2), ratios)
            best = jnp.argmin(mse)
            chosen = ratios[best] * jnp.stack([lo, hi])
            ranges[point] = chosen
            errors[point] = jnp.sqrt(mse[best] / jnp.maximum(jnp.mean(x ** 2), 1e-30))
            return fake_quantize(x, chosen[0], chosen[1], bits)

        logits(form, images, tap)
        return ranges, errors

    return calibrate_points


def calibrate(spec: GroupSpec, form: dict, images: np.ndarray,
              bits: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """({tap point: [lo, hi]}, {tap point: relative rounding error}) of every activation
    point on `images` (module docstring), for a form whose weights are quantized already."""
    jax_form = jax.tree.map(jnp.asarray, form)
    ranges, errors = _calibration_fn(spec)(jax_form, jnp.asarray(images, np.float32),
                                           jnp.float32(bits))
    return ({p: np.asarray(r, np.float32) for p, r in ranges.items()},
            {p: float(e) for p, e in errors.items()})


@dataclasses.dataclass(frozen=True)
class Quantized:
    """A quantized model: its form (weights on their grids), the static range of every
    activation point, the bits and the group element applied before quantizing."""
    form: dict
    ranges: dict[str, np.ndarray]
    bits: Bits
    transform: str
    element: dict
    weight_errors: dict[str, float]
    activation_errors: dict[str, float]

    def variables(self) -> dict:
        """The arrays `logits_fn` reads (a pytree for `evaluation.evaluate`)."""
        return {'form': self.form, 'ranges': self.ranges}


def to_tree(quantized: Quantized) -> dict:
    """The arrays of a quantized model as a nested dict (for orbax): the form, the ranges by
    block and point, the bits."""
    ranges = {}
    for point, value in quantized.ranges.items():
        *parents, leaf = point.split('/')
        node = ranges
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = np.asarray(value)
    return {'form': quantized.form, 'ranges': ranges,
            'bits': np.array([quantized.bits.weights, quantized.bits.activations], np.int32)}


def logits_fn(spec: GroupSpec, bits: Bits | str) -> Callable:
    """(Quantized.variables(), images) -> logits of the quantized model, jitted. A tap point
    without a range in the variables stays float."""
    return _quantized_logits(spec, parse_bits(bits).activations)


@functools.lru_cache(maxsize=16)
def _quantized_logits(spec: GroupSpec, bits: int) -> Callable:
    logits = tapped_logits(spec)

    @jax.jit
    def quantized_logits(variables, images):
        ranges = variables['ranges']

        def tap(point, x):
            if point not in ranges:
                return x
            return fake_quantize(x, ranges[point][0], ranges[point][1], bits)

        return logits(variables['form'], jnp.asarray(images, jnp.float32), tap)

    return quantized_logits


def apply(spec: GroupSpec, quantized: Quantized, images) -> jax.Array:
    """Logits of the quantized model on NHWC `images` (normalised as the model reads them)."""
    check_images(spec, quantized.form, images)
    return logits_fn(spec, quantized.bits)(quantized.variables(), images)


def straight_through_weights(form: dict, bits: int) -> dict:
    """Weights on their per-channel max-abs grid, rounding passed straight through."""
    top = 2 ** (bits - 1) - 1

    def grid(w):
        scale = jnp.maximum(jnp.abs(w.reshape(-1, w.shape[-1])).max(axis=0), 1e-12) / top
        return straight_through(w, jnp.clip(jnp.round(w / scale), -top, top) * scale)

    return {layer: {key: grid(w) if key in WEIGHT_KEYS else w for key, w in arrays.items()}
            for layer, arrays in form.items()}


def point_statistics(spec: GroupSpec, form: dict, images: np.ndarray,
                     statistic: Callable[[jax.Array], jax.Array]) -> dict[str, np.ndarray]:
    """statistic(x) of the float value x at every activation point (every tap point but the
    BN points), on `images`."""
    logits = tapped_logits(spec)

    @jax.jit
    def run(form, images):
        found = {}

        def tap(point, x):
            if not is_bn_point(point):
                found[point] = statistic(x)
            return x

        logits(form, images, tap)
        return found

    return {p: np.asarray(v, np.float64) for p, v in
            run(jax.tree.map(jnp.asarray, form), jnp.asarray(images, np.float32)).items()}


def channel_peaks(spec: GroupSpec, form: dict, images: np.ndarray) -> dict[str, np.ndarray]:
    """max |x| per channel at every tap point, on `images`."""
    return point_statistics(spec, form, images,
                            lambda x: jnp.abs(x).reshape(-1, x.shape[-1]).max(axis=0))


def peak_to_rms(spec: GroupSpec, form: dict, images: np.ndarray) -> dict[str, float]:
    """max|x| / rms(x) at every tap point, on `images`: how far its largest value stands out,
    which is what a per-tensor grid pays for."""
    ratios = point_statistics(spec, form, images,
                              lambda x: jnp.max(jnp.abs(x)) / jnp.sqrt(jnp.mean(x ** 2)))
    return {p: float(v) for p, v in ratios.items()}
