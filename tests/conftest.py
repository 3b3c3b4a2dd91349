"""Shared fixtures: small batches of real images."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits


@pytest.fixture(scope='session')
def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 real 8x8 handwritten digits, NHWC float32 in [0, 1], and labels."""
    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[..., None]
    return images, bunch.target.astype(np.int32)


def resize_images(images: np.ndarray, size: int, channels: int) -> jax.Array:
    """Bilinear resize of NHWC images to size x size, gray replicated to `channels`."""
    resized = jax.image.resize(jnp.asarray(images), (images.shape[0], size, size, images.shape[-1]), 'bilinear')
    return jnp.repeat(resized, channels, axis=-1) if images.shape[-1] == 1 else resized
