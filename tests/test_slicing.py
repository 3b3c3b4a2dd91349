"""qhnet.symmetry.slicing: keep=1 is the same function; a sliced model is a real model (it
builds from its config, folds again, keeps its symmetry and its radius); a pruned ResNet50 is
the ResNet50 with the other channels silenced; bad input is refused.

Models: the small Eq. (3) layout of tests/test_symmetry.py and the digits ResNet50, with
random variables, on real digits upsampled to 16x16.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qhnet import config, models
from qhnet import symmetry
from qhnet.symmetry import baseline_family, slicing
from qhnet.symmetry.commands import slice_report
from qhnet.symmetry.structure import trace
from qhnet.symmetry.testing import random_variables
from qhnet.models import activations
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


@pytest.mark.parametrize('activation,placement', [
    pytest.param('softball', 'ds', marks=pytest.mark.slow),
    pytest.param('hardball', 'all', marks=pytest.mark.slow),  # O(n): the CLI's keep=1 test
    pytest.param('identity', 'ds', marks=pytest.mark.slow), ('relu', 'all')])
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
    sliced = slicing.slice_variables(cfg, variables, images, keep=0.5, dtype=np.float64,
                                     slice_stem=True)
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


def test_a_qlnet_is_sliced_without_added_maps(images):
    """Both halves of QLNet's first 1x1 conv read the kept channels: keep=1 is the same
    function with the same parameters, and a slice is a QLNet of narrower streams that folds
    again and keeps its symmetry."""
    cfg, model, variables = make_case('hardball', name='qlnet')
    calibration = slicing.calibrate(cfg, variables, images)
    exact = slicing.slice_variables(cfg, variables, images, keep=1.0, dtype=np.float64,
                                    calibration=calibration)
    assert relative(logits64(exact.config.model, exact.variables, images),
                    logits64(cfg.model, variables, images)) < 1e-9
    assert slicing.count_params(exact.variables) == slicing.count_params(variables)
    sliced = slicing.slice_variables(cfg, variables, images, keep=0.5, calibration=calibration)
    assert sliced.config.model.stream_widths == (8, 8, 16) and not sliced.config.model.mixing
    block = sliced.variables['params']['stage2_block1']
    assert block['coef']['kernel'].shape == (1, 1, 8, 64)  # k x 2w, w = 4 * 8 unsliced
    assert block['combine']['kernel'].shape == (1, 1, 64, 8)
    model = models.build(sliced.config.model)
    spec = symmetry.group_spec(model)
    with jax.enable_x64(True):
        form = symmetry.fold(spec, sliced.variables, np.float64)
        folded = np.asarray(symmetry.apply(spec, form, np.asarray(images, np.float64)))
        assert relative(folded, logits64(sliced.config.model, sliced.variables, images)) < 1e-9
        report = symmetry.verify(spec, form, symmetry.sample(spec, jax.random.key(1)), images)
    assert report['invariant'], report


def test_the_sliced_flax_model_trains(images, digits):
    cfg, _, variables = make_case()
    sliced = slicing.slice_variables(cfg, variables, images, keep=0.5)
    model = models.build(sliced.config.model)
    labels = jnp.asarray(digits[1][:len(images)])
    optimizer = optax.sgd(0.05, momentum=0.9)

    @jax.jit
    def step(params, batch_stats, opt_state):
        def loss_fn(params):
            logits, state = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                        train=True, mutable=['batch_stats'])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), state
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state['batch_stats'], opt_state, loss

    params, batch_stats = sliced.variables['params'], sliced.variables['batch_stats']
    opt_state, losses = optimizer.init(params), []
    for _ in range(8):
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.95 * losses[0], losses


def test_balls_keep_the_radius_of_the_unsliced_width(images):
    cfg, _, variables = make_case(placement='all')
    sliced = slicing.slice_variables(cfg, variables, images, keep=0.5, slice_stem=True)
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
        slicing.slice_variables(cfg, variables, images, 0.5, method, calibration, slice_stem=True)
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


def silenced(spec, form, dropped: dict) -> dict:
    """`form` with every layer that writes stream s writing 0 on its channels dropped[s]."""
    new = {name: dict(arrays) for name, arrays in form.items()}
    for stream in spec.streams:
        for entry in stream.entries:
            if entry.role == 'out':
                layer, key = entry.path
                keep = np.ones(stream.width)
                keep[dropped[stream.name]] = 0.0
                shape = [1] * np.ndim(new[layer][key])
                shape[entry.axis] = -1
                new[layer][key] = new[layer][key] * np.repeat(keep, entry.repeat).reshape(shape)
    return new


@pytest.mark.parametrize('activation', ['softball', 'identity'])
def test_a_slice_is_the_rotated_model_projected_onto_the_kept_directions(images, activation):
    """keep < 1: the sliced Flax model computes the rotated model in which every stream keeps
    only its first k coordinates, the others held at 0 where they are written (float64)."""
    cfg, _, variables = make_case(activation)
    calibration = slicing.calibrate(cfg, variables, images)
    sliced = slicing.slice_variables(cfg, variables, images, 0.5, calibration=calibration,
                                     dtype=np.float64, slice_stem=True)
    spec, form = calibration.spec, calibration.form
    chosen = slicing.basis(spec, form, calibration.moments, 'rotate')
    with jax.enable_x64(True):
        rotated = symmetry.act(spec, form, {'streams': {n: t for n, (t, _, _) in chosen.items()}})
        projected = silenced(spec, rotated, {s.name: np.arange(s.kept, s.width)
                                             for s in sliced.streams})
        reference = np.asarray(symmetry.apply(spec, projected, np.asarray(images, np.float64)))
    assert relative(logits64(sliced.config.model, sliced.variables, images), reference) < 1e-9
    assert relative(reference, logits64(cfg.model, variables, images)) > 1e-4


def test_a_relu_model_is_sliced_with_permutations_and_says_so(images):
    cfg, _, variables = make_case('relu', 'all')
    sliced = slicing.slice_variables(cfg, variables, images, 0.5)
    assert not any(s.rotated for s in sliced.streams)
    summary = dict(method='rotate', output_workdir='OUT', params_before=2, params_after=1,
                   top1_before=1.0, top1_after=0.5,
                   streams=[dict(name=s.name, width=s.width, kept=s.kept, rotated=s.rotated,
                                 explained_variance=s.explained_variance,
                                 flops_before=2 * s.macs_before, flops_after=2 * s.macs_after)
                            for s in sliced.streams])
    assert any('no stream of this model admits a rotation' in line and 'permutations only' in line
               for line in slice_report(summary))
    softball = slicing.slice_variables(*make_case()[::2], images, 0.5)
    summary['streams'] = [dict(s, rotated=r.rotated) for s, r in zip(summary['streams'],
                                                                    softball.streams)]
    assert not any('admits a rotation' in line for line in slice_report(summary))


def test_the_stem_keeps_its_width_unless_sliced_too(images):
    cfg, _, variables = make_case()
    calibration = slicing.calibrate(cfg, variables, images)
    sliced = slicing.slice_variables(cfg, variables, images, 0.5, calibration=calibration)
    assert sliced.config.model.stream_widths == (8, 8, 16)
    stem = sliced.streams[0]
    assert stem.name == 'stem' and stem.kept == stem.width == 8
    assert stem.explained_variance == pytest.approx(1.0)
    whole = slicing.slice_variables(cfg, variables, images, 0.5, calibration=calibration,
                                    slice_stem=True)
    assert slicing.count_params(whole.variables) < slicing.count_params(sliced.variables)


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


def test_images_of_the_wrong_shape_are_refused(images):
    cfg, _, variables = make_case()
    for bad in (images[..., :1].repeat(3, -1), images[0], images[:0]):
        with pytest.raises(ValueError, match=r'images must be an NHWC batch of shape \(N, H, W, 1\)'):
            slicing.slice_variables(cfg, variables, bad, keep=0.5)


def test_other_equations_and_methods_are_refused(images):
    cfg, model, variables = make_case(equation=4)
    with pytest.raises(ValueError, match=r'Eq\. \(3\) and QLNets for now; this model is '
                                         r'Eq\. \(4\)'):
        slicing.slice_variables(cfg, variables, images, keep=0.5)
    cfg, _, variables = make_case()
    with pytest.raises(ValueError, match="unknown slicing method 'pca'"):
        slicing.slice_variables(cfg, variables, images, keep=0.5, method='pca')


def test_stream_widths_are_validated():
    cfg = make_config()
    cfg.model.stream_widths = (4, 8, 16)
    with pytest.raises(ValueError, match='needs a QLNet, or model.equation=3 and model.mixing=True'):
        models.build(cfg.model)
    cfg.model.mixing = True
    models.build(cfg.model)
    for bad in [(4, 8), (4, 40, 16), (0, 8, 16)]:
        cfg.model.stream_widths = bad
        with pytest.raises(ValueError, match='model.stream_widths'):
            models.build(cfg.model)


def test_pruned_resnet_is_the_resnet_with_the_other_channels_silenced(images):
    cfg = config.row_config('resnet50', 'digits')
    cfg.model.depths = (2, 1)  # an identity shortcut: two blocks write the first stage's stream
    model = models.build(cfg.model)
    variables = random_variables(model, (16, 16, 16, 1), seed=0)
    with jax.enable_x64(True):
        images64 = jnp.asarray(images, jnp.float64)
        calibration = slicing.calibrate(cfg, variables, images)
        spec, form = calibration.spec, calibration.form
        full = baseline_family.apply(spec, form, images64)
        unpruned, _ = slicing.prune(calibration, 1.0)
        assert relative(baseline_family.apply(spec, unpruned, images64), full) < 1e-9
        for method in ('select', 'magnitude'):
            pruned, kept = slicing.prune(calibration, 0.5, method)
            assert kept == slicing.kept_widths(spec, 0.5)
            assert kept['stem'] == spec.streams[0].width  # kept whole by default
            # The reference: the full model whose writers leave every other channel at 0.
            dropped = {}
            for stream in spec.streams:
                permutation, _, rotated = slicing.basis(spec, form, calibration.moments,
                                                        method)[stream.name]
                assert not rotated  # only permutations times scalings: no rotation
                dropped[stream.name] = np.argmax(permutation, axis=0)[kept[stream.name]:]
            logits = baseline_family.apply(spec, pruned, images64)
            reference = baseline_family.apply(spec, silenced(spec, form, dropped), images64)
            assert relative(logits, reference) < 1e-9
            assert relative(logits, full) > 1e-3
            assert slicing.count_form_params(pruned) < 0.5 * slicing.count_form_params(form)
        rotate, _ = slicing.prune(calibration, 0.5, 'rotate')
        select, _ = slicing.prune(calibration, 0.5, 'select')
        assert all(np.array_equal(rotate[n][k], select[n][k]) for n in form for k in form[n])
