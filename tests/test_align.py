"""Aligning two models through the group (`qhnet.symmetry.align`): the aligned model computes B's
function on every row; a model aligned to a transformed copy of itself recovers the element and
has no barrier; interpolation, REPAIR and barriers; bad input.

Models are the Table 1 rows' digits variants with random variables (`random_variables`: non-trivial
BN statistics), on real digits upsampled to 16x16, in float64 where the claim is exactness.
"""

import jax
import numpy as np
import pytest

from qhnet import config, models, symmetry
from qhnet.symmetry import align, families
from qhnet.symmetry.testing import random_variables
from tests.conftest import resize_images

ROWS = ('eq3_softball', 'eq3_softball:identity', 'eq3_softball:hardtanh', 'eq3_softball:relu',
        'eq3_nows', 'eq4', 'eq5_softball', 'eq6', 'eq7_nows_x6', 'resnet50')


@pytest.fixture(scope='module')
def images(digits) -> np.ndarray:
    """64 real digits, upsampled to 16x16."""
    return np.asarray(resize_images(digits[0][:64], 16, 1))


def case(row: str, image_shape, seeds=(0, 1), dtype=np.float64):
    """(spec, form A, form B) of two random models of a Table 1 row ('row:activation')."""
    name, _, activation = row.partition(':')
    model_config = config.row_config(name, 'digits').model
    if activation:
        model_config.activation = activation
    model = models.build(model_config)
    spec = symmetry.group_spec(model, tie_identity_shortcuts=True)
    return (spec, *(symmetry.fold(spec, random_variables(model, image_shape, seed=seed), dtype)
                    for seed in seeds))


def relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize('method', align.METHODS)
@pytest.mark.parametrize('row', ROWS)
def test_the_aligned_model_computes_b_function(images, row, method):
    with jax.enable_x64(True):
        spec, form_a, form_b = case(row, images.shape)
        element = align.align(spec, form_a, form_b, images, method=method)
        aligned = symmetry.act(spec, form_b, element)
        assert relative(symmetry.apply(spec, aligned, images),
                        symmetry.apply(spec, form_b, images)) <= 1e-9
    residuals = align.residuals(spec, form_a, form_b, element, images)
    assert set(residuals) == {s.name for s in spec.streams} | {
        f'{h.block}/product' for h in spec.hidden}
    if method == 'permutation':
        for t in element['streams'].values():
            assert np.array_equal(np.sort(t.sum(0)), np.ones(len(t))) and set(np.unique(t)) <= {0, 1}
        assert all(np.all(h['scale'] == 1) for h in element['hidden'].values())
    else:  # the identity is in O(n) and GL: their optimum matches at least as well
        for stream in spec.streams:
            if stream.group in ('O', 'GL'):
                values = residuals[stream.name]
                assert values['after'] <= values['before'] + 1e-9, (stream.name, values)


def line_metrics(spec, images, labels):
    """evaluate(form) -> {'loss', 'top1'} on `images`: what `align.curve` reads."""
    def evaluate(form):
        logits = np.asarray(symmetry.apply(spec, form, images), np.float64)
        logits = logits - logits.max(-1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return {'loss': float(-log_p[np.arange(len(labels)), labels].mean()),
                'top1': float((logits.argmax(-1) == labels).mean())}
    return evaluate


@pytest.mark.parametrize('row', ROWS)
def test_aligning_a_transformed_copy_recovers_the_element_and_leaves_no_barrier(images, digits,
                                                                                row):
    with jax.enable_x64(True):
        spec, form_a = case(row, images.shape, seeds=(0,))
        true = symmetry.sample(spec, jax.random.key(3), cond=10.0)
        copy = symmetry.act(spec, form_a, true)
        element = align.align(spec, form_a, copy, images)
        expected = symmetry.inverse(true)  # the element moves the copy back onto A
        for stream in spec.streams:
            if stream.group in ('O', 'GL'):
                recovered, wanted = element['streams'][stream.name], expected['streams'][stream.name]
                assert np.linalg.norm(recovered - wanted) / np.linalg.norm(wanted) < 1e-6
        aligned = symmetry.act(spec, copy, element)
        curve = align.curve(form_a, aligned, line_metrics(spec, images, digits[1][:64]),
                            alphas=(0.0, 0.25, 0.5, 0.75, 1.0))
        naive = relative(symmetry.apply(spec, align.interpolate(form_a, copy, 0.5), images),
                         symmetry.apply(spec, form_a, images))
    barriers = align.barriers(curve)
    assert abs(barriers['loss']) <= 1e-6 and abs(barriers['top1']) <= 1e-6
    assert max(curve['loss']) - min(curve['loss']) <= 1e-6
    assert naive > 1e-2  # unaligned, the copy's midpoint is another function


def test_permutations_are_found_where_channels_have_a_signal(images):
    """A relu stream's channels that are alive on the images are matched to their own copies;
    dead ones cannot be told apart and do not matter on these images."""
    with jax.enable_x64(True):
        spec, form_a = case('resnet50', images.shape, seeds=(0,))
        true = symmetry.sample(spec, jax.random.key(5), cond=10.0)
        element = align.align(spec, form_a, symmetry.act(spec, form_a, true), images)
    expected = symmetry.inverse(true)
    moments = align._moments(spec, form_a, symmetry.act(spec, form_a, true), images, 128)
    for stream in spec.streams:
        alive = moments['streams', stream.name]['sq_a'] > 0
        t, wanted = element['streams'][stream.name], expected['streams'][stream.name]
        np.testing.assert_allclose(t[:, alive], wanted[:, alive], rtol=1e-9, atol=1e-12)


def test_interpolate_and_barriers():
    a = {'layer': {'w': np.array([1.0, 2.0], np.float32)}}
    b = {'layer': {'w': np.array([3.0, -2.0], np.float32)}}
    np.testing.assert_array_equal(align.interpolate(a, b, 0.0)['layer']['w'], a['layer']['w'])
    np.testing.assert_array_equal(align.interpolate(a, b, 1.0)['layer']['w'], b['layer']['w'])
    np.testing.assert_allclose(align.interpolate(a, b, 0.25)['layer']['w'], [1.5, 1.0])
    assert align.interpolate(a, b, 0.5)['layer']['w'].dtype == np.float32
    straight = {'alpha': [0, 0.5, 1], 'loss': [1.0, 1.5, 2.0], 'top1': [0.9, 0.85, 0.8]}
    assert align.barriers(straight) == pytest.approx({'loss': 0.0, 'top1': 0.0}, abs=1e-12)
    dip = {'alpha': [0, 0.5, 1], 'loss': [1.0, 4.0, 2.0], 'top1': [0.9, 0.1, 0.8]}
    assert align.barriers(dip) == pytest.approx({'loss': 2.5, 'top1': 0.75})


@pytest.mark.parametrize('row', ('eq3_softball', 'resnet50'))
def test_repair_gives_every_bn_point_the_interpolated_statistics(images, row):
    spec, form_a, form_b = case(row, images.shape, dtype=np.float32)
    middle = align.interpolate(form_a, form_b, 0.3)
    repaired = align.repair(spec, middle, form_a, form_b, images, 0.3)
    statistics = align._bn_statistics_fn(spec)

    def stats(form):
        return statistics(jax.tree.map(np.asarray, form), np.asarray(images, np.float32), None)[0]

    ends, found, before = stats(form_a), stats(repaired), stats(middle)
    assert set(found) == set(families.bn_layers(spec.structure))
    for point, (mean, std) in found.items():
        target_mean = 0.7 * ends[point][0] + 0.3 * stats(form_b)[point][0]
        target_std = 0.7 * ends[point][1] + 0.3 * stats(form_b)[point][1]
        scale = float(np.abs(target_std).max())
        np.testing.assert_allclose(mean, target_mean, atol=1e-4 * scale)
        np.testing.assert_allclose(std, target_std, rtol=1e-3, atol=1e-4 * scale)
    assert any(np.abs(before[p][1] - found[p][1]).max() > 1e-2 for p in found)  # it did work
    unchanged = align.repair(spec, form_a, form_a, form_b, images, 0.0)
    assert relative(symmetry.apply(spec, unchanged, images),
                    symmetry.apply(spec, form_a, images)) <= 1e-4


@pytest.mark.slow  # about 1 min: MobileNetV3's 100 tap points compile slowly
def test_mobilenet_aligns_with_permutations(digits):
    images = np.asarray(resize_images(digits[0][:256], 16, 1))
    with jax.enable_x64(True):
        spec, form_a, form_b = case('mobilenet_v3_large', images.shape)
        element = align.align(spec, form_a, form_b, images, method='permutation')
        assert relative(symmetry.apply(spec, symmetry.act(spec, form_b, element), images),
                        symmetry.apply(spec, form_b, images)) <= 1e-9


def test_bad_input_is_refused(images):
    spec, form_a, form_b = case('eq3_softball', images.shape, dtype=np.float32)
    narrow = case('eq3_softball', images.shape, dtype=np.float32)[1]
    narrow['stem']['kernel'] = narrow['stem']['kernel'][..., :4]
    with pytest.raises(ValueError, match=r'model B: the form does not match the spec: '
                                         r'stem/kernel has shape'):
        align.align(spec, form_a, narrow, images)
    resnet_spec, resnet_form, _ = case('resnet50', images.shape, dtype=np.float32)
    with pytest.raises(ValueError, match='model B: the form does not match the spec'):
        align.align(spec, form_a, resnet_form, images)
    broken = jax.tree.map(np.array, form_b)
    broken['stage2_block1']['coef'][0, 0] = np.nan
    with pytest.raises(ValueError, match=r'model B has non-finite weights '
                                         r'\(stage2_block1/coef\)'):
        align.align(spec, form_a, broken, images)
    with pytest.raises(ValueError, match="unknown method 'rotate'"):
        align.align(spec, form_a, form_b, images, method='rotate')
    with pytest.raises(ValueError, match=r'max_condition=1000000.0 must lie in \[1, 10000\]'):
        align.align(spec, form_a, form_b, images, max_condition=1e6)
    with pytest.raises(ValueError, match='images must be an NHWC batch'):
        align.align(spec, form_a, form_b, images[..., 0])
    with pytest.raises(ValueError, match='the forms have dtypes float32 and float64'):
        align.align(spec, form_a, jax.tree.map(lambda x: x.astype(np.float64), form_b), images)
