"""Group elements: sampling, the action on an inference form, inverses, and the invariance check.

An element is a pytree of float64 numpy arrays

    g = {'streams': {stream name: T (n x n)},
         'hidden': {block name: {'perm': int array (size,), 'scale': (scale_size,)}}}

(a missing stream or block stands for the identity). It acts on a form by

    stream entries:  'out' axis  W -> W T,   'in' axis  W -> T^-1 W      (T (x) I_r with repeat r)
                     'per_channel' axis  w -> w P  (a per-channel map diag(w): a depthwise
                     kernel, a squeeze-excite gate; T^-1 diag(w) T = diag(w P) for T = P D)
    hidden entries:  channel (j, rest) -> (perm(j), rest), times scale[old channel] ** power

computed in float64 and cast back to the form's dtype, so `act(act(p, g), inverse(g))`
returns p up to that one rounding. Elements are checked before they act: shapes,
finiteness and invertibility always, and a permutation times a diagonal wherever a
stream passes through per-channel maps (no other T keeps them per channel); cond(T) <=
MAX_CONDITION = 1e4 and membership in the group the stream admits unless `force=True`
(negative controls).
"""

import jax
import jax.numpy as jnp
import numpy as np

from qhnet.symmetry import groups
from qhnet.symmetry.families import apply, check_form, check_images
from qhnet.symmetry.folding import form_dtype
from qhnet.symmetry.spec import GroupSpec


def _rng(key) -> np.random.Generator:
    """A numpy generator seeded from a JAX PRNG key (typed or raw) or an int."""
    if isinstance(key, int):
        return np.random.default_rng(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng(np.asarray(key).ravel().tolist())


def _scales(rng: np.random.Generator, size: int, cond: float) -> np.ndarray:
    """Random signs times magnitudes with max / min = cond."""
    return rng.choice([-1.0, 1.0], size) * groups.spread(rng, size, cond)


def sample(spec: GroupSpec, key, cond: float = 10.0, group=None, hidden: bool = True,
           force: bool = False) -> dict:
    """A random element: one T per stream, and (if `hidden`) a permutation and scales per block.

    `group`: None samples each stream's admitted group; a group name, or a dict
    {stream name: group name}, asks for another one, which must be a subgroup of the
    admitted group unless `force=True`. `cond` is cond(T) for 'GL' and
    'scaled_permutation' streams and max|scale| / min|scale| for the hidden scales.
    """
    if not (isinstance(cond, (int, float, np.number)) and 1 <= cond < np.inf
            and (force or cond <= MAX_CONDITION)):
        raise ValueError(f'cond={cond!r} must be a finite number in [1, {MAX_CONDITION:g}] (the '
                         'condition numbers `verify` has a tolerance for), or larger with '
                         'force=True')
    rng = _rng(key)
    requested = group if isinstance(group, dict) else {s.name: group for s in spec.streams}
    unknown = sorted(set(requested) - {s.name for s in spec.streams})
    if unknown:
        raise ValueError(f'no streams named {unknown}; '
                         f'the streams are {[s.name for s in spec.streams]}')
    streams = {}
    for stream in spec.streams:
        chosen = requested.get(stream.name) or stream.group
        groups.check_group(chosen)
        if not force and not groups.contains(stream.group, chosen):
            raise ValueError(
                f'stream {stream.name!r} admits {stream.group}, which does not contain {chosen}: '
                f'such an element changes the function. Pass force=True to sample it anyway')
        streams[stream.name] = groups.sample_matrix(rng, chosen, stream.width, cond)
    element = {'streams': streams, 'hidden': {}}
    if hidden:
        element['hidden'] = {
            h.block: {'perm': rng.permutation(h.size), 'scale': _scales(rng, h.scale_size, cond)}
            for h in spec.hidden}
    return element


def _permute(x: np.ndarray, perm: np.ndarray, axis: int = 0) -> np.ndarray:
    """new[(perm(j), rest)] = old[(j, rest)] along `axis`, viewed as (len(perm), rest)."""
    x = np.moveaxis(x, axis, 0)
    blocks = x.reshape(len(perm), -1, *x.shape[1:])
    return np.moveaxis(blocks[np.argsort(perm)].reshape(x.shape), 0, axis)


def _scale(x: np.ndarray, scale: np.ndarray, power: int, axis: int) -> np.ndarray:
    """x times scale ** power along `axis`, each scale repeated over consecutive channels."""
    if power == 0:
        return x
    factor = np.repeat(scale ** power, x.shape[axis] // len(scale))
    return x * factor.reshape([-1 if a == axis % x.ndim else 1 for a in range(x.ndim)])


def _mix(x: np.ndarray, m: np.ndarray, axis: int, repeat: int) -> np.ndarray:
    """new[..., (i, r), ...] = sum_j old[..., (j, r), ...] m[j, i]: m (x) I_repeat along `axis`."""
    x = np.moveaxis(x, axis, -1)
    lead, n = x.shape[:-1], m.shape[0]
    rows = x.reshape(*lead, n, repeat).swapaxes(-1, -2).reshape(-1, n)  # one row per (..., r)
    if groups.monomial_entries(m) is not None:  # m[source[i], i] is column i's only nonzero
        source = np.argmax(m != 0, axis=0)
        rows = rows[:, source] * m[source, np.arange(n)]
    else:
        rows = rows @ m
    mixed = rows.reshape(*lead, repeat, n).swapaxes(-1, -2).reshape(x.shape)
    return np.moveaxis(mixed, -1, axis)


def _check(spec: GroupSpec, element: dict, force: bool, dtype) -> None:
    """Refuses elements that do not fit the spec (always) or the admitted groups (unless forced).
    Membership is checked in float64, to within what the form's `dtype` can hold."""
    unknown_keys = sorted(set(element) - {'streams', 'hidden'})
    streams = {s.name: s for s in spec.streams}
    hidden = {h.block: h for h in spec.hidden}
    unknown = sorted(set(element.get('streams', {})) - set(streams)) + \
        sorted(set(element.get('hidden', {})) - set(hidden)) + unknown_keys
    if unknown:
        raise ValueError(f'unknown names {unknown} in the element; it has keys "streams" (named '
                         f'{list(streams)}) and "hidden" (named after the blocks)')
    for name, t in element.get('streams', {}).items():
        stream, t = streams[name], np.asarray(t)
        if not np.issubdtype(t.dtype, np.floating):
            raise ValueError(f'T for stream {name!r} has dtype {t.dtype}; a change of basis is a '
                             'matrix of real numbers: pass it as floats (T.astype(np.float64))')
        t = t.astype(np.float64)
        if t.shape != (stream.width, stream.width):
            raise ValueError(f'stream {name!r} has {stream.width} channels, so T must be '
                             f'{stream.width} x {stream.width}; got shape {t.shape}')
        if not np.all(np.isfinite(t)):
            raise ValueError(f'T for stream {name!r} has non-finite entries')
        cond = groups.condition_number(t)
        if not np.isfinite(cond) or cond > 1 / np.finfo(np.float64).eps:
            raise ValueError(f'T for stream {name!r} is singular (cond {cond:.2e}); a change of '
                             'basis must be invertible')
        if not force and cond > MAX_CONDITION:
            raise ValueError(
                f'T for stream {name!r} is badly conditioned: cond(T) = {cond:.2e} > '
                f'{MAX_CONDITION:g}, beyond which rounding can change the function noticeably and '
                '`verify` has no validated tolerance. Use a better-conditioned T, or force=True')
        per_channel = [e for e in stream.entries if e.role == 'per_channel']
        if per_channel and groups.permutation_pattern(t) is None:
            raise ValueError(
                f'stream {name!r} passes through per-channel maps ({"/".join(per_channel[0].path)}'
                f', ...), which stay per channel only under a permutation times a diagonal; T has '
                'more than one nonzero in a row or column')
        reason = groups.membership_error(stream.group, t, dtype)
        if not force and reason:
            raise ValueError(
                f'T for stream {name!r} is not in {stream.group}, the group its activation admits '
                f'({reason}), so it would change the function. Pass force=True to apply it anyway')
    for name, h in element.get('hidden', {}).items():
        perm, scale = np.asarray(h['perm']), np.asarray(h['scale'], np.float64)
        size, scale_size = hidden[name].size, hidden[name].scale_size
        if perm.shape != (size,) or not np.array_equal(np.sort(perm), np.arange(size)):
            raise ValueError(f'hidden perm of {name!r} must be a permutation of range({size})')
        if scale.shape != (scale_size,) or not np.all(np.isfinite(scale)) or np.any(scale == 0):
            raise ValueError(f'hidden scale of {name!r} must be {scale_size} finite nonzero '
                             'numbers')
        cond = np.abs(scale).max() / np.abs(scale).min()
        if not force and cond > MAX_CONDITION:
            raise ValueError(f'hidden scale of {name!r} spans a ratio {cond:.2e} > '
                             f'{MAX_CONDITION:g}; pass force=True to apply it anyway')


def act(spec: GroupSpec, form: dict, element: dict, force: bool = False) -> dict:
    """The form transformed by `element` (module docstring): the same function when the element
    lies in the admitted group. Refuses a form of another model (`check_form`) and elements
    that do not fit the spec or (unless `force`) its groups."""
    check_form(spec, form)
    dtype = form_dtype(form)
    _check(spec, element, force, dtype)
    new = {name: {key: np.asarray(x, np.float64) for key, x in arrays.items()}
           for name, arrays in form.items()}

    def update(path, axis, size, fn, what):
        x = new[path[0]][path[1]]
        if x.shape[axis] % size:
            raise ValueError(f'the spec does not match the form: {"/".join(path)} axis {axis} has '
                             f'{x.shape[axis]} channels, not a multiple of {what} ({size})')
        new[path[0]][path[1]] = fn(x)

    for stream in spec.streams:
        if stream.name not in element.get('streams', {}):
            continue
        t = np.asarray(element['streams'][stream.name], np.float64)
        maps = {'out': t, 'in': groups.inverse_matrix(t).T,
                'per_channel': groups.permutation_pattern(t)}
        for e in stream.entries:
            update(e.path, e.axis, stream.width * e.repeat,
                   lambda x, e=e: _mix(x, maps[e.role], e.axis, e.repeat),
                   f'stream {stream.name!r}')
    for h in spec.hidden:
        if h.block not in element.get('hidden', {}):
            continue
        perm = np.asarray(element['hidden'][h.block]['perm'])
        scale = np.asarray(element['hidden'][h.block]['scale'], np.float64)
        for e in h.entries:
            update(e.path, e.axis, h.size,
                   lambda x, e=e: _permute(_scale(x, scale, e.power, e.axis), perm, e.axis),
                   f'the hidden channels of {h.block!r}')
    return {name: {key: x.astype(dtype) for key, x in arrays.items()}
            for name, arrays in new.items()}


def inverse(element: dict) -> dict:
    """g^-1: T -> T^-1 per stream; perm -> perm^-1 and scale -> 1 / scale, re-indexed by perm."""
    streams = {name: groups.inverse_matrix(t)
               for name, t in element.get('streams', {}).items()}
    hidden = {}
    for name, h in element.get('hidden', {}).items():
        perm = np.asarray(h['perm'])
        hidden[name] = {'perm': np.argsort(perm),
                        'scale': _permute(1 / np.asarray(h['scale'], np.float64), perm)}
    return {'streams': streams, 'hidden': hidden}


def _rounding_condition(t: np.ndarray) -> float:
    """How much T amplifies rounding: 1 for a permutation times a diagonal (scaling a row or
    column by a number rounds each entry once), cond(T) otherwise."""
    return 1.0 if groups.monomial_entries(t) is not None else groups.condition_number(t)


def condition(element: dict) -> float:
    """kappa: the largest cond(T) over the element's streams, counting permutations times
    diagonals (relu and hardtanh streams, and the hidden channels) as 1: they move and
    scale entries without mixing them, so they round nothing beyond eps."""
    return float(max((_rounding_condition(np.asarray(t, np.float64))
                      for t in element.get('streams', {}).values()), default=1.0))


TOLERANCE_FACTOR = 100.0
MAX_CONDITION = 1e4


def invariance_tolerance(dtype, kappa: float, width: int) -> float:
    """The largest relative change of the logits that rounding explains:
    100 * eps(dtype) * sqrt(width) * min(kappa, MAX_CONDITION), for streams up to `width`
    channels wide and kappa = `condition(element)`. It is capped at its value for
    MAX_CONDITION: beyond that no tolerance is validated (and one that kept growing with
    kappa would soon pass any change), so `verify` reports such elements as not verifiable.

    A change of basis turns the products over a stream into dense sums of `width` terms,
    with a rounding error of about sqrt(width) eps relative to the terms, amplified by up to
    cond(T) (docs/design.md, 'Numerics'; up to cond(T_in) cond(T_out) where a block crosses from one
    stream to the next, in the worst case). Measured (benchmarks/results/<device>/symmetry.md,
    tests/test_symmetry.py) for cond(T) <= MAX_CONDITION = 1e4, the largest accepted
    without `force`: Haar rotations of the 224x224 model's 512-wide streams move its
    float64 logits by ~300 eps = 13 eps sqrt(512); GL elements with cond(T) = 1e3 by
    3e3 eps (float32) and 4e4 eps (float64), and with cond(T) = 1e4 (32-wide streams)
    by up to 8e5 eps: a margin of 7x or more everywhere.
    """
    kappa = min(kappa, MAX_CONDITION)
    return TOLERANCE_FACTOR * float(np.finfo(dtype).eps) * np.sqrt(width) * kappa


def verify(spec: GroupSpec, form: dict, element: dict, images, force: bool = False) -> dict:
    """How much `element` changes the logits of `form` on `images`.

    Before computing anything, refuses (ValueError) a form of another model (`check_form`),
    images that are not a non-empty NHWC batch with the stem's input channels
    (`check_images`) and an element that does not fit the spec or, unless `force`, its groups
    (`act`); then logits of the form that are not finite. Returns a dict of JSON types:

        'error'       max over images of |z' - z|_inf / |z|_inf (float)
        'tolerance'   `invariance_tolerance(dtype, kappa, width)`, width the widest stream
        'kappa'       `condition(element)` (float)
        'verifiable'  kappa <= MAX_CONDITION (bool): beyond it, with `force`, rounding alone
                      can exceed any validated tolerance, so the check means nothing
        'invariant'   verifiable and error <= tolerance (bool)
        'note'        only when not verifiable: 'not verifiable at this condition number ...'
    """
    check_form(spec, form)
    check_images(spec, form, images)
    dtype = form_dtype(form)
    _check(spec, element, force, dtype)
    logits = np.asarray(apply(spec, form, images), np.float64)
    if not np.all(np.isfinite(logits)):
        raise ValueError('the logits of the form are not finite on these images, so there is '
                         'no function to compare; check the variables (an unclipped model can '
                         'overflow)')
    moved = np.asarray(apply(spec, act(spec, form, element, force=force), images), np.float64)
    scale = np.maximum(np.abs(logits).max(axis=-1), np.finfo(dtype).tiny)
    error = float((np.abs(moved - logits).max(axis=-1) / scale).max())
    kappa = condition(element)
    tol = invariance_tolerance(dtype, kappa, max(s.width for s in spec.streams))
    report = {'error': error, 'tolerance': float(tol), 'kappa': kappa,
              'verifiable': kappa <= MAX_CONDITION,
              'invariant': bool(kappa <= MAX_CONDITION and error <= tol)}
    if not report['verifiable']:
        report['note'] = (f'not verifiable at this condition number: kappa = {kappa:.3g} > '
                          f'MAX_CONDITION = {MAX_CONDITION:g}, beyond which no tolerance is '
                          f'validated (the tolerance shown is the one for {MAX_CONDITION:g})')
    return report
