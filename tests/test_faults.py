"""Faults injected end to end through `python -m qhnet.main` on the digits model: kill -9 at
random moments, bytes flipped in a checkpoint, a full disk. Each run ends with finite weights
that a clean run would have, or with a one-line error that leaves the checkpoints intact."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from qhnet import config as qhnet_config
from qhnet import training
from qhnet.training import checkpoints, integrity, metrics
from tests.test_main import assert_one_line_error
from tests.test_training import flip_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 3 epochs of 23 steps; checkpoints at steps 0, 23, 46 and 69, all kept.
ARGS = ('--config=configs/eq3_softball.py:digits', '--config.num_epochs=3',
        '--config.checkpoint.max_to_keep=10', '--config.progress_bar=False')


def command(workdir) -> list[str]:
    return [sys.executable, '-m', 'qhnet.main', *ARGS, f'--workdir={workdir}']


def run(workdir) -> subprocess.CompletedProcess:
    return subprocess.run(command(workdir), cwd=ROOT, text=True, capture_output=True,
                          timeout=300, check=False)


def final_variables(workdir):
    step, _, variables = training.restore_variables(str(workdir))
    assert step == 69
    return variables


def assert_identical(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope='module')
def clean_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp('clean') / 'workdir'
    result = run(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.mark.slow  # about 2 minutes on 2 cores; test_training.py kills and resumes in the fast suite
def test_kill_9_at_random_moments_resumes_to_identical_parameters(clean_run, tmp_path):
    """Three trials: kill -9 a random 0-1.5 s after training starts (the step-0 checkpoint
    is on disk), then run the same command again to the end."""
    expected = final_variables(clean_run)
    delays = np.random.default_rng(0).uniform(0.0, 1.5, size=3)
    killed = 0
    for trial, delay in enumerate(delays):
        workdir = tmp_path / f'trial{trial}'
        process = subprocess.Popen(command(workdir), cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not (workdir / 'metrics.jsonl').exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        killed += process.wait() == -signal.SIGKILL
        result = run(workdir)
        assert result.returncode == 0, result.stderr[-3000:]
        assert_identical(final_variables(workdir), expected)
        # Every epoch's evaluation is on record, whatever the kill interrupted.
        assert [row['step'] for row in metrics.read_metrics(str(workdir))['test']] == [23, 46, 69]
    assert killed >= 2  # most trials were stopped mid-run, not after the end


def test_flipped_bytes_in_the_newest_checkpoint_fall_back_to_an_older_step(clean_run, tmp_path):
    workdir = tmp_path / 'workdir'
    shutil.copytree(clean_run, workdir)
    # Pretend the run stopped after step 46 with a corrupt step 46.
    shutil.rmtree(workdir / 'checkpoints' / '69')
    os.remove(workdir / 'summary.json')
    flip_bytes(str(workdir / 'checkpoints' / '46'))
    result = run(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'checkpoint at step 46 is corrupt (content digest mismatch' in result.stderr
    assert os.listdir(workdir / checkpoints.CORRUPT_DIR) == ['46']
    variables = final_variables(workdir)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(variables))
    assert_identical(variables, final_variables(clean_run))


@pytest.fixture
def small_disk(tmp_path):
    """A 1.5 MB tmpfs: room for about six of the digits model's checkpoints."""
    mount_point = tmp_path / 'disk'
    mount_point.mkdir()
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1500k', 'tmpfs',
                              str(mount_point)], capture_output=True, check=False)
    if mounted.returncode:
        pytest.skip(f'cannot mount a tmpfs here: {mounted.stderr.decode().strip()}')
    yield mount_point
    subprocess.run(['umount', str(mount_point)], check=False)


@pytest.mark.slow  # about 25 s: trains until a small mounted disk is full
def test_full_disk_gives_one_line_and_keeps_the_checkpoints(small_disk):
    workdir = small_disk / 'workdir'
    ten_epochs = [arg.replace('num_epochs=3', 'num_epochs=10') for arg in command(workdir)]
    result = subprocess.run(ten_epochs, cwd=ROOT, text=True, capture_output=True, timeout=300,
                            check=False)
    assert_one_line_error(result, 'could not write the checkpoint of step', 'the disk is full',
                          'intact')
    store = checkpoints.CheckpointStore(str(workdir), read_only=True)
    steps = store.steps()
    store.close()
    assert len(steps) >= 2 and steps[-1] == 0
    step, _, variables = training.restore_variables(str(workdir))
    assert step == steps[0]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(variables))
    # With room again, the same command resumes from the newest checkpoint and finishes.
    subprocess.run(['mount', '-o', 'remount,size=8m', str(small_disk)], check=True)
    result = subprocess.run(ten_epochs, cwd=ROOT, text=True, capture_output=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'resumed from the checkpoint at step {steps[0]}' in result.stderr


def test_a_failing_writer_keeps_the_earlier_checkpoints(tmp_path, monkeypatch):
    """The same without a mount: orbax's save of step 46 fails with ENOSPC."""
    save = ocp.CheckpointManager.save

    def failing_save(manager, step, *args, **kwargs):
        if step == 46:
            raise OSError(errno.ENOSPC, 'No space left on device')
        return save(manager, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, 'save', failing_save)
    config = qhnet_config.row_config('eq3_softball', 'digits')
    config.num_epochs, config.progress_bar = 3, False
    workdir = str(tmp_path / 'workdir')
    with pytest.raises(checkpoints.CheckpointWriteError,
                       match=r'step 46 .*: the disk is full\. The checkpoints already there '
                             r'\(23, 0\) are intact'):
        training.train_and_evaluate(config, workdir)
    step, _, variables = training.restore_variables(workdir)
    assert step == 23
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(variables))


def test_a_save_whose_digest_cannot_be_written_is_removed(tmp_path, monkeypatch):
    """The disk fills after orbax has finished step 46 but before its digest is written:
    the unverified step 46 is removed with the partial digest, and step 23 is the newest."""
    digests = integrity.file_digests

    def failing_digests(step_dir):
        if os.path.basename(step_dir) == '46':
            raise OSError(errno.ENOSPC, 'No space left on device')
        return digests(step_dir)

    monkeypatch.setattr(integrity, 'file_digests', failing_digests)
    config = qhnet_config.row_config('eq3_softball', 'digits')
    config.num_epochs, config.progress_bar = 3, False
    workdir = tmp_path / 'workdir'
    with pytest.raises(checkpoints.CheckpointWriteError,
                       match=r'step 46 .*: the disk is full\. The checkpoints already there '
                             r'\(23, 0\) are intact'):
        training.train_and_evaluate(config, str(workdir))
    assert sorted(os.listdir(workdir / checkpoints.CHECKPOINT_DIR)) == ['0', '23']
    assert sorted(os.listdir(workdir / checkpoints.DIGEST_DIR)) == ['0.json', '23.json']
    step, _, _ = training.restore_variables(str(workdir))
    assert step == 23
