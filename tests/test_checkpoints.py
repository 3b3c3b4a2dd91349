"""Checkpoint integrity beyond a flipped byte (tests/test_training.py): a workdir whose digests
were deleted holds checkpoints that cannot be verified, and they are refused unless the user
says to trust them."""

import logging
import os
import shutil

import jax
import numpy as np
import pytest

from qhnet import training
from qhnet.training import checkpoints
from tests.test_main import DIGITS, assert_one_line_error, run_main
from tests.test_training import TOTAL_STEPS, flip_bytes, snapshot, tiny_config


@pytest.fixture(scope='module')
def finished(tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp('finished') / 'workdir')
    training.train_and_evaluate(tiny_config(), workdir)
    return workdir


@pytest.fixture
def undigested(finished, tmp_path) -> str:
    """A copy of the finished run with a flipped byte in its newest checkpoint and its
    `checkpoint_digests/` deleted: nothing says that the bytes changed."""
    workdir = str(tmp_path / 'workdir')
    shutil.copytree(finished, workdir)
    flip_bytes(os.path.join(workdir, checkpoints.CHECKPOINT_DIR, str(TOTAL_STEPS)))
    shutil.rmtree(os.path.join(workdir, checkpoints.DIGEST_DIR))
    return workdir


def test_checkpoints_without_digests_are_refused_and_left_alone(undigested):
    before = snapshot(undigested)
    with pytest.raises(checkpoints.CheckpointRestoreError,
                       match=r'have no content digests .* so their bytes cannot be verified; '
                             r'nothing was changed\. If you trust them'):
        training.restore_variables(undigested)
    with pytest.raises(checkpoints.CheckpointRestoreError, match='trust_unverified=True'):
        training.train_and_evaluate(tiny_config(), undigested)
    assert snapshot(undigested) == before


def test_trusting_unverified_checkpoints_restores_them_with_a_warning(finished, tmp_path,
                                                                     caplog):
    workdir = str(tmp_path / 'workdir')
    shutil.copytree(finished, workdir)
    shutil.rmtree(os.path.join(workdir, checkpoints.DIGEST_DIR))
    with caplog.at_level(logging.WARNING):
        step, _, variables = training.restore_variables(workdir, trust_unverified=True)
    assert step == TOTAL_STEPS
    assert f'checkpoint at step {TOTAL_STEPS} has no content digest; restored unverified' in (
        caplog.text)
    *_, clean = training.restore_variables(finished)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(clean)):
        np.testing.assert_array_equal(a, b)


def test_the_command_line_names_the_flag(undigested):
    result = run_main(DIGITS, f'--workdir={undigested}', '--config.model.widths=(8,16)',
                      '--config.model.depths=(1,1)', '--config.batch_size=32',
                      f'--config.num_train_steps={TOTAL_STEPS}',
                      '--config.optimizer.warmup_epochs=0.1', '--config.progress_bar=False')
    assert_one_line_error(result, 'cannot be verified', '--config.checkpoint.trust_unverified')
