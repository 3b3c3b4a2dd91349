"""The matrix groups that act on a stream, and which activation admits which.

A stream's element T acts on its channels (row vectors) as u -> u T. An activation
admits T when act(y T) = act(y) T for every y (docs/design.md, 'Streams and groups'):

    identity            GL(n)                        'GL'
    softball, hardball  O(n)                         'O'      (they depend on y only through |y|)
    hardtanh            signed permutations          'signed_permutation'
    relu                permutations x positive      'scaled_permutation'
                        diagonal scalings
    hard_swish          permutations                 'permutation'    (x relu6(x + 3) / 6)

and 'permutation' is also the meet of the hardtanh and relu groups with O(n). Everything
here is numpy in float64, whatever JAX's precision setting: rotations and inverses are
computed in float64 and cast once (as rotation-based compression does).
"""

import numpy as np

GROUPS = ('GL', 'O', 'signed_permutation', 'scaled_permutation', 'permutation')

ADMITTED = {
    'identity': 'GL',
    'softball': 'O',
    'hardball': 'O',
    'hardtanh': 'signed_permutation',
    'relu': 'scaled_permutation',
    'hard_swish': 'permutation',
}

# group -> the groups it contains (itself included).
_SUBGROUPS = {
    'GL': set(GROUPS),
    'O': {'O', 'signed_permutation', 'permutation'},
    'signed_permutation': {'signed_permutation', 'permutation'},
    'scaled_permutation': {'scaled_permutation', 'permutation'},
    'permutation': {'permutation'},
}


def check_group(group: str) -> None:
    if group not in GROUPS:
        raise ValueError(f'unknown group {group!r}; valid groups: {list(GROUPS)}')


def contains(group: str, subgroup: str) -> bool:
    """Whether `subgroup` is a subgroup of `group`."""
    check_group(group)
    check_group(subgroup)
    return subgroup in _SUBGROUPS[group]


def meet(group: str, other: str) -> str:
    """The largest group of the list contained in both (their intersection)."""
    common = _SUBGROUPS[group] & _SUBGROUPS[other]
    return max(common, key=lambda g: len(_SUBGROUPS[g]))


def monomial_entries(t: np.ndarray) -> np.ndarray | None:
    """The nonzero entries of T when it has exactly one in each row and column (T = P D),
    otherwise None."""
    nonzero = np.asarray(t) != 0
    if np.all(nonzero.sum(0) == 1) and np.all(nonzero.sum(1) == 1):
        return np.asarray(t, np.float64)[nonzero]
    return None


def condition_number(t: np.ndarray) -> float:
    """cond(T) = sigma_max / sigma_min in the 2-norm (inf for a singular T); for T = P D the
    singular values are |D|, so no SVD is needed."""
    entries = monomial_entries(t)
    if entries is not None:
        return float(np.abs(entries).max() / np.abs(entries).min())
    singular_values = np.linalg.svd(np.asarray(t, np.float64), compute_uv=False)
    return float(singular_values[0] / singular_values[-1]) if singular_values[-1] > 0 else np.inf


def inverse_matrix(t: np.ndarray) -> np.ndarray:
    """T^-1 in float64; for T = P D exactly D^-1 P^T (each entry's reciprocal, transposed)."""
    t = np.asarray(t, np.float64)
    if monomial_entries(t) is not None:
        return np.divide(1.0, t, out=np.zeros_like(t), where=t != 0).T
    return np.linalg.inv(t)


def _orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    """A Haar-random element of O(n): QR of a Gaussian matrix, signs of R's diagonal fixed."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def spread(rng: np.random.Generator, n: int, cond: float) -> np.ndarray:
    """n positive numbers with max / min = cond and product 1, shuffled."""
    return rng.permutation(cond ** np.linspace(-0.5, 0.5, n)) if n > 1 else np.ones(1)


def _permutation_matrix(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.eye(n)[rng.permutation(n)]


def sample_matrix(rng: np.random.Generator, group: str, n: int, cond: float = 1.0) -> np.ndarray:
    """A random n x n element of `group`, float64.

    'GL': U diag(sigma) V^T with U, V Haar-orthogonal and singular values spread
    geometrically so that cond(T) = `cond` exactly. 'scaled_permutation': P diag(lambda)
    with max / min lambda = `cond`. The other groups are isometries (cond 1; `cond` unused).
    """
    check_group(group)
    if not cond >= 1.0:
        raise ValueError(f'a condition number is >= 1; got {cond}')
    if group == 'GL':
        return (_orthogonal(rng, n) * spread(rng, n, cond)) @ _orthogonal(rng, n).T
    if group == 'O':
        return _orthogonal(rng, n)
    p = _permutation_matrix(rng, n)
    if group == 'signed_permutation':
        return p * rng.choice([-1.0, 1.0], n)
    if group == 'scaled_permutation':
        return p * spread(rng, n, cond)
    return p


def _slack(dtype) -> float:
    """How far from a group a matrix of `dtype` may be and still count as a member."""
    return 1e3 * float(np.finfo(dtype).eps)


def permutation_pattern(t: np.ndarray, dtype=np.float64) -> np.ndarray | None:
    """P with P[j, i] = 1 where T[j, i] != 0 (up to `_slack(dtype)`) when T is a permutation
    times a diagonal (one nonzero per row and column), otherwise None."""
    nonzero = np.abs(np.asarray(t, np.float64)) > _slack(dtype)
    if not (np.all(nonzero.sum(0) == 1) and np.all(nonzero.sum(1) == 1)):
        return None
    return nonzero.astype(np.float64)


def membership_error(group: str, t: np.ndarray, dtype=np.float64) -> str | None:
    """None when T lies in `group` (to within `_slack(dtype)`), otherwise why not."""
    check_group(group)
    tol = _slack(dtype)
    t = np.asarray(t, np.float64)
    n = t.shape[0]
    if group == 'GL':
        return None
    if group == 'O':
        deviation = np.abs(t.T @ t - np.eye(n)).max()
        return None if deviation <= tol else f'T^T T differs from I by {deviation:.2e}'
    pattern = permutation_pattern(t, dtype)
    if pattern is None:
        return 'T is not a permutation matrix times a diagonal (one nonzero per row and column)'
    entries = t[pattern > 0]
    if group == 'signed_permutation' and np.abs(np.abs(entries) - 1).max() > tol:
        return 'its nonzero entries are not +-1'
    if group == 'scaled_permutation' and entries.min() <= 0:
        return 'its nonzero entries are not all positive'
    if group == 'permutation' and np.abs(entries - 1).max() > tol:
        return 'its nonzero entries are not all 1'
    return None
