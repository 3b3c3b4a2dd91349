"""The config files: every Table 1 row in every dataset variant, overrides, validation."""

import importlib
import os
import subprocess
import sys
import time

from absl import flags
import jax
from ml_collections import config_flags
import pytest

from qhnet import data, models, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ('resnet50', 'mobilenet_v3_large', 'eq3_relu_all', 'eq3_hardtanh', 'eq3_hardball',
        'eq3_softball', 'eq3_nows', 'eq3_nows_x6', 'eq4', 'eq5_softball', 'eq6', 'eq7_nows_x6')
# Parameter counts of the 100-class models (DESIGN.md section 1; Eq. (5) is "about 4.27M").
PARAMETERS = {'resnet50': 23_712_932, 'mobilenet_v3_large': 4_330_132,
              'eq3_relu_all': 8_608_868, 'eq3_hardtanh': 8_608_868, 'eq3_hardball': 8_608_868,
              'eq3_softball': 8_608_868, 'eq3_nows': 8_728_100, 'eq3_nows_x6': 12_971_044,
              'eq4': 5_696_612, 'eq6': 5_610_596, 'eq7_nows_x6': 12_971_044}


def row_config(row: str, variant: str | None = None):
    return importlib.import_module(f'configs.{row}').get_config(variant)


def test_every_row_file_exists_and_documents_its_command():
    files = {name[:-3] for name in os.listdir(os.path.join(ROOT, 'configs'))
             if name.endswith('.py') and name not in ('__init__.py', 'default.py')}
    assert files == set(ROWS)
    for row in ROWS:
        doc = importlib.import_module(f'configs.{row}').__doc__
        assert f'python -m qhnet.main --config=configs/{row}.py' in doc
        assert 'Paper:' in doc


@pytest.mark.parametrize('row', ROWS)
def test_row_has_the_paper_recipe_and_its_parameter_count(row):
    config = row_config(row)
    assert config.data.name == 'imagenet100' and config.data.image_size == 224
    assert config.model.num_classes == 100 and config.num_epochs == 50
    assert config.optimizer.base_lr == 0.3 and config.optimizer.warmup_epochs == 5
    assert config.label_smoothing == 0.1
    shapes = jax.eval_shape(models.build(config.model).init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 224, 224, 3), 'float32'))
    count = sum(x.size for x in jax.tree.leaves(shapes['params']))
    if row == 'eq5_softball':
        assert abs(count - 4.27e6) < 0.01e6
    else:
        assert count == PARAMETERS[row]


@pytest.mark.parametrize('variant', ['fashion_mnist', 'digits'])
@pytest.mark.parametrize('row', ROWS)
def test_offline_variants_validate(row, variant):
    config = row_config(row, variant)
    info = train.validate_config(config)
    assert info.name == variant and config.model.num_classes == info.num_classes
    # The row's block stays what the row says; only the dataset and the size change.
    imagenet = row_config(row)
    for field in ('name', 'equation', 'activation', 'placement', 'multiplier', 'weight_sharing'):
        assert config.model[field] == imagenet.model[field]


def test_main_row_fashion_mnist_variant_is_the_small_model():
    config = row_config('eq3_softball', 'fashion_mnist')
    assert config.model.stem == 'small'
    assert (config.data.name, config.data.image_size) == ('fashion_mnist', 28)


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid dataset variants: .*'fashion_mnist'"):
        row_config('eq3_softball', 'cifar10')


def parse_flags(*args: str):
    """The config that `python -m qhnet.main *args` would get."""
    argv = ['qhnet', *args]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, flag_values=flag_values, lock_config=True,
                                    sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def test_command_line_argument_and_overrides():
    config = parse_flags(f'--config={ROOT}/configs/eq3_softball.py:fashion_mnist',
                         '--config.batch_size=64', '--config.optimizer.base_lr=0.05',
                         '--config.data.data_dir=/tmp/elsewhere')
    assert config.data.name == 'fashion_mnist' and config.batch_size == 64
    assert config.optimizer.base_lr == 0.05 and config.data.data_dir == '/tmp/elsewhere'


def test_unknown_override_key_is_rejected():
    with pytest.raises((flags.Error, AttributeError), match='Did you mean "batch_size"'):
        parse_flags(f'--config={ROOT}/configs/eq3_softball.py', '--config.batch_sise=64')


@pytest.mark.parametrize('path, value, message', [
    ('model.activation', 'gelu', r"valid choices: \['relu', "),
    ('model.dtype', 'float16', r"valid choices: \['float32', 'bfloat16'\]"),
    ('model.num_classes', 100, r'digits has 10 classes; set --config.model.num_classes=10'),
    ('data.format', 'zip', r"\('auto', 'imagefolder', 'tfds'\)"),
    ('batch_size', 0, r'config.batch_size must be an integer in \[1, inf\]'),
    ('optimizer.momentum', 1.0, r'config.optimizer.momentum must be a number in \[0, 1\)'),
    ('breakdown.lr_factor', 1.5, r'config.breakdown.lr_factor must be a number in \(0, 1\)'),
    ('optimizer.warmup_epochs', 20.0, 'leaves no steps for the cosine decay'),
])
def test_invalid_values_fail_before_compiling(path, value, message):
    config = row_config('eq3_softball', 'digits')
    section, _, key = path.rpartition('.')
    (config[section] if section else config)[key] = value
    with pytest.raises(train.ConfigError, match=message):
        train.validate_config(config)


def test_unknown_keys_fail_listing_the_valid_ones():
    config = row_config('eq3_softball', 'digits')
    config.unlock()
    config.optimizer.lr = 0.1
    with pytest.raises(train.ConfigError, match=r"unknown key\(s\) \['lr'\] in config.optimizer; "
                                                r"valid keys: \['base_lr', "):
        train.validate_config(config)


def test_batch_must_split_evenly_over_devices(monkeypatch):
    monkeypatch.setattr(jax, 'device_count', lambda: 8)
    config = row_config('eq3_softball', 'digits')
    config.batch_size = 60
    with pytest.raises(train.ConfigError, match='multiple of the 8 devices'):
        train.validate_config(config)


def test_missing_dataset_fails_at_once_with_instructions(tmp_path):
    config = row_config('eq3_softball', 'fashion_mnist')
    config.data.data_dir = str(tmp_path)
    start = time.time()
    with pytest.raises(data.DatasetNotFoundError, match='apt-get install dataset-fashion-mnist'):
        train.train_and_evaluate(config, str(tmp_path / 'workdir'))
    assert time.time() - start < 5
    assert not (tmp_path / 'workdir').exists()


def test_imagenet100_without_data_explains_the_setup():
    with pytest.raises(data.DatasetNotFoundError, match='ImageFolder'):
        train.validate_config(row_config('eq3_softball'))


def test_cli_reports_a_bad_value_without_a_traceback(tmp_path):
    workdir = tmp_path / 'workdir'
    result = subprocess.run(
        [sys.executable, '-m', 'qhnet.main', '--config=configs/eq3_softball.py:digits',
         f'--workdir={workdir}', '--config.model.placement=everywhere'],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert "error: unknown model.placement 'everywhere'; valid choices: ['ds', 'all']" in result.stderr
    assert 'Traceback' not in result.stderr
    assert not workdir.exists()
