"""The config files: every Table 1 row in every dataset variant, overrides, validation."""

import importlib
import math
import os
import re
import shutil
import subprocess
import sys
import time

from absl import flags
import flax
import jax
from ml_collections import config_flags
import pytest

from qhnet import config as qhnet_config
from qhnet import data, models
from qhnet import training
from qhnet.training import preflight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = tuple(qhnet_config.ROWS)
ALL_ROWS = ROWS + tuple(qhnet_config.RELEASED)  # Table 1 and the released QLNet


def row_config(row: str, variant: str | None = None):
    """The config of `configs/<row>.py`, the command line's file for a Table 1 row."""
    return importlib.import_module(f'configs.{row}').get_config(variant)


def test_every_row_file_exists_and_documents_its_command():
    files = {name[:-3] for name in os.listdir(os.path.join(ROOT, 'configs'))
             if name.endswith('.py') and name not in ('__init__.py', 'default.py')}
    assert files == set(ALL_ROWS)
    for row in ALL_ROWS:
        doc = importlib.import_module(f'configs.{row}').__doc__
        assert f'python -m qhnet.main --config=configs/{row}.py' in doc
        released = row in qhnet_config.RELEASED
        figure = (qhnet_config.RELEASED if released else qhnet_config.ROWS)[row].paper_top1
        assert ('Released:' if released else 'Paper:') in doc and f'{figure:.2f}%' in doc


@pytest.mark.parametrize('variant', [None, 'imagenet1k', 'fashion_mnist', 'digits'])
@pytest.mark.parametrize('row', ALL_ROWS)
def test_row_files_are_the_package_rows(row, variant):
    assert row_config(row, variant).to_dict() == qhnet_config.row_config(row, variant).to_dict()


@pytest.mark.parametrize('row', ALL_ROWS)
def test_row_has_the_paper_recipe(row):
    config = row_config(row)
    assert config.data.name == 'imagenet100' and config.data.image_size == 224
    assert config.model.num_classes == 100 and config.num_epochs == 50
    assert config.optimizer.base_lr == 0.3 and config.optimizer.warmup_epochs == 5
    assert config.label_smoothing == 0.1
    assert isinstance(models.build(config.model), flax.linen.Module)


@pytest.mark.parametrize('variant', ['fashion_mnist', 'digits'])
@pytest.mark.parametrize('row', ALL_ROWS)
def test_offline_variants_validate(row, variant):
    config = row_config(row, variant)
    info = preflight.validate(config).info
    assert info.name == variant and config.model.num_classes == info.num_classes
    # The row's block stays what the row says; only the dataset and the size change.
    imagenet = row_config(row)
    for field in ('name', 'equation', 'activation', 'placement', 'multiplier', 'weight_sharing'):
        assert config.model[field] == imagenet.model[field]


def test_main_row_fashion_mnist_variant_is_the_small_model():
    config = row_config('eq3_softball', 'fashion_mnist')
    assert config.model.stem == 'small_stride2'
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
    ('model.activation', 'gelu', r"config.model.activation must be one of \['relu', "),
    ('model.dtype', 'float16', r"must be one of \['float32', 'bfloat16'\], got 'float16'"),
    ('model.num_classes', 100, r'digits has 10 classes; set --config.model.num_classes=10'),
    ('data.format', 'zip', r"config.data.format must be one of \['auto', 'imagefolder', 'tfds'\]"),
    ('batch_size', 0, r'config.batch_size must be an integer in \[1, inf\), got 0'),
    ('optimizer.momentum', 1.0, r'config.optimizer.momentum must be a finite number in \[0, 1\)'),
    ('breakdown.lr_factor', 1.5, r'config.breakdown.lr_factor must be a finite number in \(0, 1\)'),
    ('optimizer.warmup_epochs', 20.0, 'leaves no steps for the cosine decay'),
])
def test_invalid_values_fail_before_compiling(path, value, message):
    config = row_config('eq3_softball', 'digits')
    section, _, key = path.rpartition('.')
    (config[section] if section else config)[key] = value
    with pytest.raises(qhnet_config.ConfigError, match=message):
        preflight.validate(config)


def test_unknown_keys_fail_listing_the_valid_ones():
    config = row_config('eq3_softball', 'digits')
    config.unlock()
    config.optimizer.lr = 0.1
    with pytest.raises(qhnet_config.ConfigError, match=r"unknown key\(s\) \['lr'\] in config.optimizer; "
                                                r"valid keys: \['base_lr', "):
        preflight.validate(config)


def test_batch_must_split_evenly_over_devices(monkeypatch):
    monkeypatch.setattr(jax, 'device_count', lambda: 8)
    config = row_config('eq3_softball', 'digits')
    config.batch_size = 60
    with pytest.raises(qhnet_config.ConfigError, match='multiple of the 8 devices'):
        preflight.validate(config)


def test_missing_dataset_fails_at_once_with_instructions(tmp_path):
    config = row_config('eq3_softball', 'fashion_mnist')
    config.data.data_dir = str(tmp_path)
    start = time.time()
    with pytest.raises(data.DatasetNotFoundError, match='apt-get install dataset-fashion-mnist'):
        training.train_and_evaluate(config, str(tmp_path / 'workdir'))
    assert time.time() - start < 5
    assert not (tmp_path / 'workdir').exists()


def test_imagenet100_without_data_explains_the_setup():
    with pytest.raises(data.DatasetNotFoundError, match='ImageFolder'):
        preflight.validate(row_config('eq3_softball'))


def test_imagenet1k_variant_is_the_paper_recipe_on_every_class_evaluated_as_timm():
    config, paper = row_config('eq3_softball', 'imagenet1k'), row_config('eq3_softball')
    assert config.data.name == 'imagenet1k' and config.data.eval_resize == 'pil'
    assert config.model.num_classes == 1000 and config.data.class_list is None
    config.data.update(name=paper.data.name, eval_resize=None)
    config.model.num_classes = paper.model.num_classes
    assert config.to_dict() == paper.to_dict()
    with pytest.raises(data.DatasetNotFoundError, match='--config.data.data_dir=DIR, an '
                                                        'ImageNet-1k ImageFolder root'):
        preflight.validate(row_config('eq3_softball', 'imagenet1k'))


def test_cli_reports_a_bad_value_without_a_traceback(tmp_path):
    workdir = tmp_path / 'workdir'
    result = subprocess.run(
        [sys.executable, '-m', 'qhnet.main', '--config=configs/eq3_softball.py:digits',
         f'--workdir={workdir}', '--config.model.placement=everywhere'],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert ("error: config.model.placement must be one of ['ds', 'all'], got 'everywhere'"
            in result.stderr)
    assert 'Traceback' not in result.stderr
    assert not workdir.exists()


def test_missing_keys_fail_naming_them():
    config = row_config('eq3_softball', 'digits')
    del config.checkpoint['max_to_keep']
    with pytest.raises(qhnet_config.ConfigError, match=r"config.checkpoint lacks \['max_to_keep'\]; start "
                                                r"from qhnet.config.get_config\(\)"):
        preflight.validate(config)
    model_config = qhnet_config.model_config()
    del model_config['remat']
    with pytest.raises(ValueError, match=r"config.model lacks \['remat'\]"):
        models.build(model_config)


def test_installed_package_stands_alone(tmp_path):
    """`pip install .` (not editable) into a fresh environment: from outside the repository,
    every Table 1 model builds from the package's own config, and `python -m qhnet.params` runs.
    The environment sees this machine's packages for the dependencies; nothing is downloaded."""
    source = tmp_path / 'source'  # a copy, so that the build writes nothing into the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        '.git', 'build', '*.egg-info', '__pycache__', 'workdir*', 'experiments', 'benchmarks'))
    pip = ['-m', 'pip', '-q', '--disable-pip-version-check']
    subprocess.run([sys.executable, *pip, 'wheel', '--no-deps', '--no-build-isolation', '--no-index',
                    '-w', str(tmp_path / 'wheel'), str(source)],
                   check=True, timeout=300, capture_output=True, cwd=tmp_path)
    env_dir = tmp_path / 'env'
    subprocess.run([sys.executable, '-m', 'venv', '--system-site-packages', str(env_dir)],
                   check=True, timeout=120)
    python = str(env_dir / 'bin' / 'python')
    (wheel,) = (tmp_path / 'wheel').glob('qhnet-*.whl')
    subprocess.run([python, *pip, 'install', '--no-deps', '--no-index', str(wheel)],
                   check=True, timeout=300, capture_output=True, cwd=tmp_path)
    script = (
        'import importlib.util, qhnet\n'
        'from qhnet import config, models\n'
        'assert importlib.util.find_spec("configs") is None, "the repository is on the path"\n'
        'print(qhnet.__file__)\n'
        'for row in config.ROWS:\n'
        '    for variant in (None, "fashion_mnist", "digits"):\n'
        '        models.build(config.row_config(row, variant).model)\n'
        'print(len(config.ROWS), "rows")\n')
    outside = tmp_path / 'elsewhere'
    outside.mkdir()
    built = subprocess.run([python, '-c', script], cwd=outside, capture_output=True, text=True,
                           timeout=300, check=False)
    assert built.returncode == 0, built.stderr
    location, rows = built.stdout.split()[:2]
    assert location.startswith(str(env_dir)) and rows == str(len(ROWS))
    counted = subprocess.run([python, '-m', 'qhnet.params'], cwd=outside, capture_output=True,
                             text=True, timeout=300, check=False)
    assert counted.returncode == 0, counted.stderr
    assert '| Eq. (7) no ws, x6      |   13,010,980 |' in counted.stdout
    assert '| QLNet-50 (released)    |     100 |    9,531,940 |    9,531,940 |' in counted.stdout


def walk(schema, prefix=''):
    """(dotted key, Field) of every key of the schema."""
    for key, field in schema.items():
        if isinstance(field, dict):
            yield from walk(field, f'{prefix}{key}.')
        else:
            yield f'{prefix}{key}', field


def keys(config, prefix=''):
    found = set()
    for key in config.keys():
        if hasattr(config[key], 'keys'):
            found |= keys(config[key], f'{prefix}{key}.')
        else:
            found.add(f'{prefix}{key}')
    return found


@pytest.mark.parametrize('variant', [None, 'imagenet1k', 'fashion_mnist', 'digits'])
def test_every_key_of_every_variant_is_declared_in_the_schema(variant):
    """A variant that set a misspelt key would add it silently; the schema is the key list."""
    declared = {key for key, _ in walk(qhnet_config.SCHEMA)}
    for row in ALL_ROWS:
        assert keys(qhnet_config.row_config(row, variant)) == declared
    for key, field in walk(qhnet_config.SCHEMA):
        assert field.problem(field.default) is None, key
        assert field.help, key


@pytest.mark.parametrize('key', [key for key, field in walk(qhnet_config.SCHEMA)
                                 if field.kind in ('int', 'float') and not field.choices])
def test_every_number_is_checked_against_its_declared_range(key):
    field = dict(walk(qhnet_config.SCHEMA))[key]
    config = row_config('eq3_softball', 'digits')
    section, _, name = key.rpartition('.')
    target = config[section] if section else config
    bad = [math.inf, math.nan] + [True] * (field.kind == 'int')  # a float key casts True to 1.0
    if field.low > -math.inf:
        bad.append(field.low - 1)
    if field.high < math.inf:
        bad.append(field.high + 1)
    for value in bad:
        with target.ignore_type():
            target[name] = value
        with pytest.raises(qhnet_config.ConfigError, match=rf'config.{re.escape(key)} must be '):
            qhnet_config.validate(config)


@pytest.mark.parametrize('key', [key for key, field in walk(qhnet_config.MODEL)
                                 if field.choices])
def test_every_model_choice_of_the_schema_builds(key):
    """The schema lists the choices; the models implement exactly those."""
    for choice in qhnet_config.MODEL[key].choices:
        model_config = row_config('eq3_softball', 'digits').model
        model_config[key] = choice
        if key == 'name' and choice != 'qhnet':
            model_config.stem = 'small'
        models.build(model_config)
    with pytest.raises(qhnet_config.ConfigError, match=rf'config.model.{key} must be one of'):
        model_config[key] = 'no such choice' if isinstance(choice, str) else 99
        models.build(model_config)
