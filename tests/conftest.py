"""Shared fixtures: small batches of real images."""

import gzip
import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
CACHE_DIR = 'jax_compilation_cache_dir'  # jax's option, set for the run by pytest_configure


@pytest.hookimpl(trylast=True)  # after the tmpdir plugin sets up the run's temporary folder
def pytest_configure(config):
    """One persistent XLA compilation cache for the run, before anything compiles: tests that
    build the same model again, and the processes they start (which inherit the environment),
    load its executable instead of compiling it again. Its folder is the run's temporary one
    (under xdist, the workers' parent folder, which they share); pytest keeps the last three."""
    root = config._tmp_path_factory.getbasetemp()  # as xdist itself reads it
    if os.environ.get('PYTEST_XDIST_WORKER'):
        root = root.parent
    settings = {CACHE_DIR: str(root / 'xla-cache'), 'jax_persistent_cache_min_compile_time_secs': 0}
    for name, value in settings.items():
        os.environ[name.upper()] = str(value)
        jax.config.update(name, value)


def environment_without_compilation_cache() -> dict[str, str]:
    """This process's environment for a process that compiles its own programs."""
    return {name: value for name, value in os.environ.items() if name != CACHE_DIR.upper()}


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


def _gunzip(name: str) -> bytes:
    with gzip.open(os.path.join(FASHION_MNIST_DIR, name)) as f:
        return f.read()


def fashion_mnist_images(count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` real Fashion-MNIST test images (uint8 28x28) and labels."""
    with gzip.open(os.path.join(FASHION_MNIST_DIR, 't10k-images-idx3-ubyte.gz')) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:count]
    return images, np.frombuffer(_gunzip('t10k-labels-idx1-ubyte.gz'), np.uint8, offset=8)[:count]


def grayscale_imagefolder(root, per_class: int = 4, sixteen_bit: bool = False):
    """train/ and val/ of real Fashion-MNIST PNGs, one folder per class name (10 classes)."""
    images, labels = fashion_mnist_images(400)
    written = {split: [] for split in ('train', 'val')}
    for c in range(10):
        members = np.flatnonzero(labels == c)
        for split, picks in (('train', members[:per_class]), ('val', members[per_class:][:2])):
            folder = root / split / f'class_{c}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in picks:
                path = folder / f'{i:04d}.png'  # listed in the order written
                image = images[i]
                if sixteen_bit:  # 0..255 spread over 0..65535: 257 * x
                    Image.fromarray(image.astype(np.uint16) * 257).save(path)
                else:
                    Image.fromarray(image).save(path)
                written[split].append((path, image))
    return root, written


@pytest.fixture
def read_only_mount(tmp_path):
    """A folder that nothing can write to, not even root: a tmpfs remounted read-only."""
    def make(path, fill=None):
        path.mkdir(parents=True, exist_ok=True)
        mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', str(path)],
                                 capture_output=True, check=False)
        if mounted.returncode:
            pytest.skip(f'cannot mount a tmpfs here: {mounted.stderr.decode().strip()}')
        mounts.append(path)
        if fill:
            shutil.copytree(fill, path, dirs_exist_ok=True)
        subprocess.run(['mount', '-o', 'remount,ro', str(path)], check=True)
        return path

    mounts = []
    yield make
    for path in mounts:
        subprocess.run(['umount', str(path)], check=False)
