"""What is checked before anything is compiled or written: the memory a step needs at least,
more decoding workers than CPUs, and the variables `config.init_from` would start from."""

import logging
import os
import time

import jax
import jax.numpy as jnp
import pytest

from qhnet import config as qhnet_config
from qhnet import training
from qhnet import models
from qhnet.training import checkpoints, preflight
from tests.test_training import tiny_config


def test_an_image_size_no_device_can_hold_is_refused_at_once(tmp_path):
    config = qhnet_config.row_config('eq3_softball', 'fashion_mnist')
    config.data.image_size, config.batch_size = 8192, 1024  # over 500 GiB of stem activations
    start = time.time()
    with pytest.raises(qhnet_config.ConfigError,
                       match=r'a training step needs at least [0-9,.]+ GiB on each device .* '
                             r'lower config.data.image_size or config.batch_size'):
        training.train_and_evaluate(config, str(tmp_path / 'workdir'))
    assert time.time() - start < 30
    assert not (tmp_path / 'workdir').exists()


def test_more_workers_than_cpus_is_warned_about(caplog):
    config = tiny_config(**{'data.num_workers': 4 * (os.cpu_count() or 1)})
    with caplog.at_level(logging.WARNING):
        preflight.validate(config)
    assert 'decoding processes for' in caplog.text and 'more workers than CPUs' in caplog.text


def test_init_from_another_model_is_refused_before_anything_is_written(tmp_path):
    source = str(tmp_path / 'source')
    config = tiny_config()
    variables = models.build(config.model).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    checkpoints.save_variables(source, 0, variables, config)
    other = tiny_config(**{'model.widths': (8, 32), 'init_from': source})
    workdir = tmp_path / 'workdir'
    with pytest.raises(qhnet_config.ConfigError, match='holds variables of another model'):
        training.train_and_evaluate(other, str(workdir))
    assert not workdir.exists()
