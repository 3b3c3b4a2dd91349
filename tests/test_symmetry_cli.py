"""`python -m qhnet.symmetry verify` on a real checkpoint: a QHNet trained for a few steps on
digits is transformed, written, read back and evaluated to the same accuracy; bad input is
refused with one line and no traceback."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from qhnet import checkpoints
from qhnet import config as qhnet_config
from qhnet import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def workdir(tmp_path_factory) -> str:
    """Eq. (3) softball@ds on digits, trained for 20 steps, with checkpoints at steps 10 and 20."""
    config = qhnet_config.row_config('eq3_softball', 'digits')
    config.num_train_steps = 20
    config.checkpoint.every_steps = 10
    config.optimizer.warmup_epochs = 0.2
    config.progress_bar = False
    path = str(tmp_path_factory.mktemp('digits'))
    train.train_and_evaluate(config, path)
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'qhnet.symmetry', *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=600,
                          env={**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'})


def test_verify_transforms_writes_and_reevaluates(workdir, tmp_path):
    output = str(tmp_path / 'transformed')
    result = run_cli('verify', f'--workdir={workdir}', f'--output_workdir={output}',
                     '--num_images=128')
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'full_group: max relative change of the logits' in result.stdout
    with open(os.path.join(output, 'symmetry.json')) as f:
        summary = json.load(f)
    for name in ('full_group', 'tied_group'):
        assert summary[name]['invariant'] and summary[name]['error'] <= summary[name]['tolerance']
        assert summary[name]['error'] < 1e-4
    original = summary['evaluation']['original']
    for name in ('transformed', 'full_group_form'):  # the Flax model; the full group's form
        transformed = summary['evaluation'][name]
        assert transformed['top1'] == original['top1'] and transformed['top5'] == original['top5']
        assert abs(transformed['loss'] - original['loss']) <= 1e-4 * abs(original['loss'])
    assert os.path.isdir(os.path.join(output, 'full_group_form'))
    _, config, variables = train.restore_variables(output)
    assert config.model.mixing
    # The head absorbed the last stream's random rotation: different weights, same function.
    *_, before = train.restore_variables(workdir)
    change = abs(variables['params']['head']['kernel'] - before['params']['head']['kernel']).max()
    assert change > 1e-2 * abs(before['params']['head']['kernel']).max()


def test_usage_errors(workdir):
    result = run_cli('check', f'--workdir={workdir}')
    assert result.returncode != 0 and 'usage: python -m qhnet.symmetry verify' in result.stderr


def saved_steps(workdir: str) -> list[int]:
    store = checkpoints.CheckpointStore(workdir, read_only=True)
    try:
        return store.steps()
    finally:
        store.close()


def copy_with_unreadable(workdir: str, destination: str, steps: list[int]) -> str:
    """A copy of `workdir` whose checkpoints at `steps` have their variables truncated."""
    shutil.copytree(workdir, destination)
    for step in steps:
        for root, _, names in os.walk(os.path.join(destination, 'checkpoints', str(step),
                                                   'variables')):
            for name in names:
                with open(os.path.join(root, name), 'r+b') as f:
                    f.truncate(os.path.getsize(f.name) // 2)
    return destination


def error_line(result: subprocess.CompletedProcess) -> str:
    """The command's one 'error: ' line, after checking that it failed without a traceback."""
    assert result.returncode != 0 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_reports_and_writes_the_step_it_restored(workdir, tmp_path):
    """The newest checkpoint (step 20) is unreadable: the one restored is step 10, and that is
    the step the summary reports and the transformed checkpoint is written at."""
    assert saved_steps(workdir)[:2] == [20, 10]
    broken = copy_with_unreadable(workdir, str(tmp_path / 'broken'), [20])
    output = str(tmp_path / 'transformed')
    result = run_cli('verify', f'--workdir={broken}', f'--output_workdir={output}',
                     '--num_images=64')
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(output, 'symmetry.json')) as f:
        assert json.load(f)['step'] == 10
    assert os.listdir(os.path.join(output, 'checkpoints')) == ['10']
    # The intact run restores step 20: the same output_workdir, holding step 10, is refused.
    line = error_line(run_cli('verify', f'--workdir={workdir}', f'--output_workdir={output}'))
    assert 'holds checkpoints of steps [10], not of step 20' in line


def test_non_finite_model_is_refused(workdir, tmp_path):
    """A checkpoint with a NaN kernel has no function to check: refused, not 'invariant'."""
    step, config, variables = train.restore_variables(workdir)
    variables = jax.tree_util.tree_map(np.array, variables)
    variables['params']['stage1_block1']['coef']['kernel'][0, 0, 0, :] = np.nan
    poisoned = str(tmp_path / 'poisoned')
    store = checkpoints.CheckpointStore(poisoned)
    store.save(step, variables, {'step': np.asarray(step)}, config)
    store.close()
    line = error_line(run_cli('verify', f'--workdir={poisoned}', '--num_images=64'))
    assert f'the logits of the checkpoint of step {step} on 64 test images are not finite' in line
    assert 'params/stage1_block1/coef/kernel' in line
    assert not os.path.exists(os.path.join(poisoned, 'transformed', 'symmetry.json'))


def unreadable_copy(workdir: str, tmp_path) -> str:
    return copy_with_unreadable(workdir, str(tmp_path / 'broken'), saved_steps(workdir))


def empty_dir(tmp_path) -> str:
    (tmp_path / 'empty').mkdir()
    return str(tmp_path / 'empty')


# case: (the flags, from the trained workdir and tmp_path; what the error line says). Where
# train.restore_variables refuses the workdir, the line is its message, which names the workdir.
BAD_INPUT = {
    'no workdir': (lambda w, tmp: [], '--workdir is missing or empty'),
    'empty workdir': (lambda w, tmp: ['--workdir='], '--workdir is missing or empty'),
    'not a directory': (lambda w, tmp: [f'--workdir={tmp / "nowhere"}'], 'is not a directory'),
    'no checkpoints': (lambda w, tmp: [f'--workdir={empty_dir(tmp)}'], '/empty', 'checkpoint'),
    'no readable checkpoint': (lambda w, tmp: [f'--workdir={unreadable_copy(w, tmp)}'],
                               '/broken', 'checkpoint'),
    'output is workdir': (lambda w, tmp: [f'--workdir={w}', f'--output_workdir={w}'],
                          '--output_workdir is --workdir'),
    'no images': (lambda w, tmp: [f'--workdir={w}', '--num_images=0'], 'pass --num_images=N'),
    'cond': (lambda w, tmp: [f'--workdir={w}', '--cond=1e6'], 'is outside [1, 10000]'),
}


@pytest.mark.parametrize('case', list(BAD_INPUT))
def test_bad_input_is_refused_with_one_line(workdir, tmp_path, case):
    flags, *says = BAD_INPUT[case]
    line = error_line(run_cli('verify', *flags(workdir, tmp_path)))
    assert all(part in line for part in says), line


# slice

def test_slice_writes_a_model_that_evaluates_and_fine_tunes(workdir, tmp_path):
    output = str(tmp_path / 'sliced')
    result = run_cli('slice', f'--workdir={workdir}', '--keep=0.5', '--calibration_images=128',
                     '--slice_stem',
                     f'--output_workdir={output}')
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'fine-tune it with' in result.stdout
    with open(os.path.join(output, 'slice.json')) as f:
        summary = json.load(f)
    assert summary['stream_widths'] == [8, 16] and summary['step'] == 20
    assert summary['finetune_base_lr'] == pytest.approx(
        0.1 * qhnet_config.get_config('digits').optimizer.base_lr)
    assert summary['params_after'] < summary['params_before']
    before = train.evaluate(*train.restore_variables(workdir)[1:])['top1']
    assert summary['top1_before'] == before and 0 <= summary['top1_after'] <= 1
    for stream in summary['streams']:
        assert stream['kept'] == stream['width'] // 2
        assert 0 < stream['explained_variance'] <= 1
        assert 0 < stream['flops_after'] < stream['flops_before']
    _, config, _ = train.restore_variables(output)
    assert tuple(config.model.stream_widths) == (8, 16) and config.model.mixing
    finetune = subprocess.run(
        [sys.executable, '-m', 'qhnet.main', f'--config={output}/config.py',
         f'--workdir={output}/finetune', '--config.num_train_steps=10',
         '--config.checkpoint.every_steps=10', '--config.progress_bar=False'],
        cwd=ROOT, text=True, capture_output=True, timeout=600,
        env={**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'})
    assert finetune.returncode == 0, finetune.stderr[-3000:]
    assert f'Variables from step 20 of {output} (config.init_from)' in finetune.stderr
    with open(os.path.join(output, 'finetune', 'summary.json')) as f:
        tuned = json.load(f)
    assert tuned['steps'] == 10 and tuned['model']['stream_widths'] == [8, 16]
    assert 0 <= tuned['test_top1'] <= 1


def test_slice_keep_one_evaluates_the_same(workdir, tmp_path):
    output = str(tmp_path / 'whole')
    result = run_cli('slice', f'--workdir={workdir}', '--keep=1', '--calibration_images=64',
                     f'--output_workdir={output}')
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(output, 'slice.json')) as f:
        summary = json.load(f)
    assert summary['top1_after'] == summary['top1_before']
    assert [s['explained_variance'] for s in summary['streams']] == pytest.approx([1.0, 1.0])


@pytest.mark.parametrize('flag,message', [
    ('--keep=0', r'--keep=0 is the fraction of each stream to keep; pass a number in \(0, 1\]'),
    ('--calibration_images=0', 'slicing needs training images'),
    ('--method=pca', 'value should be one of'),
])
def test_slice_bad_input_is_refused(workdir, tmp_path, flag, message):
    result = run_cli('slice', f'--workdir={workdir}', flag,
                     f'--output_workdir={tmp_path / "out"}')
    assert result.returncode != 0
    assert re.search(message, result.stderr), result.stderr[-2000:]
    assert not os.path.exists(tmp_path / 'out' / 'slice.json')


def test_init_from_a_workdir_without_checkpoints_is_refused(tmp_path):
    config = qhnet_config.row_config('eq3_softball', 'digits')
    config.init_from = str(tmp_path / 'nothing')
    with pytest.raises(train.ConfigError, match='init_from=.* holds no checkpoints'):
        train.validate_config(config)


def test_init_from_another_model_is_refused(workdir, tmp_path):
    config = qhnet_config.row_config('eq3_softball', 'digits')
    config.model.widths = (16, 64)
    config.init_from = workdir
    config.progress_bar = False
    with pytest.raises(train.ConfigError, match=r'holds variables of another model'):
        train.train_and_evaluate(config, str(tmp_path / 'run'))
