"""Low-bit inference of a folded model, and the group elements that make it easier to quantize.

    quantized = quantize(spec, form, images, bits='w4a4', transform='learned')
    logits = apply(spec, quantized, test_images)       # the quantized model: a pure function

The rounding (`qhnet.symmetry.rounding`, whose names this module re-exports): weights as
symmetric per-output-channel integers, activations as static per-tensor integers at every
value a linear map reads after a nonlinearity, ranges calibrated on training images.

Transforms: group elements applied before quantizing (`act`), each exact in float.

    none       nothing
    random     a Haar-random orthogonal T on each stream that admits O(n) (ball activations,
               and the identity activation's GL(n))
    hadamard   a randomised Hadamard T = H diag(+-1) / sqrt(n) on those streams where n is a
               power of 2 (Haar-random elsewhere)
    learned    T = T_0 cayley(X) on those streams, T_0 the randomised Hadamard, with X
               optimised by Adam on the calibration images to minimise the squared error of
               the quantized model's logits (rounding passed straight through); a GL(n)
               stream also learns a scaling, T = T_0 cayley(X) diag(exp(sigma)), and an Eq. (3)
               block the scales exp(h) of its product channels (C's columns times exp(h), A's
               rows times exp(-h))
    smooth     positive channel scalings where the group allows them (the product channels of
               Eq. (3) blocks, relu streams, GL streams): s = sqrt(max|x| / max|W|) per channel
               divides the activation and multiplies the weights that read it (SmoothQuant
               with alpha = 1/2); 'smooth+random', 'smooth+hadamard', 'smooth+learned' rotate
               first, then smooth

A ResNet50's streams are relu: it admits no rotation, only 'none' and 'smooth'. A stream
element never changes a block's product (hidden channels, reached only by their own
permutations and scalings): rotations act on the block inputs and the pooled features.
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.linalg

from qhnet.symmetry import groups
from qhnet.symmetry.action import act
from qhnet.symmetry.families import check_form, check_images, tap_streams
from qhnet.symmetry.folding import no_tap
from qhnet.symmetry.rounding import (CLIP_RATIOS, WEIGHT_KEYS, Bits, Quantized, activation_codes,
                                     activation_grid, apply, calibrate, channel_peaks,
                                     check_model, fake_quantize, is_quantized, logits_fn,
                                     parse_bits, peak_to_rms, quantize_weights, straight_through,
                                     straight_through_weights, tapped_logits, to_tree,
                                     weight_codes)
from qhnet.symmetry.spec import GroupSpec
from qhnet.symmetry.structure import Structure

__all__ = ['CLIP_RATIOS', 'ROTATIONS', 'TRANSFORMS', 'WEIGHT_KEYS', 'Bits', 'Quantized',
           'activation_codes', 'activation_grid', 'apply', 'calibrate', 'check_supported',
           'fake_quantize', 'is_quantized', 'learn_rotations', 'logits_fn', 'parse_bits',
           'parse_transform', 'peak_to_rms', 'quantize', 'quantize_weights', 'randomised_hadamard',
           'rotatable', 'smooth_element', 'to_tree', 'transform_element', 'weight_codes']

ROTATIONS = ('random', 'hadamard', 'learned')
TRANSFORMS = ('none', 'smooth', *ROTATIONS, *(f'smooth+{r}' for r in ROTATIONS))


def parse_transform(transform: str) -> tuple[bool, str | None]:
    """'smooth+learned' -> (smooth, rotation) = (True, 'learned'); 'none' -> (False, None)."""
    if transform not in TRANSFORMS:
        raise ValueError(f'unknown transform {transform!r}; pass one of {list(TRANSFORMS)}')
    parts = transform.split('+')
    return 'smooth' in parts, next((p for p in parts if p in ROTATIONS), None)


# The transforms.

def rotatable(spec: GroupSpec) -> list:
    """The streams whose group contains O(n)."""
    return [s for s in spec.streams if groups.contains(s.group, 'O')]


def _scalable(spec: GroupSpec) -> list:
    return [s for s in spec.streams if groups.contains(s.group, 'scaled_permutation')]


def randomised_hadamard(rng: np.random.Generator, n: int) -> np.ndarray:
    """H diag(+-1) / sqrt(n) for n a power of 2, else a Haar-random orthogonal matrix."""
    if n & (n - 1):
        return groups.sample_matrix(rng, 'O', n)
    return scipy.linalg.hadamard(n).astype(np.float64) * rng.choice([-1.0, 1.0], n) / np.sqrt(n)


def _random_element(spec: GroupSpec, rotation: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    sample = randomised_hadamard if rotation != 'random' else (
        lambda rng, n: groups.sample_matrix(rng, 'O', n))
    return {'streams': {s.name: sample(rng, s.width) for s in rotatable(spec)}, 'hidden': {}}


def _mix(x, m, axis: int, repeat: int):
    """new[..., (i, r), ...] = sum_j old[..., (j, r), ...] m[j, i] (`action._mix`, in JAX)."""
    x = jnp.moveaxis(x, axis, -1)
    lead, n = x.shape[:-1], m.shape[0]
    rows = x.reshape(*lead, n, repeat).swapaxes(-1, -2) @ m
    return jnp.moveaxis(rows.swapaxes(-1, -2).reshape(x.shape), -1, axis)


def _cayley(skew):
    """(I - A)^-1 (I + A), orthogonal for A = X - X^T."""
    a = skew - skew.T
    eye = jnp.eye(a.shape[0], dtype=a.dtype)
    return jnp.linalg.solve(eye - a, eye + a)


def _learned_matrices(params: dict, starts: dict) -> dict:
    """{stream: (T, (T^-1)^T)} for T = T_0 cayley(X) diag(exp(sigma))."""
    out = {}
    for name, p in params.items():
        q = starts[name] @ _cayley(p['skew'])
        scale = jnp.exp(p['log_scale']) if 'log_scale' in p else 1.0
        out[name] = (q * scale, q / scale)
    return out


def _act_streams(spec: GroupSpec, form: dict, matrices: dict, product_scales: dict) -> dict:
    """The form with each stream's (T, (T^-1)^T) applied to its 'out' and 'in' entries, and an
    Eq. (3) block's product channels scaled: C's columns by exp(h), A's rows by exp(-h)."""
    new = {layer: dict(arrays) for layer, arrays in form.items()}
    for stream in spec.streams:
        if stream.name in matrices:
            t, inverse_t = matrices[stream.name]
            for e in stream.entries:
                m = t if e.role == 'out' else inverse_t
                new[e.path[0]][e.path[1]] = _mix(new[e.path[0]][e.path[1]], m, e.axis, e.repeat)
    for block, h in product_scales.items():
        new[block]['coef'] = new[block]['coef'] * jnp.exp(h)
        new[block]['combine'] = new[block]['combine'] * jnp.exp(-h)[:, None]
    return new


def learn_rotations(spec: GroupSpec, form: dict, images: np.ndarray, bits: Bits, seed: int = 0,
                    steps: int = 200, batch_size: int = 64, learning_rate: float = 2e-3,
                    progress: Callable[[int, float], None] | None = None) -> dict:
    """The 'learned' element (module docstring): float64 matrices, orthogonal on O(n) streams."""
    streams = rotatable(spec)
    starts = _random_element(spec, 'hadamard', seed)['streams']
    params = {'streams': {s.name: {'skew': jnp.zeros((s.width, s.width), jnp.float32)}
                          for s in streams}, 'products': {}}
    for s in streams:
        if s.group == 'GL':
            params['streams'][s.name]['log_scale'] = jnp.zeros(s.width, jnp.float32)
    if _scales_products(spec):
        params['products'] = {h.block: jnp.zeros(h.scale_size, jnp.float32) for h in spec.hidden}
    jax_form = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), form)
    jax_starts = {name: jnp.asarray(t, jnp.float32) for name, t in starts.items()}
    images = np.asarray(images, np.float32)
    float_logits = _float_logits(spec)
    target = np.concatenate([np.asarray(float_logits(jax_form, images[i:i + 256]))
                             for i in range(0, len(images), 256)])
    optimizer, step = _learning_step(spec, bits, steps, learning_rate)
    state = optimizer.init(params)
    rng = np.random.default_rng(seed)
    for i in range(steps):
        chosen = rng.choice(len(images), min(batch_size, len(images)), replace=False)
        params, state, value = step(params, state, jax_form, jax_starts, images[chosen],
                                    target[chosen])
        if progress:
            progress(i, float(value))
    sizes = {h.block: h.size for h in spec.hidden}
    element = {'streams': {}, 'hidden': {
        block: {'perm': np.arange(sizes[block]), 'scale': np.exp(np.asarray(h, np.float64))}
        for block, h in params['products'].items()}}
    for name, p in params['streams'].items():
        skew = np.asarray(p['skew'], np.float64)
        a = skew - skew.T
        eye = np.eye(len(a))
        t = starts[name] @ np.linalg.solve(eye - a, eye + a)
        if 'log_scale' in p:
            t = t * np.exp(np.asarray(p['log_scale'], np.float64))
        element['streams'][name] = t
    return element


@functools.lru_cache(maxsize=16)
def _float_logits(spec: GroupSpec) -> Callable:
    logits = tapped_logits(spec)
    return jax.jit(lambda form, images: logits(form, images, no_tap))


@functools.lru_cache(maxsize=16)
def _learning_step(spec: GroupSpec, bits: Bits, steps: int, learning_rate: float):
    """(optimizer, jitted step) of `learn_rotations`: Adam on the squared error of the
    quantized logits, weights and activations rounded straight through."""
    logits = tapped_logits(spec)

    def tap(point, x):
        if not is_quantized(point):
            return x
        lo, hi = jax.lax.stop_gradient(jnp.min(x)), jax.lax.stop_gradient(jnp.max(x))
        return straight_through(x, fake_quantize(x, lo, hi, bits.activations))

    def loss(params, form, starts, x, y):
        moved = _act_streams(spec, form, _learned_matrices(params['streams'], starts),
                             params['products'])
        return jnp.mean((logits(straight_through_weights(moved, bits.weights), x, tap) - y) ** 2)

    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))

    @jax.jit
    def step(params, state, form, starts, x, y):
        value, grads = jax.value_and_grad(loss)(params, form, starts, x, y)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    return optimizer, step


def _scales_products(spec: GroupSpec) -> bool:
    """Whether the hidden scales are the product channels' (Eq. (3): C's columns, A's rows)."""
    return isinstance(spec.structure, Structure) and spec.structure.equation == 3


def _balance(activation: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """SmoothQuant's s = sqrt(max|x| / max|W|), held within a ratio of 1e4 (`MAX_CONDITION`)."""
    floor = 1e-8
    s = np.sqrt(np.maximum(activation, floor) / np.maximum(weight, floor))
    middle = np.exp(np.mean(np.log(s)))
    return np.clip(s, middle / 100, middle * 100)


def smooth_element(spec: GroupSpec, form: dict, images: np.ndarray) -> dict:
    """The 'smooth' element (module docstring): diagonal T = diag(1/s) on relu and GL streams,
    hidden scales 1/s on the product channels of Eq. (3) blocks."""
    peaks = channel_peaks(spec, form, images)
    on_stream = tap_streams(spec)
    element = {'streams': {}, 'hidden': {}}
    for stream in _scalable(spec):
        activation = np.max([peaks[p] for p, s in on_stream.items() if s == stream.name], axis=0)
        weight = np.zeros(stream.width)
        for e in stream.entries:
            if e.role == 'in':
                w = np.moveaxis(np.abs(np.asarray(form[e.path[0]][e.path[1]], np.float64)),
                                e.axis, 0)
                weight = np.maximum(weight, w.reshape(stream.width, -1).max(axis=1))
        element['streams'][stream.name] = np.diag(1 / _balance(activation, weight))
    if _scales_products(spec):
        for hidden in spec.hidden:
            combine = np.abs(np.asarray(form[hidden.block]['combine'], np.float64)).max(axis=1)
            scale = 1 / _balance(peaks[f'{hidden.block}/product'], combine)
            element['hidden'][hidden.block] = {'perm': np.arange(hidden.size), 'scale': scale}
    return element


def check_supported(spec: GroupSpec, transform: str) -> None:
    """Refuses a model without tap points (MobileNetV3), an unknown transform, and a rotation
    on a model with no stream that admits one."""
    check_model(spec)
    _, rotation = parse_transform(transform)
    if rotation and not rotatable(spec):
        groups_seen = sorted({s.group for s in spec.streams})
        raise ValueError(f'transform {transform!r} rotates the streams that admit O(n), and this '
                         f'model has none (its streams admit {", ".join(groups_seen)}); use '
                         "'none' or 'smooth'")


def transform_element(spec: GroupSpec, form: dict, images: np.ndarray, transform: str,
                      bits: Bits, seed: int = 0, **learn) -> dict:
    """The group element `transform` applies to `form` (module docstring), before smoothing."""
    _, rotation = parse_transform(transform)
    check_supported(spec, transform)
    if rotation == 'learned':
        return learn_rotations(spec, form, images, bits, seed, **learn)
    if rotation:
        return _random_element(spec, rotation, seed)
    return {'streams': {}, 'hidden': {}}


def _compose(first: dict, then: dict) -> dict:
    """The element that acts as `first`, then `then`, where both hold identity permutations."""
    streams = dict(first['streams'])
    for name, t in then['streams'].items():
        streams[name] = streams[name] @ t if name in streams else t
    hidden = dict(first['hidden'])
    for block, h in then['hidden'].items():
        scale = hidden[block]['scale'] * h['scale'] if block in hidden else h['scale']
        hidden[block] = {'perm': h['perm'], 'scale': scale}
    return {'streams': streams, 'hidden': hidden}


def quantize(spec: GroupSpec, form: dict, images: np.ndarray, bits: Bits | str = 'w8a8',
             transform: str = 'none', seed: int = 0, **learn) -> Quantized:
    """The quantized model (module docstring): `transform`'s element applied to `form`
    (float32), weights rounded, activation ranges calibrated on `images` (training images,
    normalised as the model reads them). `learn`: `learn_rotations`' options."""
    bits = parse_bits(bits)
    smooth, _ = parse_transform(transform)
    check_supported(spec, transform)
    check_form(spec, form)
    check_images(spec, form, images)
    images = np.asarray(images, np.float32)
    form = jax.tree.map(lambda x: np.asarray(x, np.float32), form)
    element = transform_element(spec, form, images, transform, bits, seed, **learn)
    moved = act(spec, form, element) if element['streams'] or element['hidden'] else form
    if smooth:
        smoothing = smooth_element(spec, moved, images)
        moved = act(spec, moved, smoothing)
        element = _compose(element, smoothing)
    rounded, weight_errors = quantize_weights(moved, bits.weights)
    ranges, activation_errors = calibrate(spec, rounded, images, bits.activations)
    return Quantized(form=rounded, ranges=ranges, bits=bits, transform=transform,
                     element=element, weight_errors=weight_errors,
                     activation_errors=activation_errors)

