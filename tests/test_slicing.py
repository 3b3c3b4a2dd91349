"""qhnet.symmetry.slicing: keep=1 is the same function; a sliced model is a real model (it
builds from its config, folds again, keeps its symmetry and its radius); bad input is refused.

Models: the small Eq. (3) layout of tests/test_symmetry.py with random variables, on real
digits upsampled to 16x16.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qhnet import activations, config, models
from qhnet import symmetry
from qhnet.symmetry import slicing
from qhnet.symmetry.structure import trace
from qhnet.symmetry.testing import random_variables
from tests.conftest import resize_images

SMALL = dict(stem='small', widths=(8, 16, 32), depths=(2, 1, 2), num_classes=10)


@pytest.fixture(scope='module')
def images(digits) -> np.ndarray:
    return np.asarray(resize_images(digits[0][:64], 16, 1))


def make_config(activation='softball', placement='ds', **overrides):
    cfg = config.get_config('digits')
    cfg.model.update(dict(dict(equation=3, activation=activation, placement=placement, **SMALL),
                          **overrides))
    return cfg


def make_case(activation='softball', placement='ds', **overrides):
    cfg = make_config(activation, placement, **overrides)
    model = models.build(cfg.model)
    return cfg, model, random_variables(model, (16, 16, 16, 1), seed=0)


def logits64(model_config, variables, images) -> np.ndarray:
    """The Flax model's evaluation-mode head output in float64."""
    model = models.build(model_config).clone(dtype=jnp.float64)
    with jax.enable_x64(True):
        variables = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), variables)
        _, state = model.apply(variables, jnp.asarray(images, jnp.float64), train=False,
                               capture_intermediates=True, mutable=['intermediates'])
        return np.asarray(state['intermediates']['head']['__call__'][0])


def relative(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.parametrize('activation,placement', [('softball', 'ds'), ('hardball', 'all'),
                                                  ('identity', 'ds'), ('relu', 'all')])
def test_keep_one_is_the_same_function(images, activation, placement):
    cfg, model, variables = make_case(activation, placement)
    calibration = slicing.calibrate(cfg, variables, images)
    exact = slicing.slice_variables(cfg, variables, images, keep=1.0, dtype=np.float64,
                                    calibration=calibration)
    assert relative(logits64(exact.config.model, exact.variables, images),
                    logits64(cfg.model, variables, images)) < 1e-9
    sliced = slicing.slice_variables(cfg, variables, images, keep=1.0, calibration=calibration)
    assert sliced.config.model.stream_widths == tuple(SMALL['widths'])
    original = np.asarray(model.apply(variables, images, train=False))
    moved = np.asarray(models.build(sliced.config.model).apply(sliced.variables, images,
                                                               train=False))
    spec = symmetry.group_spec(model)
    tolerance = symmetry.invariance_tolerance(np.float32, 1.0, max(s.width for s in spec.streams))
    assert relative(moved, original) < tolerance
    # It rotated where the group allows: the head absorbed the last stream's rotation (a
    # ReLU stream is only permuted, and the head's entries stay the same numbers).
    rotated = [s.rotated for s in sliced.streams]
    assert rotated[-1] == (activation != 'relu')
    head_before = np.sort(variables['params']['head']['kernel'].ravel())
    head_after = np.sort(sliced.variables['params']['head']['kernel'].ravel())
    assert (np.abs(head_after - head_before).max() > 1e-3) == rotated[-1]


def test_sliced_model_builds_folds_again_and_keeps_its_symmetry(images):
    cfg, _, variables = make_case()
    sliced = slicing.slice_variables(cfg, variables, images, keep=0.5, dtype=np.float64)
    assert sliced.config.model.stream_widths == (4, 8, 16)
    model = models.build(sliced.config.model)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images[:1])
    assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(np.shape, sliced.variables)
    # The product keeps its hidden width through a rectangular E: k x n.
    block = sliced.variables['params']['stage2_block1']
    assert block['mix_in']['kernel'].shape == (4, 8)
    assert block['coef']['kernel'].shape == (1, 1, 4, 32)
    assert block['combine']['kernel'].shape == (1, 1, 32, 8)
    # Fold again: the inference form computes the Flax model's function.
    spec = symmetry.group_spec(model)
    with jax.enable_x64(True):
        form = symmetry.fold(spec, sliced.variables, np.float64)
        folded = np.asarray(symmetry.apply(spec, form, np.asarray(images, np.float64)))
    assert relative(folded, logits64(sliced.config.model, sliced.variables, images)) < 1e-9
    # And the sliced model's group still acts without changing it.
    form32 = symmetry.fold(spec, jax.tree.map(lambda x: np.float32(x), sliced.variables))
    report = symmetry.verify(spec, form32, symmetry.sample(spec, jax.random.key(1)), images)
    assert report['invariant'], report


def test_balls_keep_the_radius_of_the_unsliced_width(images):
    cfg, _, variables = make_case(placement='all')
    sliced = slicing.slice_variables(cfg, variables, images, keep=0.5)
    structure = trace(models.build(sliced.config.model))
    assert [b.radius for b in structure.blocks] == pytest.approx(
        [np.sqrt(w) for w, d in zip(SMALL['widths'], SMALL['depths']) for _ in range(d)])
    assert [b.n_out for b in structure.blocks] == [4, 4, 8, 16, 16]
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 4)), jnp.float32)
    expected = x / jnp.sqrt(1 + jnp.sum(x ** 2, -1, keepdims=True) / 8.0)
    assert np.allclose(activations.get('softball', np.sqrt(8.0))(x), expected, rtol=1e-6)


def test_rotation_keeps_at_least_the_variance_of_selection(images):
    cfg, _, variables = make_case()
    calibration = slicing.calibrate(cfg, variables, images)
    rotate, select, magnitude = (
        slicing.slice_variables(cfg, variables, images, 0.5, method, calibration)
        for method in ('rotate', 'select', 'magnitude'))
    for r, s, m in zip(rotate.streams, select.streams, magnitude.streams):
        assert r.kept == s.kept == m.kept
        assert 0 < s.explained_variance <= r.explained_variance + 1e-12 <= 1 + 1e-12
        assert r.rotated == (r.group != 'scaled_permutation') and not (s.rotated or m.rotated)
        assert r.macs_after < r.macs_before
    # The stem's ReLU stream admits no rotation: both methods keep the same channels there.
    assert rotate.streams[0].explained_variance == pytest.approx(
        select.streams[0].explained_variance)
    assert slicing.count_params(rotate.variables) == slicing.count_params(select.variables)
    assert slicing.count_params(rotate.variables) < slicing.count_params(variables)


def test_batch_norms_match_their_calibration_statistics(images):
    """Training mode (batch statistics) starts near evaluation mode on the calibration images."""
    cfg, _, variables = make_case()
    sliced = slicing.slice_variables(cfg, variables, images, keep=0.5)
    model = models.build(sliced.config.model)
    evaluation = model.apply(sliced.variables, images, train=False)
    training, _ = model.apply(sliced.variables, images, train=True, mutable=['batch_stats'])
    assert relative(training, evaluation) < 1e-4


@pytest.mark.parametrize('keep', [0.0, 1.5, -0.2])
def test_bad_keep_is_refused(images, keep):
    cfg, _, variables = make_case()
    with pytest.raises(ValueError, match=r'keep=.* fraction of each stream.*\(0, 1\]'):
        slicing.slice_variables(cfg, variables, images, keep=keep)


def test_other_equations_and_methods_are_refused(images):
    cfg, model, variables = make_case(equation=4)
    with pytest.raises(ValueError, match=r'Eq\. \(3\) for now; this model is Eq\. \(4\)'):
        slicing.slice_variables(cfg, variables, images, keep=0.5)
    cfg, _, variables = make_case()
    with pytest.raises(ValueError, match="unknown slicing method 'pca'"):
        slicing.slice_variables(cfg, variables, images, keep=0.5, method='pca')


def test_stream_widths_are_validated():
    cfg = make_config()
    cfg.model.stream_widths = (4, 8, 16)
    with pytest.raises(ValueError, match='needs model.equation=3 and model.mixing=True'):
        models.build(cfg.model)
    cfg.model.mixing = True
    models.build(cfg.model)
    for bad in [(4, 8), (4, 40, 16), (0, 8, 16)]:
        cfg.model.stream_widths = bad
        with pytest.raises(ValueError, match='model.stream_widths'):
            models.build(cfg.model)
