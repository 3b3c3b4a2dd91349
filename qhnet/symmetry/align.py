"""Two trained models of one architecture aligned through the group, and the line between them
(docs/symmetry.md, 'Aligning and merging models').

Models trained from different seeds compute similar functions in different coordinates, so
the average of their weights is a poor model: the loss along the line between them rises into
a barrier. `align` finds the element g that moves model B into model A's coordinates by
matching their activations on calibration images, one set of channels at a time:

    stream of group 'O'        T = U V^T for X_B^T X_A = U S V^T (orthogonal Procrustes)
    stream of group 'GL'       T = (X_B^T X_B)^-1 X_B^T X_A (least squares), its singular
                               values held within a ratio `max_condition`; or Procrustes
    a stream of permutations   the assignment of B's channels to A's of largest summed
    (any scaled or signed)     correlation (`scipy.optimize.linear_sum_assignment`); signed:
                               of |correlation|, with its sign; scaled: times rms(a) / rms(b)
    a block's hidden channels  the assignment of the product's units (each hidden channel j
                               with its derivatives), by their summed |correlation| (the
                               scales may be negative); each scale sign(<a, b>) rms(a) /
                               rms(b) on the channels it covers

X_A, X_B: the values at every tap point of the set (`families.tap_streams`; a block's hidden
channels are read at its product), one row per image and pixel. Every set is solved on its
own, from the two models as trained: `act` keeps the function, so B's values on a stream
become X_B T whatever the other sets' elements are, and a product does not change at all
under the streams' elements. Only second moments are kept (X_B^T X_A, X_B^T X_B, sums).

`method='permutation'` allows permutations only, on every stream and hidden set (no rotation,
no scaling): the activation matching of Git Re-Basin, the comparison that shows what the
continuous group adds. Every scale and every GL element is held within a ratio
`max_condition` (default 100): a channel that is nearly dead in one model would otherwise ask
for an enormous one.

`interpolate(form_a, form_b, alpha)` is (1 - alpha) A + alpha B, array by array, on folded
forms. `repair` is REPAIR's correction (Jordan et al., 2023): at every value that a
BatchNorm wrote in the trained models (`folding.bn_point`), a per-channel affine map gives
the interpolated model the interpolation of the endpoints' means and standard deviations on
the calibration images; it is folded into the layer that writes the value (`repairer`
measures the endpoints once, for a line's many alphas). `barriers` reads
the largest rise of the loss above, and drop of top-1 below, the endpoints' straight line.
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from qhnet.symmetry.action import MAX_CONDITION, act
from qhnet.symmetry.families import (bn_layers, check_form, check_images, tap_streams,
                                     tapped_logits)
from qhnet.symmetry.folding import HIGHEST, form_dtype, is_bn_point
from qhnet.symmetry.spec import GroupSpec, Hidden

METHODS = ('group', 'permutation')
GL_SOLVERS = ('least_squares', 'procrustes')
ALPHAS = tuple(np.round(np.linspace(0.0, 1.0, 11), 2).tolist())


# Second moments of the two models' values.

def _sets(spec: GroupSpec) -> dict[str, tuple[str, str]]:
    """{tap point: ('streams', stream) or ('hidden', block)}: the set each point's values lie on."""
    points = {point: ('streams', stream) for point, stream in tap_streams(spec).items()}
    points.update({f'{h.block}/product': ('hidden', h.block) for h in spec.hidden})
    return points


@functools.lru_cache(maxsize=16)
def _moments_fn(spec: GroupSpec) -> Callable:
    """A jitted (form_a, form_b, images) -> {tap point: moments} (`_moments`' keys)."""
    logits, points = tapped_logits(spec), _sets(spec)

    def values(form, images):
        seen = {}

        def tap(point, x):
            if point in points:
                seen[point] = x.reshape(-1, x.shape[-1])
            return x

        logits(form, images, tap)
        return seen

    @jax.jit
    def moments(form_a, form_b, images):
        seen_a, seen_b = values(form_a, images), values(form_b, images)
        return {point: {'count': jnp.asarray(seen_a[point].shape[0], seen_a[point].dtype),
                        'sum_a': seen_a[point].sum(0), 'sum_b': seen_b[point].sum(0),
                        'sq_a': (seen_a[point] ** 2).sum(0),
                        'bb': jnp.dot(seen_b[point].T, seen_b[point], precision=HIGHEST),
                        'ba': jnp.dot(seen_b[point].T, seen_a[point], precision=HIGHEST)}
                for point in seen_a}

    return moments


def _moments(spec: GroupSpec, form_a: dict, form_b: dict, images: np.ndarray,
             batch_size: int) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """{set: {'count', 'sum_a', 'sum_b', 'sq_a' (sum of a^2), 'bb' (B^T B), 'ba' (B^T A)}},
    float64 sums over `images` and every point of the set, computed in the forms' dtype."""
    moments, points = _moments_fn(spec), _sets(spec)
    form_a, form_b = jax.tree.map(jnp.asarray, form_a), jax.tree.map(jnp.asarray, form_b)
    dtype = form_dtype(form_a)
    totals = {}
    for start in range(0, len(images), batch_size):
        batch = jnp.asarray(images[start:start + batch_size], dtype)
        for point, found in moments(form_a, form_b, batch).items():
            total = totals.setdefault(points[point], {})
            for key, value in found.items():
                total[key] = total.get(key, 0.0) + np.asarray(value, np.float64)
    return totals


# The element, set by set.

def _hold(values: np.ndarray, max_ratio: float) -> np.ndarray:
    """`values` with their magnitudes held within a ratio `max_ratio` around their geometric
    mean (signs kept)."""
    magnitude = np.abs(values)
    middle = np.exp(np.mean(np.log(magnitude)))
    return np.sign(values) * np.clip(magnitude, middle / np.sqrt(max_ratio),
                                     middle * np.sqrt(max_ratio))


def _statistics(m: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(correlation[b channel, a channel], rms of a, rms of b); a channel of (nearly) zero
    variance correlates 0 with everything."""
    n = m['count']
    mean_a, mean_b = m['sum_a'] / n, m['sum_b'] / n
    var_a = np.maximum(m['sq_a'] / n - mean_a ** 2, 0)
    var_b = np.maximum(np.diag(m['bb']) / n - mean_b ** 2, 0)
    std_a, std_b = np.sqrt(var_a), np.sqrt(var_b)
    live_a = std_a > 1e-9 * max(std_a.max(), 1e-300)
    live_b = std_b > 1e-9 * max(std_b.max(), 1e-300)
    covariance = m['ba'] / n - np.outer(mean_b, mean_a)
    denominator = np.outer(np.where(live_b, std_b, 1), np.where(live_a, std_a, 1))
    correlation = np.where(np.outer(live_b, live_a), covariance / denominator, 0.0)
    return correlation, np.sqrt(m['sq_a'] / n), np.sqrt(np.diag(m['bb']) / n)


def _ratios(rms_a: np.ndarray, rms_b: np.ndarray) -> np.ndarray:
    """rms(a) / rms(b), and 1 where either side is (nearly) zero."""
    live = (rms_a > 1e-12 * max(rms_a.max(), 1e-300)) & (rms_b > 1e-12 * max(rms_b.max(), 1e-300))
    return np.where(live, rms_a / np.where(live, rms_b, 1), 1.0)


def _assignment(score):
    """(rows, columns) of the assignment that maximizes `score`'s sum (scipy.optimize, imported
    here: the symmetry commands that do not align start without it)."""
    from scipy.optimize import linear_sum_assignment
    return linear_sum_assignment(score, maximize=True)


def _match_stream(m: dict, group: str, gl: str, max_condition: float) -> np.ndarray:
    """T (n x n, float64) of `group` with X_B T ~ X_A (module docstring)."""
    if group == 'O' or (group == 'GL' and gl == 'procrustes'):
        u, _, vt = np.linalg.svd(m['ba'])
        return u @ vt
    if group == 'GL':
        t = np.linalg.lstsq(m['bb'], m['ba'], rcond=None)[0]
        u, s, vt = np.linalg.svd(t)
        return (u * np.clip(s, s[0] / max_condition, s[0])) @ vt
    correlation, rms_a, rms_b = _statistics(m)
    score = np.abs(correlation) if group == 'signed_permutation' else correlation
    rows, columns = _assignment(score)  # B channel -> A channel
    values = np.ones(len(rows))
    if group == 'signed_permutation':
        values = np.where(correlation[rows, columns] < 0, -1.0, 1.0)
    if group == 'scaled_permutation':
        values = _hold(_ratios(rms_a[columns], rms_b[rows]), max_condition)
    t = np.zeros_like(correlation)
    t[rows, columns] = values
    return t


def _match_hidden(m: dict, hidden: Hidden, method: str, max_condition: float) -> dict:
    """{'perm', 'scale'} of a block's hidden channels (module docstring): unit j of B (its
    channels (j, r)) goes to unit perm[j] of A; scale z covers B's channels z q .. z q + q - 1."""
    correlation, rms_a, rms_b = _statistics(m)
    channels = correlation.shape[0]
    per_unit = channels // hidden.size
    score = correlation if method == 'permutation' else np.abs(correlation)  # signs: scales
    blocks = score.reshape(hidden.size, per_unit, hidden.size, per_unit)
    _, perm = _assignment(np.einsum('jrir->ji', blocks))
    if method == 'permutation':
        return {'perm': perm, 'scale': np.ones(hidden.scale_size)}
    b = np.arange(channels)
    a = perm[b // per_unit] * per_unit + b % per_unit
    per_scale = channels // hidden.scale_size
    inner = m['ba'][b, a].reshape(hidden.scale_size, per_scale).sum(1)
    sq_a = (rms_a[a] ** 2).reshape(hidden.scale_size, per_scale).sum(1)
    sq_b = (rms_b ** 2).reshape(hidden.scale_size, per_scale).sum(1)
    scale = np.where(inner < 0, -1.0, 1.0) * _ratios(np.sqrt(sq_a), np.sqrt(sq_b))
    return {'perm': perm, 'scale': _hold(scale, max_condition)}


def check_pair(spec: GroupSpec, form_a: dict, form_b: dict) -> None:
    """That both forms are of `spec`'s model (`check_form`), of one dtype and finite."""
    for name, form in (('A', form_a), ('B', form_b)):
        try:
            check_form(spec, form)
        except ValueError as error:
            raise ValueError(f'model {name}: {error}') from error
        bad = [f'{layer}/{key}' for layer, arrays in form.items() for key, x in arrays.items()
               if not np.all(np.isfinite(np.asarray(x)))]
        if bad:
            raise ValueError(f'model {name} has non-finite weights ({", ".join(bad[:3])}); '
                             'align finite models (train it again: qhnet.main rolls non-finite '
                             'steps back)')
    if form_dtype(form_a) != form_dtype(form_b):
        raise ValueError(f'the forms have dtypes {form_dtype(form_a)} and {form_dtype(form_b)}; '
                         'fold both with one dtype')


def align(spec: GroupSpec, form_a: dict, form_b: dict, images: np.ndarray,
          method: str = 'group', gl: str = 'least_squares', max_condition: float = 100.0,
          batch_size: int = 128) -> dict:
    """The element g (`action`'s format) that moves B into A's coordinates: `act(spec, form_b,
    g)` computes B's function with weights matched to A's (module docstring). `method`:
    'group' (each set's own group) or 'permutation'; `gl`: 'least_squares' or 'procrustes'
    for GL streams; `images`: calibration images, NHWC as the models read them."""
    if method not in METHODS:
        raise ValueError(f'unknown method {method!r}; pass one of {list(METHODS)}')
    if gl not in GL_SOLVERS:
        raise ValueError(f'unknown GL solver {gl!r}; pass one of {list(GL_SOLVERS)}')
    if not 1 <= max_condition <= MAX_CONDITION:
        raise ValueError(f'max_condition={max_condition!r} must lie in [1, {MAX_CONDITION:g}], '
                         'the condition numbers `act` accepts')
    check_pair(spec, form_a, form_b)
    check_images(spec, form_a, images)
    moments = _moments(spec, form_a, form_b, np.asarray(images), batch_size)
    element = {
        'streams': {s.name: _match_stream(moments['streams', s.name],
                                          'permutation' if method == 'permutation' else s.group,
                                          gl, max_condition) for s in spec.streams},
        'hidden': {h.block: _match_hidden(moments['hidden', h.block], h, method, max_condition)
                   for h in spec.hidden}}
    if method == 'group' and getattr(spec.structure, 'equation', None) == 4:
        _scale_coefficients(spec, form_a, form_b, element, max_condition)
    return element


def _scale_coefficients(spec: GroupSpec, form_a: dict, form_b: dict, element: dict,
                        max_condition: float) -> None:
    """Eq. (4): a hidden scale multiplies C's column and divides A's, both factors of the
    product, which it leaves unchanged; each is chosen instead to match B's column of C (in A's
    stream coordinates) to A's: sign(<c_a, c_b>) |c_a| / |c_b|."""
    moved = act(spec, form_b, {'streams': element['streams'], 'hidden': {}})
    for h in spec.hidden:
        coef_a = np.asarray(form_a[h.block]['coef'], np.float64)
        perm = element['hidden'][h.block]['perm']
        coef_b = np.asarray(moved[h.block]['coef'], np.float64)[:, np.argsort(perm)]
        inner = (coef_a * coef_b).sum(0)
        ratio = _ratios(np.linalg.norm(coef_a, axis=0), np.linalg.norm(coef_b, axis=0))
        element['hidden'][h.block]['scale'] = _hold(
            np.where(inner < 0, -1.0, 1.0) * ratio, max_condition)[perm]


def residuals(spec: GroupSpec, form_a: dict, form_b: dict, element: dict, images: np.ndarray,
              batch_size: int = 128) -> dict[str, dict[str, float]]:
    """{set: {'before', 'after'}}: |X_B - X_A| / |X_A| (Frobenius) on every stream and hidden
    set, before and after `element` moves B (its values X_B T): how well each set matches."""
    moments = _moments(spec, form_a, form_b, np.asarray(images), batch_size)
    report = {}
    for (kind, name), m in moments.items():
        if kind == 'streams':
            t = np.asarray(element['streams'][name], np.float64)
        else:
            hidden = next(h for h in spec.hidden if h.block == name)
            t = _hidden_matrix(hidden, element['hidden'][name], len(m['sum_a']))
        norm = m['sq_a'].sum()

        def distance(t):
            return np.sqrt(max(np.trace(t.T @ m['bb'] @ t) - 2 * np.trace(t.T @ m['ba']) + norm,
                               0) / norm)

        label = name if kind == 'streams' else f'{name}/product'
        report[label] = {'before': float(distance(np.eye(len(t)))), 'after': float(distance(t))}
    return report


def _hidden_matrix(hidden: Hidden, element: dict, channels: int) -> np.ndarray:
    """The hidden element as a channels x channels matrix on the product: B's channel (j, r)
    to A's (perm[j], r), times its scale."""
    per_unit, per_scale = channels // hidden.size, channels // hidden.scale_size
    b = np.arange(channels)
    t = np.zeros((channels, channels))
    t[b, np.asarray(element['perm'])[b // per_unit] * per_unit + b % per_unit] = \
        np.asarray(element['scale'], np.float64)[b // per_scale]
    return t


# The line between two forms.

def interpolate(form_a: dict, form_b: dict, alpha: float) -> dict:
    """(1 - alpha) A + alpha B, array by array, in float64 and cast to the forms' dtype."""
    dtype = form_dtype(form_a)
    return jax.tree.map(lambda a, b: ((1 - alpha) * np.asarray(a, np.float64)
                                      + alpha * np.asarray(b, np.float64)).astype(dtype),
                        form_a, form_b)


@functools.lru_cache(maxsize=16)
def _bn_statistics_fn(spec: GroupSpec) -> Callable:
    """A jitted (form, images, targets) -> ({BN point: (mean, std)}, {BN point: (s, t)}):
    the statistics of every BN point, and, with `targets`, the live correction x s + t that
    gives each point its target mean and std (points before it corrected already)."""
    logits = tapped_logits(spec)

    @jax.jit
    def statistics(form, images, targets):
        found, corrections = {}, {}

        def tap(point, x):
            if not is_bn_point(point):
                return x
            mean = jnp.mean(x, axis=tuple(range(x.ndim - 1)))
            std = jnp.std(x, axis=tuple(range(x.ndim - 1)))
            found[point] = (mean, std)
            if targets is None:
                return x
            target_mean, target_std = targets[point]
            live = std > 1e-6 * jnp.maximum(jnp.max(std), 1e-30)
            s = jnp.where(live, target_std / jnp.where(live, std, 1), 1.0)
            corrections[point] = (s, target_mean - mean * s)
            return x * s + corrections[point][1]

        logits(form, images, tap)
        return found, corrections

    return statistics


def repairer(spec: GroupSpec, form_a: dict, form_b: dict,
             images: np.ndarray) -> Callable[[dict, float], dict]:
    """correct(form, alpha): `form` (the interpolation of A and B at `alpha`) with REPAIR's
    correction folded in (module docstring), measured on `images` in one batch. The endpoints'
    statistics are measured once, here, for every alpha."""
    check_images(spec, form_a, images)
    statistics = _bn_statistics_fn(spec)
    dtype = form_dtype(form_a)
    images = jnp.asarray(images, dtype)
    ends = [statistics(jax.tree.map(jnp.asarray, f), images, None)[0] for f in (form_a, form_b)]

    def correct(form: dict, alpha: float) -> dict:
        targets = {point: tuple((1 - alpha) * a + alpha * b
                                for a, b in zip(ends[0][point], ends[1][point]))
                   for point in ends[0]}
        _, corrections = statistics(jax.tree.map(jnp.asarray, form), images, targets)
        new = {layer: {key: np.asarray(x, np.float64) for key, x in arrays.items()}
               for layer, arrays in form.items()}
        for point, (maps, (layer, bias)) in bn_layers(spec.structure).items():
            s, t = (np.asarray(v, np.float64) for v in corrections[point])
            for name, key, axis in maps:
                shape = [1] * new[name][key].ndim
                shape[axis] = -1
                new[name][key] = new[name][key] * s.reshape(shape)
            new[layer][bias] = new[layer][bias] * s + t
        return jax.tree.map(lambda x: x.astype(dtype), new)

    return correct


def repair(spec: GroupSpec, form: dict, form_a: dict, form_b: dict, images: np.ndarray,
           alpha: float) -> dict:
    """`form`, the interpolation of A and B at `alpha`, with REPAIR's correction folded in
    (`repairer`, for one alpha)."""
    return repairer(spec, form_a, form_b, images)(form, alpha)


def barriers(curve: dict) -> dict[str, float]:
    """{'loss', 'top1'}: the largest rise of the loss above, and drop of top-1 below, the
    straight line between the curve's endpoints (curve: {'alpha', 'loss', 'top1'} lists)."""
    alpha = np.asarray(curve['alpha'], np.float64)
    out = {}
    for key, sign in (('loss', 1.0), ('top1', -1.0)):
        values = np.asarray(curve[key], np.float64)
        line = (1 - alpha) * values[0] + alpha * values[-1]
        out[key] = float(np.max(sign * (values - line)))
    return out


def curve(form_a: dict, form_b: dict, evaluate: Callable[[dict], dict], alphas=ALPHAS,
          correct: Callable[[dict, float], dict] | None = None,
          progress: Callable[[float], None] = lambda alpha: None) -> dict:
    """{'alpha', 'loss', 'top1'}: `evaluate(form)` ({'loss', 'top1'}) of the interpolation at
    each alpha, after `correct(form, alpha)` if given (e.g. a `repairer`)."""
    found = {'alpha': [float(a) for a in alphas], 'loss': [], 'top1': []}
    for alpha in alphas:
        form = interpolate(form_a, form_b, alpha)
        if correct is not None:
            form = correct(form, alpha)
        result = evaluate(form)
        found['loss'].append(float(result['loss']))
        found['top1'].append(float(result['top1']))
        progress(alpha)
    return found
