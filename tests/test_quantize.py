"""qhnet.symmetry.quantize: the integer grids, the calibration, every transform exact in float64,
the quantized model close to the float one at 16 bits, and bad input refused.

Models: the small Eq. (3) layout of tests/test_slicing.py (softball@ds: O(n) streams; identity:
GL streams) and the digits ResNet50, with random variables, on real digits upsampled to 16x16.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qhnet import config, models, symmetry
from qhnet.symmetry import qhnet_family, quantize
from qhnet.symmetry.testing import random_variables
from tests.conftest import resize_images
from tests.test_slicing import make_case, relative


@pytest.fixture(scope='module')
def images(digits) -> np.ndarray:
    return np.asarray(resize_images(digits[0][:64], 16, 1))


def case(name):
    if name == 'resnet50':
        cfg = config.row_config('resnet50', 'digits')
        model = models.build(cfg.model)
        return model, random_variables(model, (16, 16, 16, 1), seed=0)
    _, model, variables = make_case(name)
    return model, variables


@pytest.mark.parametrize('bits,expected', [('w8a8', (8, 8)), ('W4A8', (4, 8)), ('w2a16', (2, 16))])
def test_bits_are_parsed(bits, expected):
    parsed = quantize.parse_bits(bits)
    assert (parsed.weights, parsed.activations) == expected


@pytest.mark.parametrize('bits,message', [
    ('w1a8', '1 weight bits is outside 2..16'), ('w4a17', '17 activation bits is outside 2..16'),
    ('w4', 'not of the form w<bits>a<bits>'), ('int8', 'not of the form')])
def test_bits_outside_the_range_are_refused(bits, message):
    with pytest.raises(ValueError, match=message):
        quantize.parse_bits(bits)


@pytest.mark.parametrize('bits', [2, 4, 8])
def test_weight_codes_are_integers_in_range_and_round_to_nearest(bits):
    w = np.random.default_rng(bits).standard_normal((3, 3, 5, 7))
    w[..., 0] = 0.0  # an all-zero channel keeps its zeros
    codes, scale = quantize.weight_codes(w, bits)
    top = 2 ** (bits - 1) - 1
    assert codes.dtype == np.int32 and np.abs(codes).max() <= top
    assert np.all(codes[..., 0] == 0) and scale.shape == (7,)
    inside = np.abs(w) <= top * scale  # inside the clipping range: the nearest grid point
    assert np.all((np.abs(codes * scale - w) <= scale / 2 + 1e-12)[inside])
    # Only ratio 1 (max|W|): exactly round(W / s).
    codes_max, scale_max = quantize.weight_codes(w, bits, ratios=(1.0,))
    assert np.array_equal(codes_max, np.round(w / scale_max).astype(np.int32))
    assert scale_max[1:] == pytest.approx(np.abs(w).reshape(-1, 7).max(0)[1:] / top)


def test_more_weight_bits_round_less():
    w = np.random.default_rng(0).standard_normal((64, 32))
    errors = []
    for bits in (2, 4, 8):
        codes, scale = quantize.weight_codes(w, bits)
        errors.append(np.linalg.norm(codes * scale - w))
    assert errors[0] > errors[1] > errors[2] > 0


@pytest.mark.parametrize('bits', [2, 4, 8])
def test_activation_codes_are_integers_in_range_with_an_exact_zero(bits):
    x = jnp.linspace(-3.0, 5.0, 1001)
    codes, scale, zero = quantize.activation_codes(x, -2.0, 4.0, bits)
    assert float(codes.min()) >= 0 and float(codes.max()) <= 2 ** bits - 1
    assert np.array_equal(codes, np.round(codes))
    fake = quantize.fake_quantize(x, -2.0, 4.0, bits)
    inside = (x >= -2.0) & (x <= 4.0)
    assert float(jnp.abs(fake - x)[inside].max()) <= float(scale) / 2 + 1e-6
    assert float(fake.min()) >= -2.0 - scale and float(fake.max()) <= 4.0 + scale  # clipped
    assert float(quantize.fake_quantize(jnp.zeros(3), -2.0, 4.0, bits)[0]) == 0.0
    # A range of non-negative values (after a relu) still holds zero.
    _, _, zero = quantize.activation_codes(x, 0.5, 4.0, bits)
    assert float(zero) == 0.0


def test_calibration_picks_a_clipped_range_at_every_point(images):
    model, variables = case('softball')
    spec = symmetry.group_spec(model, tie_identity_shortcuts=True)
    form = symmetry.fold(spec, variables)
    ranges, errors = quantize.calibrate(spec, form, images, 4)
    blocks = [b.name for b in spec.structure.blocks]
    assert set(ranges) == {f'{b}/{p}' for b in blocks for p in ('input', 'product')} | {'pooled'}
    seen = {}

    def tap(point, x):
        seen[point] = (float(jnp.min(x)), float(jnp.max(x)))
        return x

    # The first point sees the float values: its range is one of the ratios of [min, max].
    first = f'{blocks[0]}/input'
    qhnet_family.logits(spec.structure, jax.tree.map(jnp.asarray, form), jnp.asarray(images), tap)
    lo, hi = seen[first]
    ratio = ranges[first][1] / hi
    assert min(abs(ratio - r) for r in quantize.CLIP_RATIOS) < 1e-5
    assert ranges[first][0] == pytest.approx(ratio * lo, rel=1e-5, abs=1e-7)
    assert all(0 <= e < 0.5 for e in errors.values())
    assert all(r[0] <= r[1] for r in ranges.values())


@pytest.mark.parametrize('name', ['softball', 'resnet50'])
def test_sixteen_bits_compute_the_float_function(images, name):
    model, variables = case(name)
    spec = symmetry.group_spec(model, tie_identity_shortcuts=True)
    form = symmetry.fold(spec, variables)
    quantized = quantize.quantize(spec, form, images, 'w16a16')
    float_logits = np.asarray(symmetry.apply(spec, form, images))
    assert relative(quantize.apply(spec, quantized, images), float_logits) < 1e-3
    coarse = quantize.quantize(spec, form, images, 'w2a2')
    assert relative(quantize.apply(spec, coarse, images), float_logits) > 1e-2


@pytest.mark.parametrize('name,transforms', [
    ('softball', ('random', 'hadamard', 'smooth+learned')),
    ('identity', ('smooth', 'learned')),
    ('resnet50', ('smooth',))])
def test_every_transform_is_exact_in_float64(images, name, transforms):
    model, variables = case(name)
    spec = symmetry.group_spec(model, tie_identity_shortcuts=True)
    form = symmetry.fold(spec, variables)
    elements = {t: quantize.quantize(spec, form, images, 'w4a4', t, steps=3).element
                for t in transforms}
    with jax.enable_x64(True):
        form64 = symmetry.fold(spec, variables, dtype=np.float64)
        images64 = np.asarray(images, np.float64)
        reference = np.asarray(symmetry.apply(spec, form64, images64))
        for transform, element in elements.items():
            assert element['streams'] or element['hidden'], transform
            moved = symmetry.act(spec, form64, element)
            assert relative(symmetry.apply(spec, moved, images64), reference) < 1e-9, transform
            changed = max(np.abs(moved[layer][key] - form64[layer][key]).max()
                          for layer in form64 for key in form64[layer])
            assert changed > 1e-3, transform  # the element did move the weights


def test_learned_rotations_are_orthogonal_and_lower_their_loss(images):
    model, variables = case('softball')
    spec = symmetry.group_spec(model, tie_identity_shortcuts=True)
    form = symmetry.fold(spec, variables)
    losses = []
    element = quantize.learn_rotations(spec, form, images, quantize.parse_bits('w4a4'), steps=30,
                                       learning_rate=1e-2, progress=lambda i, v: losses.append(v))
    assert set(element['streams']) == {s.name for s in quantize.rotatable(spec)}
    for t in element['streams'].values():
        assert np.abs(t.T @ t - np.eye(len(t))).max() < 1e-10
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_a_rotation_on_a_model_without_rotatable_streams_is_refused(images):
    model, variables = case('resnet50')
    spec = symmetry.group_spec(model)
    form = symmetry.fold(spec, variables)
    for transform in ('learned', 'random', 'smooth+hadamard'):
        with pytest.raises(ValueError, match="has none .*use 'none' or 'smooth'"):
            quantize.quantize(spec, form, images, 'w4a4', transform)


def test_bad_calibration_images_and_transforms_are_refused(images):
    model, variables = case('softball')
    spec = symmetry.group_spec(model)
    form = symmetry.fold(spec, variables)
    with pytest.raises(ValueError, match=r'images must be an NHWC batch of shape \(N, H, W, 1\)'):
        quantize.quantize(spec, form, images[..., 0], 'w8a8')
    with pytest.raises(ValueError, match=r'images must be an NHWC batch'):
        quantize.quantize(spec, form, np.repeat(images, 3, axis=-1), 'w8a8')
    with pytest.raises(ValueError, match="unknown transform 'rotate'"):
        quantize.quantize(spec, form, images, 'w8a8', 'rotate')


def test_mobilenet_is_refused_before_any_work():
    cfg = config.row_config('mobilenet_v3_large', 'digits')
    spec = symmetry.group_spec(models.build(cfg.model))
    with pytest.raises(ValueError, match='quantization covers QHNets and ResNet50'):
        quantize.check_supported(spec, 'none')
