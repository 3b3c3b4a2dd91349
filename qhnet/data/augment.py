"""RandAugment and random erasing with timm's semantics, in PIL, numpy and jax.numpy.

Reproduces two torch-free pieces of timm's ImageNet recipe (timm.data.auto_augment and
timm.data.random_erasing):

* `rand_augment`: timm's `rand-m7-mstd0.5-inc1`. `num_ops` ops are drawn uniformly, with
  replacement, from `OPS` (timm's increasing-magnitude set); each is applied with probability
  0.5 with its own level ~ N(magnitude, magnitude_std) clipped to [0, 10]. With f = level / 10
  and s a random sign (+1 or -1, 50/50), the ops' arguments are:

  - Rotate: s * 30 f degrees about the centre;
  - ShearX, ShearY: affine shear s * 0.3 f about the top-left corner;
  - TranslateXRel, TranslateYRel: s * 0.45 f of the width (height) in pixels;
  - PosterizeIncreasing: keep the top 4 - int(4 f) bits (0 bits: all black);
  - SolarizeIncreasing: invert pixels >= 256 - int(256 f);
  - SolarizeAdd: add int(110 f) to pixels < 128, clipped at 255;
  - ColorIncreasing, ContrastIncreasing, BrightnessIncreasing, SharpnessIncreasing:
    PIL.ImageEnhance factor 1 + 0.9 f s, in [0.1, 1.9];
  - AutoContrast, Equalize, Invert: PIL.ImageOps, no argument.

  Geometric ops resample bilinearly or bicubically (50/50) and fill with `fill`.

* `erasing_boxes` (host, per example) and `erase` (device, per batch): timm's
  RandomErasing(probability=0.4, mode='pixel', max_count=3) on normalised images. With
  probability p, count ~ U{1..max_count} regions each try up to 10 times: area ~
  U(min_area, max_area) * H W / count, log aspect ~ U(log min_aspect, -log min_aspect),
  h = round(sqrt(area aspect)), w = round(sqrt(area / aspect)), accepted if h < H and w < W,
  top ~ U{0..H-h}, left ~ U{0..W-w}. Erased pixels become N(0, 1) noise per channel.

All host randomness comes from the `numpy.random.Generator` passed in, so a stream is
reproducible from whatever seeds that generator.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

OPS: tuple[str, ...] = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing', 'SolarizeIncreasing',
    'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing',
    'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')

_OP_PROBABILITY = 0.5
_MAX_LEVEL = 10.0
_RESAMPLINGS = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)
_ENHANCERS = {
    'ColorIncreasing': ImageEnhance.Color,
    'ContrastIncreasing': ImageEnhance.Contrast,
    'BrightnessIncreasing': ImageEnhance.Brightness,
    'SharpnessIncreasing': ImageEnhance.Sharpness,
}


def _random_sign(rng: np.random.Generator) -> float:
    return -1.0 if rng.random() < 0.5 else 1.0


def _affine(image: Image.Image, coefficients: tuple[float, ...], rng: np.random.Generator,
            fill: tuple[int, ...]) -> Image.Image:
    # PIL maps each output pixel (x, y) to the input pixel (a x + b y + c, d x + e y + f).
    return image.transform(image.size, Image.Transform.AFFINE, coefficients,
                           resample=_RESAMPLINGS[rng.integers(2)], fillcolor=fill)


def _point(image: Image.Image, lut: list[int]) -> Image.Image:
    """Applies the same 256-entry lookup table to every band."""
    return image.point(lut * len(image.getbands()))


def _rotate(image, f, rng, fill):
    degrees = _random_sign(rng) * 30.0 * f
    return image.rotate(degrees, resample=_RESAMPLINGS[rng.integers(2)], fillcolor=fill)


def _shear_x(image, f, rng, fill):
    return _affine(image, (1, _random_sign(rng) * 0.3 * f, 0, 0, 1, 0), rng, fill)


def _shear_y(image, f, rng, fill):
    return _affine(image, (1, 0, 0, _random_sign(rng) * 0.3 * f, 1, 0), rng, fill)


def _translate_x(image, f, rng, fill):
    return _affine(image, (1, 0, _random_sign(rng) * 0.45 * f * image.width, 0, 1, 0), rng, fill)


def _translate_y(image, f, rng, fill):
    return _affine(image, (1, 0, 0, 0, 1, _random_sign(rng) * 0.45 * f * image.height), rng, fill)


def _posterize(image, f, rng, fill):
    # ImageOps.posterize rejects 0 bits; this mask keeps 0..4 bits.
    mask = (0xFF << (8 - (4 - int(f * 4)))) & 0xFF
    return _point(image, [i & mask for i in range(256)])


def _solarize(image, f, rng, fill):
    return ImageOps.solarize(image, 256 - int(f * 256))


def _solarize_add(image, f, rng, fill):
    add = int(f * 110)
    return _point(image, [min(255, i + add) if i < 128 else i for i in range(256)])


def _enhance(name: str):
    def enhance(image, f, rng, fill):
        return _ENHANCERS[name](image).enhance(1.0 + 0.9 * f * _random_sign(rng))
    return enhance


_OP_FUNCTIONS: dict[str, Callable[..., Image.Image]] = {
    'AutoContrast': lambda image, f, rng, fill: ImageOps.autocontrast(image),
    'Equalize': lambda image, f, rng, fill: ImageOps.equalize(image),
    'Invert': lambda image, f, rng, fill: ImageOps.invert(image),
    'Rotate': _rotate,
    'PosterizeIncreasing': _posterize,
    'SolarizeIncreasing': _solarize,
    'SolarizeAdd': _solarize_add,
    **{name: _enhance(name) for name in _ENHANCERS},
    'ShearX': _shear_x,
    'ShearY': _shear_y,
    'TranslateXRel': _translate_x,
    'TranslateYRel': _translate_y,
}


def _apply(name: str, image: Image.Image, level: float, rng: np.random.Generator,
           fill: tuple[int, ...]) -> Image.Image:
    """Applies op `name` at `level` in [0, 10]; `rng` draws its sign and resampling filter."""
    return _OP_FUNCTIONS[name](image, level / _MAX_LEVEL, rng, fill)


def rand_augment(image: Image.Image, rng: np.random.Generator, *, num_ops: int = 2,
                 magnitude: float = 7.0, magnitude_std: float = 0.5,
                 fill: tuple[int, ...]) -> Image.Image:
    """timm rand-m{magnitude}-mstd{magnitude_std}-inc1: num_ops ops chosen uniformly with replacement,
    each applied with probability 0.5, each with its own magnitude ~ N(magnitude, std) clipped to [0, 10];
    geometric ops fill with `fill` (per channel, one value for 'L') and use bilinear or bicubic at random."""
    if image.mode not in ('RGB', 'L'):
        raise ValueError(f"rand_augment takes 'RGB' or 'L' images, not {image.mode!r}")
    if len(fill) != len(image.getbands()):
        raise ValueError(f'fill {fill} needs one value per band of a {image.mode!r} image')
    fill = tuple(int(value) for value in fill)
    for op_index in rng.integers(len(OPS), size=num_ops):
        if rng.random() < _OP_PROBABILITY:
            level = float(np.clip(rng.normal(magnitude, magnitude_std), 0.0, _MAX_LEVEL))
            image = _apply(OPS[op_index], image, level, rng, fill)
    return image


def erasing_boxes(rng: np.random.Generator, height: int, width: int, *, probability: float = 0.4,
                  max_count: int = 3, min_area: float = 0.02, max_area: float = 1 / 3,
                  min_aspect: float = 0.3) -> np.ndarray:
    """int32 [max_count, 4] rows (top, left, box_height, box_width); unused rows are all zero.
    timm semantics: erase with `probability`; then count uniform in 1..max_count; each region tries up to
    10 times: area ~ U(min_area, max_area) * H*W / count, log-aspect ~ U(log min_aspect, log 1/min_aspect),
    h = round(sqrt(area*aspect)), w = round(sqrt(area/aspect)), accepted if h < H and w < W, then
    top ~ U{0..H-h}, left ~ U{0..W-w}."""
    boxes = np.zeros((max_count, 4), np.int32)
    if rng.random() >= probability:
        return boxes
    count = int(rng.integers(1, max_count, endpoint=True))
    log_aspect_range = (math.log(min_aspect), -math.log(min_aspect))
    for region in range(count):
        for _ in range(10):
            area = rng.uniform(min_area, max_area) * height * width / count
            aspect = math.exp(rng.uniform(*log_aspect_range))
            box_height = round(math.sqrt(area * aspect))
            box_width = round(math.sqrt(area / aspect))
            if box_height < height and box_width < width:
                top = rng.integers(height - box_height, endpoint=True)
                left = rng.integers(width - box_width, endpoint=True)
                # A box rounded to zero pixels erases nothing, like timm's; its row stays zero.
                if box_height and box_width:
                    boxes[region] = (top, left, box_height, box_width)
                break
    return boxes


def erase(images: jax.Array, boxes: jax.Array, key: jax.Array) -> jax.Array:
    """Device side, jit-friendly (pure jax.numpy): images float [B, H, W, C] already normalised
    (mean 0, std 1 per channel); boxes int32 [B, max_count, 4] from erasing_boxes; every pixel inside any
    box of its image is replaced by independent N(0, 1) noise per channel (timm mode='pixel'),
    drawn from `key`; rows with zero height/width change nothing. Returns the same dtype as images."""
    _, height, width, _ = images.shape
    top, left, box_height, box_width = (boxes[..., i, None] for i in range(4))  # each [B, K, 1]
    rows = jnp.arange(height)
    columns = jnp.arange(width)
    in_rows = (rows >= top) & (rows < top + box_height)  # [B, K, H]
    in_columns = (columns >= left) & (columns < left + box_width)  # [B, K, W]
    erased = jnp.any(in_rows[..., :, None] & in_columns[..., None, :], axis=1)  # [B, H, W]
    noise = jax.random.normal(key, images.shape, images.dtype)
    return jnp.where(erased[..., None], noise, images)
