"""The workdir of a run: one run at a time (a lock), the files a run keeps there of the right
kinds and writable before anything starts, and a resume onto other data refused."""

import json
import os
import shutil

import pytest

from qhnet import training
from qhnet.training import checkpoints, metrics, workdirs
from tests.conftest import grayscale_imagefolder
from tests.test_main import DIGITS, assert_one_line_error, run_main
from tests.test_training import snapshot, tiny_config


def test_a_second_run_in_a_locked_workdir_is_refused_naming_the_holder(tmp_path):
    workdir = str(tmp_path / 'workdir')
    os.makedirs(workdir)
    with workdirs.locked(workdir):  # a run of this process holds the workdir
        before = snapshot(workdir)
        with pytest.raises(workdirs.WorkdirLockedError, match=f'process {os.getpid()} on '):
            training.train_and_evaluate(tiny_config(), workdir)
        assert snapshot(workdir) == before
        result = run_main(DIGITS, f'--workdir={workdir}', '--config.progress_bar=False')
        assert_one_line_error(result, 'another run is training in', f'process {os.getpid()}')
        assert snapshot(workdir) == before


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
    """A run killed with -9 leaves its lock file, but not the lock (it dies with the
    process): the next run takes it over, and leaves the file empty when it ends."""
    (tmp_path / workdirs.LOCK_FILE).write_text(json.dumps(
        {'pid': 999999, 'host': 'elsewhere', 'since': '2026-01-01T00:00:00'}))
    with caplog.at_level('INFO', logger='absl'):
        with workdirs.locked(str(tmp_path)):
            held = json.loads((tmp_path / workdirs.LOCK_FILE).read_text())
    assert held['pid'] == os.getpid()
    assert 'Took over the lock of a run that ended without releasing it (process 999999' in (
        caplog.text)
    assert (tmp_path / workdirs.LOCK_FILE).read_text() == ''


def test_a_workdir_entry_of_the_wrong_kind_is_one_line_before_anything(tmp_path):
    for name, make in (('checkpoints', lambda path: open(path, 'w').close()),
                       ('tensorboard', lambda path: open(path, 'w').close())):
        workdir = tmp_path / name
        workdir.mkdir()
        make(str(workdir / name))
        with pytest.raises(workdirs.WorkdirError, match=f'{name} should be a directory'):
            training.train_and_evaluate(tiny_config(), str(workdir))
        assert sorted(os.listdir(workdir)) == [name]
    workdir = tmp_path / 'workdir'
    os.makedirs(workdir / 'metrics.jsonl')
    result = run_main(DIGITS, f'--workdir={workdir}')
    assert_one_line_error(result, 'metrics.jsonl should be a file', 'Move it out of the way')
    assert sorted(os.listdir(workdir)) == ['metrics.jsonl']


def test_read_only_checkpoints_are_refused_at_the_start(tmp_path, read_only_mount):
    """A resume whose checkpoints/ is read-only would fail at its first save, an epoch later."""
    workdir = tmp_path / 'workdir'
    read_only_mount(workdir / checkpoints.CHECKPOINT_DIR)
    with pytest.raises(workdirs.WorkdirError, match='checkpoints is not writable'):
        workdirs.prepare_workdir(str(workdir))


def imagefolder_config(data_dir):
    config = tiny_config(**{'data.name': 'imagefolder', 'data.image_size': 8,
                            'data.data_dir': str(data_dir), 'batch_size': 8,
                            'eval_batch_size': 20, 'num_train_steps': 4,
                            'optimizer.warmup_epochs': 0.0})
    return config


def test_a_resume_onto_other_data_is_refused(tmp_path):
    """The same class names and counts, but classes 0 and 2 swapped: the file names listed
    under each class differ, and so does the dataset's fingerprint."""
    root, _ = grayscale_imagefolder(tmp_path / 'data')
    workdir = str(tmp_path / 'workdir')
    training.train_and_evaluate(imagefolder_config(root), workdir)
    swapped = tmp_path / 'swapped'
    shutil.copytree(root, swapped)
    for split in ('train', 'val'):
        os.rename(swapped / split / 'class_0', swapped / split / 'tmp')
        os.rename(swapped / split / 'class_2', swapped / split / 'class_0')
        os.rename(swapped / split / 'tmp', swapped / split / 'class_2')
    before = snapshot(workdir)
    with pytest.raises(training.IncompatibleWorkdirError,
                       match=r"dataset.train.files: checkpoint has '[0-9a-f]{64}', config has "):
        training.train_and_evaluate(imagefolder_config(swapped), workdir)
    assert snapshot(workdir) == before
    # The same files elsewhere are the same data: the run is simply found finished.
    moved = tmp_path / 'moved'
    shutil.copytree(root, moved)
    assert training.train_and_evaluate(imagefolder_config(moved), workdir)['steps'] == 4
    assert [row['step'] for row in metrics.read_metrics(workdir)['test']][-1] == 4
