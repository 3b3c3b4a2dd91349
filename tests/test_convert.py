"""qhnet.convert: the authors' QLNet into the 'qlnet' model, strictness, and the command line.

The fast tests need no torch. fixtures/qlnet_small.npz is a reduced QLNet's state_dict, built
and randomised from the authors' own code, and fixtures/qlnet_small_logits.npz its logits on
`authors_qlnet.photos()` as their code computes them (tests/authors_qlnet.py writes both);
fixtures/state_shapes.json holds the shapes of the full QLNet's state_dict at 1000 classes.
The slow tests run the authors' code itself, where torch, timm and their resnet.py
(QHNET_AUTHORS_RESNET) are at hand.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from qhnet import config, convert, models, params, symmetry
from qhnet.convert import core
from qhnet.convert.__main__ import run
from qhnet.training import checkpoints
from tests import authors_qlnet

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
SMALL = os.path.join(FIXTURES, 'qlnet_small.npz')
with open(os.path.join(FIXTURES, 'state_shapes.json'), encoding='utf-8') as file:
    QLNET50_SHAPES = json.load(file)['qlnet50']


def small_config(variant='imagenet1k'):
    cfg = config.row_config('qlnet50', variant)
    cfg.model.update(widths=authors_qlnet.SMALL['widths'], depths=authors_qlnet.SMALL['depths'],
                     num_classes=authors_qlnet.SMALL['num_classes'])
    return cfg


def small_state():
    with np.load(SMALL) as archive:
        return {key: archive[key] for key in archive.files}


def logits(model, variables, images):
    return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)


def relative_difference(ours, theirs):
    return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


@pytest.fixture(scope='module')
def photos():
    return authors_qlnet.photos()


def test_small_qlnet_equals_the_authors_logits(photos):
    cfg = small_config().model
    model = models.build(cfg)
    with np.load(os.path.join(FIXTURES, 'qlnet_small_logits.npz')) as expected:
        float32, float64 = expected['float32'], expected['float64']
    ours = logits(model, convert.to_variables('qlnet50', small_state(), cfg), photos)
    assert relative_difference(ours, float32) <= 1e-5
    np.testing.assert_array_equal(np.argmax(ours, -1), np.argmax(float32, -1))
    with jax.enable_x64(True):
        variables = convert.to_variables('qlnet50', small_state(), cfg, dtype=np.float64)
        ours = logits(model.clone(dtype=np.float64), variables, photos.astype(np.float64))
        assert ours.dtype == np.float64
        assert relative_difference(ours, float64) <= 1e-10


def test_full_qlnet50_state_dict_fills_the_model():
    """Every tensor of the authors' resnet50 at 1000 classes (its shapes as PyTorch has them)
    fills exactly the variables of configs/qlnet50.py:imagenet1k."""
    cfg = config.row_config('qlnet50', 'imagenet1k').model
    state = {key: np.zeros(shape, np.float32) for key, shape in QLNET50_SHAPES.items()}
    variables = convert.to_variables('qlnet50', state, cfg)
    shapes = jax.tree.map(lambda leaf: tuple(leaf.shape), core.template(models.build(cfg)))
    assert jax.tree.map(np.shape, variables) == shapes
    parameters = sum(np.size(x) for x in jax.tree.leaves(variables['params']))
    assert parameters == 9_993_640  # PyTorch's count of their resnet50(num_classes=1000)


@pytest.mark.parametrize('change, message', [
    (lambda s: s.pop('layer2.1.bn2.running_var'), r'lacks 1 tensor.*layer2\.1\.bn2\.running_var'),
    (lambda s: s.update({'layer2.0.downsample.0.weight': np.ones((16, 8, 1, 1))}),
     r'has 1 tensor.*layer2\.0\.downsample\.0\.weight'),
    (lambda s: s.update({'layer3.0.conv2.weight': np.ones((128, 1, 5, 5))}),
     r'layer3\.0\.conv2\.weight \(128, 1, 5, 5\) -> params/stage3_block1/derivative/kernel '
     r'\(3, 3, 1, 128\)'),
    (lambda s: s.update({'fc.bias': np.full(10, np.nan)}), r'head/bias holds non-finite'),
])
def test_a_state_dict_that_does_not_fit_is_refused_naming_the_tensors(change, message):
    state = small_state()
    change(state)
    with pytest.raises(convert.ConversionError, match=message):
        convert.to_variables('qlnet50', state, small_config().model)


def test_command_writes_a_checkpoint_that_restores_to_the_same_function(tmp_path, photos):
    photos = photos[:2, :64, :64]
    cfg = small_config()
    summary = run('qlnet50', SMALL, str(tmp_path / 'qlnet'), cfg)
    assert summary['tensors'] == len(small_state())
    restored = checkpoints.restore_variables(str(tmp_path / 'qlnet'))
    assert restored.step == 0 and restored.config.model.to_dict() == cfg.model.to_dict()
    model = models.build(cfg.model)
    expected = logits(model, convert.to_variables('qlnet50', small_state(), cfg.model), photos)
    np.testing.assert_array_equal(
        logits(models.build(restored.config.model), restored.variables, photos), expected)
    # The symmetry toolkit takes it as any checkpoint.
    spec = symmetry.group_spec(restored)
    form = symmetry.fold(spec, restored)
    element = symmetry.sample(spec, jax.random.key(0))
    assert symmetry.verify(spec, form, element, photos)['invariant']
    with pytest.raises(convert.ConversionError, match='already holds checkpoints'):
        run('qlnet50', SMALL, str(tmp_path / 'qlnet'), cfg)


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    out = str(tmp_path / 'out')
    with pytest.raises(convert.ConversionError, match=r"unknown --source='qlnet101'; valid"):
        run('qlnet101', SMALL, out)
    # Another architecture: the QLNet file read as torchvision's resnet50.
    with pytest.raises(convert.ConversionError, match=r'not a resnet50 .* lacks \d+ tensor'):
        run('resnet50', SMALL, out)
    truncated = tmp_path / 'truncated.npz'
    truncated.write_bytes(open(SMALL, 'rb').read()[:50_000])
    with pytest.raises(convert.ConversionError, match='not a readable .npz .*truncated'):
        run('qlnet50', str(truncated), out, small_config())
    empty = tmp_path / 'empty.npz'
    np.savez(empty)
    with pytest.raises(convert.ConversionError, match='holds no state_dict'):
        run('qlnet50', str(empty), out, small_config())
    with pytest.raises(convert.ConversionError, match="model.stem is 'small_stride2'"):
        run('qlnet50', SMALL, out, config.row_config('qlnet50', 'fashion_mnist'))
    with pytest.raises(convert.ConversionError, match="fills a 'qlnet' model, but the config "
                                                      "describes a 'resnet50'"):
        run('qlnet50', SMALL, out, config.row_config('resnet50', 'imagenet1k'))
    assert not os.path.exists(out)


def test_command_line_errors_are_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, '-m', 'qhnet.convert', '--source=qlnet50', f'--weights={SMALL}',
         f'--workdir={tmp_path / "out"}'], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        result.stderr.strip().splitlines()[-1]] and 'error: this state_dict is not a qlnet50 ' \
        'of this configuration' in result.stderr
    assert not os.path.exists(tmp_path / 'out')


# Against the authors' code (torch, timm and their resnet.py).

def authors_code():
    pytest.importorskip('torch')
    pytest.importorskip('timm')
    if not os.path.isfile(os.environ.get('QHNET_AUTHORS_RESNET', '')):
        pytest.skip('QHNET_AUTHORS_RESNET does not name the authors\' resnet.py')


@pytest.mark.slow
def test_qlnet50_equals_the_authors_model(photos):
    """Their resnet50 (random weights and BN statistics) and ours, on 224x224 photos."""
    authors_code()
    cfg = config.row_config('qlnet50', 'imagenet1k').model
    theirs = authors_qlnet.qlnet50(num_classes=1000)
    state = authors_qlnet.state(theirs)
    model = models.build(cfg)
    expected = authors_qlnet.logits(theirs, photos)
    ours = logits(model, convert.to_variables('qlnet50', state, cfg), photos)
    assert relative_difference(ours, expected) <= 1e-5
    np.testing.assert_array_equal(np.argmax(ours, -1), np.argmax(expected, -1))
    expected = authors_qlnet.logits(theirs, photos, 'float64')
    with jax.enable_x64(True):
        variables = convert.to_variables('qlnet50', state, cfg, dtype=np.float64)
        ours = logits(model.clone(dtype=np.float64), variables, photos.astype(np.float64))
        assert relative_difference(ours, expected) <= 1e-10


@pytest.mark.slow
@pytest.mark.parametrize('classes', [100, 1000])
def test_parameter_counts_are_pytorchs(classes):
    authors_code()
    theirs = sum(p.numel() for p in authors_qlnet.qlnet50(num_classes=classes).parameters())
    assert theirs == params.PYTORCH_PARAMS['qlnet50', classes]
    model_config = config.row_config('qlnet50').model
    model_config.num_classes = classes
    assert params.count_params(models.build(model_config)) == theirs


@pytest.mark.slow
def test_pytorch_files_that_are_not_a_qlnet_state_dict_are_refused(tmp_path):
    authors_code()
    import torch  # pylint: disable=import-outside-toplevel
    model = authors_qlnet.small_qlnet()
    good = tmp_path / 'qlnet.pth.tar'
    torch.save({'state_dict': model.state_dict(), 'epoch': 3}, good)
    assert run('qlnet50', str(good), str(tmp_path / 'ok'), small_config())['tensors'] == 116
    truncated = tmp_path / 'truncated.pth.tar'
    truncated.write_bytes(good.read_bytes()[:40_000])
    no_state = tmp_path / 'no_state.pth.tar'
    torch.save({'model': 'qlnet', 'epoch': 3}, no_state)
    for path, message in ((truncated, 'not a readable PyTorch checkpoint'),
                          (no_state, "holds no state_dict .* it holds \\['model', 'epoch'\\]"),
                          (tmp_path / 'missing.pth', 'does not exist')):
        with pytest.raises(convert.ConversionError, match=message):
            run('qlnet50', str(path), str(tmp_path / 'out'), small_config())
    assert not os.path.exists(tmp_path / 'out')
    shutil.rmtree(tmp_path / 'ok')
