"""The activations match their definitions and commute with the groups they admit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import ortho_group


from qhnet.models import activations

@pytest.fixture
def points() -> np.ndarray:
    """Pixels with 16 channels, norms from well inside to far outside the ball of radius 4."""
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(2, 5, 5, 16))
    return directions * rng.uniform(0.01, 3.0, size=(2, 5, 5, 1))


def test_softball_matches_definition(points):
    radius = np.sqrt(points.shape[-1])
    norm = np.linalg.norm(points, axis=-1, keepdims=True)
    expected = points / np.sqrt(1 + norm ** 2 / radius ** 2)
    np.testing.assert_allclose(activations.softball(jnp.asarray(points, jnp.float32)), expected, rtol=1e-5)


def test_hardball_matches_definition(points):
    radius = np.sqrt(points.shape[-1])
    norm = np.linalg.norm(points, axis=-1, keepdims=True)
    expected = np.where(norm < radius, points, radius * points / norm)
    assert (norm < radius).any() and (norm >= radius).any()
    np.testing.assert_allclose(activations.hardball(jnp.asarray(points, jnp.float32)), expected, rtol=1e-5)


@pytest.mark.parametrize('name', ['softball', 'hardball'])
def test_ball_activations_are_orthogonally_equivariant(points, name):
    fn = activations.get(name)
    rotation = ortho_group.rvs(points.shape[-1], random_state=1)
    x = jnp.asarray(points, jnp.float32)
    np.testing.assert_allclose(fn(x @ rotation.T), fn(x) @ rotation.T, atol=1e-5)


@pytest.mark.parametrize('name', ['relu', 'hardtanh'])
def test_coordinatewise_activations_are_not_orthogonally_equivariant(points, name):
    fn = activations.get(name)
    rotation = ortho_group.rvs(points.shape[-1], random_state=1)
    x = jnp.asarray(points, jnp.float32)
    assert np.abs(fn(x @ rotation.T) - fn(x) @ rotation.T).max() > 0.1


def test_hardtanh_is_odd_and_commutes_with_signed_permutations(points):
    x = jnp.asarray(points, jnp.float32)
    np.testing.assert_array_equal(activations.hardtanh(-x), -activations.hardtanh(x))
    rng = np.random.default_rng(2)
    signed_permutation = np.eye(16)[rng.permutation(16)] * rng.choice([-1.0, 1.0], size=16)
    np.testing.assert_allclose(activations.hardtanh(x @ signed_permutation),
                               activations.hardtanh(x) @ signed_permutation, atol=1e-6)
    np.testing.assert_allclose(activations.hardtanh(x), np.clip(points, -1, 1), rtol=1e-6)


def test_relu_commutes_with_positive_scaled_permutations(points):
    x = jnp.asarray(points, jnp.float32)
    rng = np.random.default_rng(3)
    scaled_permutation = np.eye(16)[rng.permutation(16)] * rng.uniform(0.1, 10, size=16)
    np.testing.assert_allclose(activations.relu(x @ scaled_permutation),
                               activations.relu(x) @ scaled_permutation, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', sorted(activations.ACTIVATIONS))
def test_gradients_are_finite_at_zero(name):
    grad = jax.grad(lambda x: activations.get(name)(x).sum())(jnp.zeros((3, 8)))
    assert np.isfinite(grad).all()


def test_unknown_activation_lists_choices():
    with pytest.raises(ValueError, match="unknown activation 'gelu'.*softball"):
        activations.get('gelu')
