"""What happens to one image: decoding (libjpeg-turbo through simplejpeg, else PIL), crops
(random-resized, central, padded), OpenCV's bilinear resize (or timm's PIL evaluation resize),
flips, RandAugment and the random-erasing boxes, each drawn from its own random stream of
(seed, stream position)."""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Callable

import cv2
import numpy as np
from PIL import Image, JpegImagePlugin, PngImagePlugin
import simplejpeg

from qhnet.data import augment
from qhnet.data.core import CorruptImageError

CENTRAL_CROP_FRACTION = 0.875
_CROP_SCALE = (0.08, 1.0)
_CROP_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
# Tags that keep the random streams of shuffling and of each augmentation apart.
SHUFFLE_STREAM, AUGMENT_STREAM, RAND_AUGMENT_STREAM, ERASING_STREAM = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class Transform:
    """What happens to a decoded image, and the random streams it draws from. Picklable."""
    seed: int
    size: int
    channels: int  # of the output
    native_channels: int
    variable_size: bool
    crop_padding: int  # fixed-size datasets' random crop; 0: none
    augment: bool
    rand_augment: bool
    rand_augment_magnitude: float
    rand_augment_std: float
    fill: tuple[int, ...]  # RandAugment's fill: the dataset mean, per native channel
    erasing: float
    erasing_count: int
    eval_resize: str | None = None  # config.data.eval_resize: how central crops are made

    def rng(self, stream: int, position: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, stream, position))

    def finish(self, pixels: np.ndarray, position: int, real: bool) -> dict:
        """RandAugment, erasing boxes and channel replication of one cropped image, uint8
        [size, size, native channels]."""
        if self.rand_augment:
            image = augment.rand_augment(
                Image.fromarray(pixels[..., 0] if self.native_channels == 1 else pixels),
                self.rng(RAND_AUGMENT_STREAM, position),
                magnitude=self.rand_augment_magnitude, magnitude_std=self.rand_augment_std,
                fill=self.fill)
            pixels = np.asarray(image, np.uint8).reshape(self.size, self.size, -1)
        if not real:
            pixels = np.zeros_like(pixels)
        if pixels.shape[-1] != self.channels:
            pixels = np.repeat(pixels, self.channels, axis=-1)
        example = {'image': pixels}
        if self.erasing:
            example['erase'] = augment.erasing_boxes(
                self.rng(ERASING_STREAM, position), self.size, self.size,
                probability=self.erasing, max_count=self.erasing_count)
        return example

    def decode(self, data: bytes, position: int, where: Callable[[], str]) -> np.ndarray:
        """An encoded image decoded (JPEGs by libjpeg-turbo, through simplejpeg; others by
        PIL), cropped, resized (OpenCV's bilinear) and flipped: uint8 [size, size, native
        channels]. One that does not decode raises CorruptImageError naming `where()`."""
        size = self.size
        try:
            pixels = decode_pixels(data, self.native_channels)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise CorruptImageError(f'cannot decode image {where()}: {e}. Replace or delete the '
                                    'file and run again') from e
        if self.variable_size and not self.augment and self.eval_resize == 'pil':
            return resize_and_center_crop(pixels, size)
        height, width = pixels.shape[:2]
        flip = False
        if not self.variable_size or (width, height) == (size, size):
            box = None
        elif self.augment:
            rng = self.rng(AUGMENT_STREAM, position)
            box = random_resized_crop_box(rng, width, height)
            flip = rng.random() < 0.5
        else:
            box = central_crop_box(width, height, size)
        if box is not None or (width, height) != (size, size):
            pixels = resize(pixels, box or (0, 0, width, height), size)
        if flip:
            pixels = cv2.flip(pixels, 1).reshape(pixels.shape)
        if self.augment and self.crop_padding:
            bits = hash_bits(self.seed, np.asarray([position]))
            return pad_crop_flip(pixels[None], bits, self.crop_padding)[0]
        return pixels


# Images are JPEGs or PNGs by their content, in every split, whatever their names say.
_SIGNATURES = {b'\xff\xd8': JpegImagePlugin.JpegImageFile,
               b'\x89PNG\r\n\x1a\n': PngImagePlugin.PngImageFile}
_OTHER_FORMATS = ((b'GIF8', 'GIF'), (b'BM', 'BMP'), (b'RIFF', 'WebP (or another RIFF file)'),
                  (b'II*\x00', 'TIFF'), (b'MM\x00*', 'TIFF'))
# PIL refuses images over 2 x 89M pixels as decompression bombs, which real photos can be; the
# limit here is 1.07G pixels (4 GB as RGB, already more than a crop should need).
MAX_PIXELS = 2**30


def open_image(source: bytes | str) -> Image.Image:
    """A JPEG or PNG, as PIL's own plugin opens it (lazily: the header only) without PIL's
    decompression-bomb limit, from its bytes or its path. Anything else, or an image of over
    MAX_PIXELS, raises ValueError saying what it is."""
    head = source[:8] if isinstance(source, bytes) else _read_head(source)
    opener = next((cls for magic, cls in _SIGNATURES.items() if head.startswith(magic)), None)
    if opener is None:
        found = next((name for magic, name in _OTHER_FORMATS if head.startswith(magic)), None)
        raise ValueError(f'it is {found}, not JPEG or PNG' if found
                         else 'it is neither JPEG nor PNG')
    image = opener(io.BytesIO(source) if isinstance(source, bytes) else source)
    if image.size[0] * image.size[1] > MAX_PIXELS:
        image.close()
        raise ValueError(f'it is {image.size[0]}x{image.size[1]} pixels, over the '
                         f'{MAX_PIXELS:,} this pipeline decodes')
    return image


def _read_head(path: str) -> bytes:
    with open(path, 'rb') as f:
        return f.read(8)


def decode_pixels(data: bytes, channels: int) -> np.ndarray:
    """uint8 [H, W, channels]. JPEGs go to libjpeg-turbo (simplejpeg), which is faster than
    PIL's decoder; the JPEGs it refuses (e.g. truncated ones) and PNGs go to PIL (through
    `open_image`), so that a file that neither reads raises PIL's error."""
    with open_image(data) as encoded:
        if encoded.format == 'JPEG':
            try:
                pixels = simplejpeg.decode_jpeg(data,
                                                colorspace='RGB' if channels == 3 else 'GRAY')
                return pixels.reshape(*pixels.shape[:2], channels)
            except ValueError:
                pass
        image = _to_mode(encoded, 'RGB' if channels == 3 else 'L')
    return np.asarray(image).reshape(image.size[1], image.size[0], channels)


def resize(pixels: np.ndarray, box: tuple[float, float, float, float],
           size: int) -> np.ndarray:
    """The `box` (left, top, right, bottom; rounded to whole pixels) of `pixels`, resized to
    size x size by bilinear interpolation (OpenCV; no antialiasing filter, as in
    `tf.image.resize`)."""
    left, top, right, bottom = (int(round(value)) for value in box)
    crop = pixels[top:bottom, left:right]
    resized = cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR)
    return resized.reshape(size, size, pixels.shape[-1])


_SIXTEEN_BIT_MODES = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    """`image`, decoded, in 8-bit `mode` ('RGB' or 'L'); 16-bit grayscale is scaled, not
    clipped."""
    image.load()
    if image.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(image).astype(np.uint32)
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
    return image if image.mode == mode else image.convert(mode)


def random_resized_crop_box(rng: np.random.Generator, width: int,
                            height: int) -> tuple[int, int, int, int]:
    """A crop of 8%-100% of the area and aspect ratio 3/4-4/3 (Inception style)."""
    area = width * height
    for _ in range(10):
        target_area = area * rng.uniform(*_CROP_SCALE)
        ratio = math.exp(rng.uniform(*_CROP_LOG_RATIO))
        crop_width = round(math.sqrt(target_area * ratio))
        crop_height = round(math.sqrt(target_area / ratio))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            left = int(rng.integers(0, width - crop_width + 1))
            top = int(rng.integers(0, height - crop_height + 1))
            return left, top, left + crop_width, top + crop_height
    crop_width = min(width, round(height * 4 / 3))
    crop_height = min(height, round(width * 4 / 3))
    left, top = (width - crop_width) // 2, (height - crop_height) // 2
    return left, top, left + crop_width, top + crop_height


def central_crop_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The square that resizing the shorter side to size / 0.875 and centre-cropping keeps."""
    side = min(width, height) * size / round(size / CENTRAL_CROP_FRACTION)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def resize_and_center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """timm's evaluation transform, as torchvision computes it on a PIL image: Resize of the
    shorter side to floor(size / 0.875) by PIL's bilinear filter (antialiased), then
    CenterCrop(size). uint8 [size, size, channels] of uint8 [H, W, channels] `pixels`."""
    height, width, channels = pixels.shape
    short = math.floor(size / CENTRAL_CROP_FRACTION)
    if width <= height:
        new_width, new_height = short, int(short * height / width)
    else:
        new_width, new_height = int(short * width / height), short
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
    resized = np.asarray(image.resize((new_width, new_height), Image.Resampling.BILINEAR))
    top, left = round((new_height - size) / 2), round((new_width - size) / 2)
    return resized[top:top + size, left:left + size].reshape(size, size, channels)


def hash_bits(seed: int, positions: np.ndarray) -> np.ndarray:
    """64 random-looking bits per stream position (SplitMix64 of seed and position)."""
    bits = positions.astype(np.uint64) ^ np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
    bits = bits + np.uint64(0x9E3779B97F4A7C15)
    bits = (bits ^ (bits >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    bits = (bits ^ (bits >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return bits ^ (bits >> np.uint64(31))


def pad_crop_flip(images: np.ndarray, bits: np.ndarray, padding: int) -> np.ndarray:
    """Per image: reflect-pad by `padding`, crop back at a random offset, flip half of them."""
    count, height, width, _ = images.shape
    rows = np.pad(np.arange(height), padding, 'reflect')
    cols = np.pad(np.arange(width), padding, 'reflect')
    padded = images[:, rows][:, :, cols]
    offsets = np.uint64(2 * padding + 1)
    top = (bits % offsets).astype(np.intp)
    left = ((bits >> np.uint64(16)) % offsets).astype(np.intp)
    flip = ((bits >> np.uint64(32)) & np.uint64(1)).astype(bool)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (height, width), axis=(1, 2))
    crops = np.moveaxis(windows[np.arange(count), top, left], -3, -1)
    crops[flip] = crops[flip, :, ::-1]
    return crops
