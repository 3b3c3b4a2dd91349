"""`python -m qhnet.symmetry verify` on a real checkpoint: a QHNet trained for a few steps on
digits is transformed, written, read back and evaluated to the same accuracy."""

import json
import os
import subprocess
import sys

import pytest

from qhnet import config as qhnet_config
from qhnet import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def workdir(tmp_path_factory) -> str:
    """Eq. (3) softball@ds on digits, trained for 20 steps."""
    config = qhnet_config.row_config('eq3_softball', 'digits')
    config.num_train_steps = 20
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
    config, variables = train.restore_variables(output)
    assert config.model.mixing
    # The head absorbed the last stream's random rotation: different weights, same function.
    _, before = train.restore_variables(workdir)
    change = abs(variables['params']['head']['kernel'] - before['params']['head']['kernel']).max()
    assert change > 1e-2 * abs(before['params']['head']['kernel']).max()


def test_usage_errors(workdir):
    result = run_cli('check', f'--workdir={workdir}')
    assert result.returncode != 0 and 'usage: python -m qhnet.symmetry verify' in result.stderr
