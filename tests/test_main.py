"""`python -m qhnet.main` reports bad input in one line that names the problem and the fix:
no traceback, a non-zero exit, and nothing written."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.conftest import environment_without_compilation_cache, grayscale_imagefolder
from qhnet import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = '--config=configs/eq3_softball.py:digits'


def run_main(*args: str, cwd: str = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'qhnet.main', *args], cwd=cwd, text=True,
                          capture_output=True, timeout=300, check=False,
                          env=None if env is None else {**os.environ, **env})


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """stderr without absl's log lines (they start with I, W or E and a date)."""
    return [line for line in result.stderr.splitlines()
            if line.strip() and not (line[0] in 'IWE' and line[1:5].isdigit())]


def assert_one_line_error(result, *fragments: str) -> None:
    lines = error_lines(result)
    assert result.returncode != 0 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize('args,fragments', [
    (['--config.batch_sise=64'], ["unknown key 'batch_sise'", 'Did you mean "batch_size"']),
    (['--config.model.widths=(8.5,16)'], ['config.model.widths must be a non-empty sequence of '
                                          'positive integers, got (8.5, 16)']),
    (['--config.model.placement=everywhere'], ["config.model.placement must be one of ['ds', "
                                               "'all'], got 'everywhere'"]),
])
def test_bad_config_values(tmp_path, args, fragments):
    workdir = tmp_path / 'workdir'
    result = run_main(DIGITS, f'--workdir={workdir}', *args)
    assert_one_line_error(result, *fragments)
    assert not workdir.exists()


def test_missing_or_broken_config_file(tmp_path):
    workdir = tmp_path / 'workdir'
    missing = run_main('--config=configs/no_such_row.py', f'--workdir={workdir}')
    assert_one_line_error(missing, 'configs/no_such_row.py', 'No such file or directory')
    broken = tmp_path / 'broken.py'
    broken.write_text('def get_config(:\n')
    result = run_main(f'--config={broken}', f'--workdir={workdir}')
    assert_one_line_error(result, 'invalid syntax')
    variant = run_main('--config=configs/eq3_softball.py:cifar10', f'--workdir={workdir}')
    assert_one_line_error(variant, "unknown config argument 'cifar10'", "'fashion_mnist'")
    prose = tmp_path / 'prose.py'
    prose.write_text('hi\n')  # runs, and fails with a NameError
    assert_one_line_error(run_main(f'--config={prose}', f'--workdir={workdir}'),
                          "bad --config", "name 'hi' is not defined")
    assert not workdir.exists()


@pytest.mark.parametrize('args,fragments', [
    (['--config.optimizer.warmup_epochs=inf', '--config.seed=1180591620717411303424'],
     ['config.seed must be an integer in [0, 4294967295], got 1180591620717411303424']),
    (['--multihost'], ["--multihost could not start JAX's distributed runtime",
                       '--coordinator_address=HOST:PORT']),
])
def test_values_and_flags_that_fail_later_fail_first_in_one_line(tmp_path, args, fragments):
    """The config's values are checked against the schema (tests/test_configs.py tries every
    number's range, inf and NaN) before anything starts; so is --multihost's coordinator."""
    workdir = tmp_path / 'workdir'
    result = run_main(DIGITS, f'--workdir={workdir}', *args)
    assert_one_line_error(result, *fragments)
    assert not workdir.exists()


def test_unusable_workdir(tmp_path):
    a_file = tmp_path / 'a_file'
    a_file.write_text('keep me')
    assert_one_line_error(run_main(DIGITS, f'--workdir={a_file}'), 'is a file, not a directory')
    assert a_file.read_text() == 'keep me'
    assert_one_line_error(run_main(DIGITS, '--workdir=/proc/qhnet_workdir'),
                          'cannot write to --workdir=/proc/qhnet_workdir', 'pick a writable')


def test_workdir_without_a_readable_checkpoint(tmp_path):
    """A checkpoints folder whose only step is junk (and has no digest): nothing is moved or
    deleted."""
    step = tmp_path / 'workdir' / 'checkpoints' / '5'
    step.mkdir(parents=True)
    (step / 'junk').write_text('not a checkpoint')
    result = run_main(DIGITS, f'--workdir={tmp_path / "workdir"}')
    assert_one_line_error(result, 'cannot be verified', 'nothing was changed')
    trusted = run_main(DIGITS, f'--workdir={tmp_path / "workdir"}',
                       '--config.checkpoint.trust_unverified=True')
    assert_one_line_error(trusted, 'none of the checkpoints', 'nothing was changed there')
    assert (step / 'junk').read_text() == 'not a checkpoint'


def test_two_processes_train_like_one(tmp_path):
    """--multihost with two processes on this machine (one CPU device each, gloo collectives):
    both finish, and the parameters match a one-process run on two devices."""
    with socket.socket() as probe:
        probe.bind(('localhost', 0))
        port = probe.getsockname()[1]
    args = [DIGITS, '--config.num_epochs=2', '--config.progress_bar=False']
    workdir = tmp_path / 'two'
    # Without the tests' compilation cache: shared by the two processes, it once left their
    # first collective (orbax's sync_global_devices) disagreeing. Each compiles its own.
    env = environment_without_compilation_cache()
    processes = [subprocess.Popen(
        [sys.executable, '-m', 'qhnet.main', *args, f'--workdir={workdir}', '--multihost',
         f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={i}'],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in (0, 1)]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
        assert 'JAX process' in stderr and '2 global cpu devices' in stderr
    single = run_main(*args, f'--workdir={tmp_path / "one"}',
                      env={'XLA_FLAGS': '--xla_force_host_platform_device_count=2'})
    assert single.returncode == 0, single.stderr[-3000:]
    summaries = [json.loads((tmp_path / name / 'summary.json').read_text()) for name in ('two', 'one')]
    assert summaries[0]['devices'] == summaries[1]['devices'] == 2
    assert summaries[0]['test_top1'] == summaries[1]['test_top1']
    two, one = (training.restore_variables(str(tmp_path / name)).variables for name in ('two', 'one'))
    for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(one)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # about 20 s: trains on an image folder through the command line
def test_grayscale_imagefolder_trains_and_evaluates(tmp_path):
    """The fashion_mnist variant of the main model, on a folder of real grayscale PNGs."""
    root, _ = grayscale_imagefolder(tmp_path / 'pngs', per_class=7)
    workdir = tmp_path / 'workdir'
    result = run_main('--config=configs/eq3_softball.py:fashion_mnist',
                      '--config.data.name=imagefolder', f'--config.data.data_dir={root}',
                      f'--workdir={workdir}', '--config.num_epochs=2',
                      '--config.progress_bar=False')
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((workdir / training.SUMMARY_FILE).read_text())
    assert summary['dataset'] == 'imagefolder' and summary['steps'] == 2
    assert 0 <= summary['test_top1'] <= 1 and np.isfinite(summary['test_loss'])
    wrong = run_main('--config=configs/eq3_softball.py:fashion_mnist',
                     '--config.data.name=imagefolder', f'--config.data.data_dir={root}',
                     f'--workdir={tmp_path / "other"}', '--config.model.num_classes=12')
    assert_one_line_error(wrong, 'config.model.num_classes=12', '10 class folders under',
                          '--config.model.num_classes=10')


def test_corrupt_training_image_is_one_line_naming_it(tmp_path):
    """Found by a grain worker process mid-training: the run stops with the file's name."""
    root, written = grayscale_imagefolder(tmp_path / 'pngs', per_class=7)
    corrupt = written['train'][-1][0]
    corrupt.write_bytes(corrupt.read_bytes()[:60])  # the header survives, the pixels do not
    result = run_main('--config=configs/eq3_softball.py:fashion_mnist',
                      '--config.data.name=imagefolder', f'--config.data.data_dir={root}',
                      f'--workdir={tmp_path / "workdir"}', '--config.data.num_workers=2',
                      '--config.progress_bar=False')
    assert_one_line_error(result, f'cannot decode image {corrupt}', 'Replace or delete the file')


@pytest.fixture(scope='module')
def trained_digits(tmp_path_factory):
    """The workdir of a 4-step run of the main model's digits variant."""
    workdir = tmp_path_factory.mktemp('trained') / 'workdir'
    result = run_main(DIGITS, f'--workdir={workdir}', '--config.num_train_steps=4',
                      '--config.optimizer.warmup_epochs=0.05', '--config.progress_bar=False')
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def files_under(directory) -> dict[str, int]:
    """Every file under `directory`, with its modification time."""
    return {os.path.relpath(os.path.join(root, name), directory):
            os.stat(os.path.join(root, name)).st_mtime_ns
            for root, _, names in os.walk(directory) for name in names}


def test_evaluate_only_scores_the_newest_checkpoint_and_writes_nothing_else(trained_digits):
    before = files_under(trained_digits)
    result = run_main(DIGITS, f'--workdir={trained_digits}', '--evaluate_only')
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((trained_digits / training.EVALUATION_FILE).read_text())
    step, config, variables = training.restore_variables(str(trained_digits))
    expected = training.evaluate(config, variables)
    assert (record['step'], step) == (4, 4)
    assert (record['dataset'], record['data_dir'], record['images']) == ('digits', None, 297)
    assert record['top1'] == expected['top1'] and record['top5'] == expected['top5']
    assert record['loss'] == pytest.approx(expected['loss'], rel=1e-6)
    assert f'top-1 {100 * record["top1"]:.2f}%' in result.stdout
    after = files_under(trained_digits)
    assert after.pop(training.EVALUATION_FILE) and after == before  # no checkpoint, no metrics


def test_evaluate_only_refuses_another_model_and_a_workdir_without_checkpoints(trained_digits,
                                                                              tmp_path):
    before = files_under(trained_digits)
    other = run_main(DIGITS, f'--workdir={trained_digits}', '--evaluate_only',
                     '--config.model.widths=(8,16)')
    assert_one_line_error(other, 'is another model than --config describes',
                          'model.widths: checkpoint has [16, 32], --config has [8, 16]')
    assert files_under(trained_digits) == before
    empty = tmp_path / 'empty'
    empty.mkdir()
    result = run_main(DIGITS, f'--workdir={empty}', '--evaluate_only')
    assert_one_line_error(result, f'{empty} has no checkpoints')
    assert os.listdir(empty) == []
