"""timm-style RandAugment and random erasing on real Fashion-MNIST images."""

import collections
import gzip
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageEnhance, ImageOps
import pytest


from qhnet.data import augment
FASHION_MNIST_TRAIN = '/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz'
FILL_RGB = (124, 116, 104)
FILL_L = (117,)
RESAMPLINGS = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)


@pytest.fixture(scope='module')
def fashion() -> np.ndarray:
    """The first four Fashion-MNIST training images, uint8 [4, 28, 28]."""
    count = 4
    with gzip.open(FASHION_MNIST_TRAIN, 'rb') as file:
        raw = file.read(16 + count * 28 * 28)
    return np.frombuffer(raw[16:], np.uint8).reshape(count, 28, 28)


@pytest.fixture(scope='module')
def gray_images(fashion) -> list[Image.Image]:
    return [Image.fromarray(image).resize((64, 48), Image.Resampling.BICUBIC) for image in fashion]


@pytest.fixture(scope='module')
def rgb_images(gray_images) -> list[Image.Image]:
    """The gray images tinted per channel, so the three bands differ."""
    tint = np.array([1.0, 0.7, 0.4])
    return [Image.fromarray((np.asarray(image)[..., None] * tint + [0, 40, 80]).clip(0, 255).astype(np.uint8))
            for image in gray_images]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


def assert_one_of(result: Image.Image, candidates: dict) -> object:
    """Asserts `result` equals exactly one candidate image; returns that candidate's key."""
    matches = [key for key, candidate in candidates.items()
               if np.array_equal(pixels(result), pixels(candidate))]
    assert len(matches) == 1, f'{len(matches)} of {list(candidates)} match'
    return matches[0]


def test_ops_are_timms_increasing_set_in_order():
    assert augment.OPS == (
        'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing', 'SolarizeIncreasing',
        'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing',
        'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')


def geometric_candidates(name: str, image: Image.Image, level: float, fill) -> dict:
    """PIL's own transform for each (sign, resampling) the op may draw."""
    f = level / 10
    candidates = {}
    for sign, resample in itertools.product((1, -1), RESAMPLINGS):
        if name == 'Rotate':
            candidates[sign, resample] = image.rotate(sign * 30 * f, resample=resample, fillcolor=fill)
            continue
        coefficients = {
            'ShearX': (1, sign * 0.3 * f, 0, 0, 1, 0),
            'ShearY': (1, 0, 0, sign * 0.3 * f, 1, 0),
            'TranslateXRel': (1, 0, sign * 0.45 * f * image.width, 0, 1, 0),
            'TranslateYRel': (1, 0, 0, 0, 1, sign * 0.45 * f * image.height),
        }[name]
        candidates[sign, resample] = image.transform(
            image.size, Image.Transform.AFFINE, coefficients, resample=resample, fillcolor=fill)
    return candidates


@pytest.mark.parametrize('name', ['Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel'])
@pytest.mark.parametrize('level', [10.0, 5.0])
def test_geometric_ops_match_pil_with_random_sign_and_resampling(name, level, rgb_images, gray_images):
    for image, fill in ((rgb_images[0], FILL_RGB), (gray_images[1], FILL_L)):
        candidates = geometric_candidates(name, image, level, fill)
        drawn = {assert_one_of(augment._apply(name, image, level, np.random.default_rng(seed), fill),
                               candidates)
                 for seed in range(24)}
        assert drawn == set(candidates)  # both signs and both filters occur


def test_rotate_fills_uncovered_corners(rgb_images):
    rotated = augment._apply('Rotate', rgb_images[0], 10.0, np.random.default_rng(0), FILL_RGB)
    assert rotated.getpixel((0, 0)) == FILL_RGB


@pytest.mark.parametrize('level, kept_bits', [(0.0, 4), (5.0, 2), (7.0, 2), (7.5, 1), (10.0, 0)])
def test_posterize_keeps_4_minus_int_4f_bits(level, kept_bits, rgb_images):
    image = rgb_images[0]
    result = augment._apply('PosterizeIncreasing', image, level, np.random.default_rng(0), FILL_RGB)
    mask = (0xFF << (8 - kept_bits)) & 0xFF
    np.testing.assert_array_equal(pixels(result), pixels(image) & mask)


@pytest.mark.parametrize('level, threshold', [(10.0, 0), (5.0, 128), (7.0, 77), (0.0, 256)])
def test_solarize_inverts_from_256_minus_int_256f(level, threshold, rgb_images):
    image = rgb_images[1]
    result = augment._apply('SolarizeIncreasing', image, level, np.random.default_rng(0), FILL_RGB)
    expected = np.where(pixels(image) >= threshold, 255 - pixels(image), pixels(image))
    np.testing.assert_array_equal(pixels(result), expected)
    if level == 10.0:
        np.testing.assert_array_equal(pixels(result), pixels(ImageOps.invert(image)))


@pytest.mark.parametrize('level, added', [(10.0, 110), (7.0, 77), (0.0, 0)])
def test_solarize_add_adds_int_110f_below_128(level, added, rgb_images, gray_images):
    for image in (rgb_images[2], gray_images[2]):
        result = augment._apply('SolarizeAdd', image, level, np.random.default_rng(0), FILL_RGB)
        expected = np.where(pixels(image) < 128, np.minimum(pixels(image) + added, 255), pixels(image))
        np.testing.assert_array_equal(pixels(result), expected)


@pytest.mark.parametrize('name, enhancer', [
    ('ColorIncreasing', ImageEnhance.Color), ('ContrastIncreasing', ImageEnhance.Contrast),
    ('BrightnessIncreasing', ImageEnhance.Brightness), ('SharpnessIncreasing', ImageEnhance.Sharpness)])
def test_enhance_factor_is_1_plus_or_minus_0_9f(name, enhancer, rgb_images):
    image = rgb_images[3]
    candidates = {factor: enhancer(image).enhance(factor) for factor in (1 + 0.9 * 0.7, 1 - 0.9 * 0.7)}
    drawn = {assert_one_of(augment._apply(name, image, 7.0, np.random.default_rng(seed), FILL_RGB), candidates)
             for seed in range(16)}
    assert drawn == set(candidates)


def test_color_on_gray_image_changes_nothing(gray_images):
    image = gray_images[0]
    for seed in range(4):
        result = augment._apply('ColorIncreasing', image, 10.0, np.random.default_rng(seed), FILL_L)
        assert result.mode == 'L'
        np.testing.assert_array_equal(pixels(result), pixels(image))


@pytest.mark.parametrize('name, function', [
    ('AutoContrast', ImageOps.autocontrast), ('Equalize', ImageOps.equalize), ('Invert', ImageOps.invert)])
def test_magnitude_free_ops_are_pil_imageops(name, function, rgb_images, gray_images):
    for image, level in ((rgb_images[0], 3.0), (gray_images[3], 9.0)):
        result = augment._apply(name, image, level, np.random.default_rng(0), FILL_RGB)
        np.testing.assert_array_equal(pixels(result), pixels(function(image)))
    assert not np.array_equal(pixels(function(rgb_images[0])), pixels(rgb_images[0]))


def record_ops(monkeypatch, **kwargs) -> list[tuple[str, float]]:
    """Runs rand_augment 3000 times with `_apply` replaced by a recorder; returns its (name, level) calls."""
    calls = []

    def recording_apply(name, image, level, rng, fill):
        calls.append((name, level))
        return image

    monkeypatch.setattr(augment, '_apply', recording_apply)
    image = Image.new('RGB', (8, 8))
    rng = np.random.default_rng(1)
    for _ in range(3000):
        augment.rand_augment(image, rng, fill=FILL_RGB, **kwargs)
    return calls


def test_levels_are_sampled_around_magnitude_and_clipped(monkeypatch):
    calls = record_ops(monkeypatch, num_ops=2, magnitude=8.0, magnitude_std=4.0)
    levels = np.array([level for _, level in calls])
    assert levels.min() == 0.0 and levels.max() == 10.0
    # Clipping piles N(8, 4)'s tails onto the ends: P(< 0) = 0.023, P(> 10) = 0.309.
    assert abs(np.mean(levels == 0.0) - 0.023) < 0.01
    assert abs(np.mean(levels == 10.0) - 0.309) < 0.03
    assert abs(np.median(levels) - 8.0) < 0.3


def test_ops_are_uniform_and_each_applied_with_probability_half(monkeypatch):
    calls = record_ops(monkeypatch, num_ops=2, magnitude=7.0, magnitude_std=0.0)
    assert 0.46 < len(calls) / (2 * 3000) < 0.54
    assert {level for _, level in calls} == {7.0}
    counts = collections.Counter(name for name, _ in calls)
    assert set(counts) == set(augment.OPS)
    assert all(abs(count / len(calls) - 1 / 15) < 0.025 for count in counts.values())


def test_magnitude_above_10_is_clipped_without_noise(monkeypatch):
    calls = record_ops(monkeypatch, num_ops=1, magnitude=30.0, magnitude_std=0.0)
    assert calls and {level for _, level in calls} == {10.0}


def test_rand_augment_is_reproducible_and_keeps_mode_and_size(rgb_images, gray_images):
    for image, fill in ((rgb_images[0], FILL_RGB), (gray_images[0], FILL_L)):
        outputs = []
        for seed in range(12):
            first = augment.rand_augment(image, np.random.default_rng(seed), fill=fill)
            again = augment.rand_augment(image, np.random.default_rng(seed), fill=fill)
            assert first.mode == image.mode and first.size == image.size
            np.testing.assert_array_equal(pixels(first), pixels(again))
            outputs.append(pixels(first).tobytes())
        assert len(set(outputs)) > 6  # different seeds give different augmentations
        heavy = augment.rand_augment(image, np.random.default_rng(0), num_ops=6, magnitude=10.0, fill=fill)
        assert heavy.mode == image.mode and heavy.size == image.size


def test_rand_augment_rejects_fill_of_wrong_length(rgb_images, gray_images):
    with pytest.raises(ValueError, match='fill'):
        augment.rand_augment(gray_images[0], np.random.default_rng(0), fill=FILL_RGB)
    with pytest.raises(ValueError, match='fill'):
        augment.rand_augment(rgb_images[0], np.random.default_rng(0), fill=FILL_L)


def test_erasing_boxes_follow_timm_distribution():
    height, width, draws = 224, 192, 4000
    rng = np.random.default_rng(0)
    all_boxes = np.stack([augment.erasing_boxes(rng, height, width) for _ in range(draws)])
    assert all_boxes.dtype == np.int32 and all_boxes.shape == (draws, 3, 4)

    used = np.any(all_boxes != 0, axis=-1)  # [draws, 3]
    erased = used.any(axis=-1)
    assert abs(erased.mean() - 0.4) < 0.04
    # Regions fill rows from the first, so the number of used rows is the drawn count.
    counts = used.sum(axis=-1)
    np.testing.assert_array_equal(used, np.arange(3) < counts[:, None])
    for count in (1, 2, 3):
        assert abs(np.mean(counts[erased] == count) - 1 / 3) < 0.05

    top, left, box_height, box_width = (all_boxes[used][:, i] for i in range(4))
    assert np.all(box_height >= 1) and np.all(box_width >= 1)
    assert np.all(box_height < height) and np.all(box_width < width)
    assert np.all(top >= 0) and np.all(top + box_height <= height)
    assert np.all(left >= 0) and np.all(left + box_width <= width)
    assert top.min() == 0 and (top + box_height).max() == height  # tops reach both ends of the range

    # Each box's area is U(0.02, 1/3) * H*W / count, up to rounding of its sides.
    scaled_area = box_height * box_width / (height * width) * np.repeat(counts, counts)
    assert scaled_area.min() > 0.02 * 0.9 and scaled_area.max() < 1 / 3 * 1.1
    assert scaled_area.min() < 0.03 and scaled_area.max() > 0.3
    aspect = box_height / box_width
    assert aspect.min() < 0.35 and aspect.max() > 1 / 0.35


def test_erasing_boxes_are_reproducible_and_respect_probability():
    first = [augment.erasing_boxes(np.random.default_rng(seed), 28, 28) for seed in range(50)]
    again = [augment.erasing_boxes(np.random.default_rng(seed), 28, 28) for seed in range(50)]
    np.testing.assert_array_equal(np.stack(first), np.stack(again))
    rng = np.random.default_rng(3)
    assert all(np.any(augment.erasing_boxes(rng, 28, 28, probability=1.0)) for _ in range(100))
    assert not any(np.any(augment.erasing_boxes(rng, 28, 28, probability=0.0)) for _ in range(100))


def test_erasing_boxes_on_tiny_images_keep_no_empty_rows():
    rng = np.random.default_rng(0)
    all_boxes = np.stack([augment.erasing_boxes(rng, 8, 8, probability=1.0) for _ in range(500)])
    used = np.any(all_boxes != 0, axis=-1)
    assert np.all(all_boxes[used][:, 2:] >= 1)
    assert not used.all()  # some regions round to zero pixels and are dropped


def box_mask(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    mask = np.zeros((len(boxes), height, width), bool)
    for image_index, image_boxes in enumerate(boxes):
        for top, left, box_height, box_width in image_boxes:
            mask[image_index, top:top + box_height, left:left + box_width] = True
    return mask


@pytest.fixture(scope='module')
def erase_inputs(fashion):
    """Normalised Fashion-MNIST images at 56x56x3 with boxes for 4 images, the last one not erased."""
    batch = np.repeat(np.repeat(fashion, 2, axis=1), 2, axis=2)[..., None].repeat(3, axis=-1)
    images = ((batch / 255.0 - 0.3) / 0.35).astype(np.float32)
    rng = np.random.default_rng(5)
    boxes = np.stack([augment.erasing_boxes(rng, 56, 56, probability=1.0) for _ in range(3)]
                     + [np.zeros((3, 4), np.int32)])
    return images, boxes


def test_erase_replaces_exactly_the_boxes_with_standard_noise(erase_inputs):
    images, boxes = erase_inputs
    result = np.asarray(augment.erase(jnp.asarray(images), jnp.asarray(boxes), jax.random.key(0)))
    assert result.dtype == np.float32 and result.shape == images.shape
    mask = box_mask(boxes, 56, 56)
    assert mask[:3].any(axis=(1, 2)).all()
    np.testing.assert_array_equal(result[~mask], images[~mask])
    noise = result[mask]  # [pixels, 3]
    assert noise.shape[0] > 500
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1
    assert abs(np.corrcoef(noise[:, 0], noise[:, 1])[0, 1]) < 0.15  # independent per channel
    assert not np.any(noise == images[mask])


def test_erase_with_zero_boxes_is_identity_and_works_under_jit(erase_inputs):
    images, boxes = erase_inputs
    key = jax.random.key(1)
    zero_boxes = jnp.zeros_like(boxes)
    np.testing.assert_array_equal(np.asarray(augment.erase(jnp.asarray(images), zero_boxes, key)), images)
    eager = augment.erase(jnp.asarray(images), jnp.asarray(boxes), key)
    jitted = jax.jit(augment.erase)(jnp.asarray(images), jnp.asarray(boxes), key)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(eager))
    other_key = augment.erase(jnp.asarray(images), jnp.asarray(boxes), jax.random.key(2))
    assert not np.array_equal(np.asarray(other_key), np.asarray(eager))


def test_erase_keeps_bfloat16(erase_inputs):
    images, boxes = erase_inputs
    result = augment.erase(jnp.asarray(images, jnp.bfloat16), jnp.asarray(boxes), jax.random.key(0))
    assert result.dtype == jnp.bfloat16
