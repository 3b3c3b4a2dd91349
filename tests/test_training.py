"""The training loop on real data: one step, 8-device sharding, resume, rollback, bad workdirs."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qhnet import config as qhnet_config
from qhnet import data, models, training
from qhnet.training import checkpoints, feeding, loop, metrics, recipe, steps, workdirs
from tests import injection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 12


def tiny_config(**overrides):
    """A 2-stage QHNet of widths (8, 16) on scikit-learn's digits, 12 steps of batch 32."""
    config = qhnet_config.get_config('digits')
    config.model.widths = (8, 16)
    config.model.depths = (1, 1)
    config.batch_size = 32
    config.eval_batch_size = 128
    config.num_train_steps = TOTAL_STEPS
    config.optimizer.warmup_epochs = 0.1  # 5 of the 46 steps per epoch
    config.checkpoint.every_steps = 4
    config.log_every_steps = 4
    config.progress_bar = False
    for path, value in overrides.items():
        section, _, key = path.rpartition('.')
        (config[section] if section else config)[key] = value
    return config


def assert_trees_equal(a, b, **tolerance):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tolerance)


def all_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def snapshot(directory) -> dict[str, tuple[int, int]]:
    """Every file under `directory` with its size and modification time."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            stat = os.stat(os.path.join(root, name))
            files[os.path.relpath(os.path.join(root, name), directory)] = (stat.st_size,
                                                                           stat.st_mtime_ns)
    return files


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    """An uninterrupted 12-step run: (config, workdir, summary)."""
    config = tiny_config()
    workdir = str(tmp_path_factory.mktemp('run') / 'workdir')
    return config, workdir, training.train_and_evaluate(config, workdir)


def test_learning_rate_schedule_follows_the_recipe():
    config = qhnet_config.get_config()
    per_epoch = 126_689 // config.batch_size  # ImageNet-100 has 126,689 train images
    total = recipe.total_train_steps(config, per_epoch)
    warmup = recipe.warmup_steps(config, per_epoch)
    schedule = recipe.learning_rate_schedule(config, per_epoch, total)
    assert (total, warmup) == (50 * per_epoch, 5 * per_epoch)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(schedule(warmup), 0.3, rtol=1e-6)  # the paper's peak
    np.testing.assert_allclose(schedule((warmup + total) // 2), 0.15, rtol=1e-3)
    np.testing.assert_allclose(schedule(total), 0.0, atol=1e-9)
    config.batch_size = 384
    assert recipe.peak_learning_rate(config) == pytest.approx(0.6)


def test_weight_decay_skips_biases_and_batchnorm():
    config = tiny_config()
    shapes = jax.eval_shape(models.build(config.model).init, jax.random.key(0),
                            jnp.zeros((1, 8, 8, 1)))
    mask = recipe.decay_mask(shapes['params'])
    flat = {'/'.join(str(k.key) for k in path): decayed
            for path, decayed in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat['head/kernel'] and flat['stem_conv/kernel']
    assert flat['stage1_block1/derivative/kernel']
    assert not flat['head/bias'] and not flat['stem_bn/scale'] and not flat['stem_bn/bias']


def real_batch(batch_size: int, name: str = 'fashion_mnist'):
    config = qhnet_config.get_config(name).data
    return next(data.make_iterator(config, 'train', batch_size=batch_size, seed=0, train=True))


def one_step_setup(config, mesh):
    model = models.build(config.model)
    schedule = recipe.learning_rate_schedule(config, 100, 1000)
    optimizer = recipe.make_optimizer(config, schedule)
    state = steps.create_train_state(model, optimizer, (28, 28, 1), jax.random.key(0))
    step = steps.jit_train_step(mesh, model=model, optimizer=optimizer, schedule=schedule,
                                label_smoothing=config.label_smoothing,
                                inputs=steps.model_inputs(data.get_info(config.data)))
    return state, step


def test_one_training_step_on_fashion_mnist():
    config = qhnet_config.get_config('fashion_mnist')
    config.model.widths, config.model.depths = (8, 16), (1, 1)
    config.optimizer.warmup_epochs, config.optimizer.base_lr = 0.0, 0.1
    state, step = one_step_setup(config, feeding.make_mesh())
    before = jax.device_get(state)
    batch = real_batch(64)
    state, step_metrics = step(state, batch, jax.random.key(1))
    assert int(state.step) == 1 and bool(step_metrics['finite'])
    assert 1.5 < float(step_metrics['loss']) < 3.5  # about ln(10) at initialisation
    assert float(step_metrics['learning_rate']) == pytest.approx(0.1)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before.params, state.params)
    # BN_o's scale starts at zero, so in step 1 only it, not the branch before it, gets a gradient.
    for layer in ('head', 'stem_conv', 'stem_bn', 'stage1_block1/out_bn', 'stage2_block1/out_bn'):
        assert all(jax.tree.leaves(changed[layer] if '/' not in layer else
                                   changed[layer.split('/')[0]][layer.split('/')[1]])), layer
    assert not np.array_equal(before.batch_stats['stem_bn']['mean'],
                              state.batch_stats['stem_bn']['mean'])
    # A non-finite batch leaves the state as it was and says so.
    nan_batch = dict(batch, image=np.full(batch['image'].shape, np.nan, np.float32))
    after, nan_metrics = step(jax.device_get(state), nan_batch, jax.random.key(1))
    assert not bool(nan_metrics['finite'])
    assert int(after.step) == 1 and all_finite(after.params)


def test_bfloat16_computes_in_bfloat16_and_keeps_float32_parameters():
    config = tiny_config(**{'model.dtype': 'bfloat16', 'optimizer.warmup_epochs': 0.0})
    model = models.build(config.model)
    schedule = recipe.learning_rate_schedule(config, 46, TOTAL_STEPS)
    optimizer = recipe.make_optimizer(config, schedule)
    state = steps.create_train_state(model, optimizer, (8, 8, 1), jax.random.key(0))
    step = steps.jit_train_step(feeding.make_mesh(), model=model, optimizer=optimizer,
                                schedule=schedule, label_smoothing=config.label_smoothing,
                                inputs=steps.model_inputs(data.get_info(config.data)))
    batch = real_batch(32, 'digits')
    for _ in range(3):
        state, step_metrics = step(state, batch, jax.random.key(1))
    assert bool(step_metrics['finite']) and int(state.step) == 3
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype('float32')}
    images = data.normalise(batch['image'], data.get_info(config.data))
    jaxpr = str(jax.make_jaxpr(lambda v, x: model.apply(v, x))(state.variables(), images))
    assert 'bf16[32,8,8,8]' in jaxpr  # the stem's activations


SHARDED_SCRIPT = r'''
import jax, numpy as np
from qhnet import config as qhnet_config
from qhnet import data, models
from qhnet.training import feeding, recipe, steps
assert jax.device_count() == 8, jax.devices()
config = qhnet_config.get_config('fashion_mnist')
config.model.widths, config.model.depths = (8, 16), (1, 1)
config.optimizer.warmup_epochs, config.optimizer.base_lr = 0.0, 0.1
model = models.build(config.model)
schedule = recipe.learning_rate_schedule(config, 100, 1000)
optimizer = recipe.make_optimizer(config, schedule)
batch = next(data.make_iterator(config.data, 'train', batch_size=64, seed=0, train=True))
results = []
for devices in (jax.devices()[:1], jax.devices()):
    mesh = feeding.make_mesh(devices)
    step = steps.jit_train_step(mesh, model=model, optimizer=optimizer, schedule=schedule,
                                label_smoothing=config.label_smoothing,
                                inputs=steps.model_inputs(data.get_info(config.data)))
    state = steps.create_train_state(model, optimizer, (28, 28, 1), jax.random.key(0))
    for _ in range(2):
        state, step_metrics = step(state, batch, jax.random.key(1))
    results.append(jax.device_get((state, step_metrics)))
    print(len(devices), 'devices: loss', float(step_metrics['loss']),
          'params sharding', jax.tree.leaves(state.params)[0].sharding)
(single, single_metrics), (sharded, sharded_metrics) = results
worst = 0.0
for a, b in zip(jax.tree.leaves((single.params, single.batch_stats)),
                jax.tree.leaves((sharded.params, sharded.batch_stats))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    worst = max(worst, float(np.max(np.abs(a - b))))
np.testing.assert_allclose(single_metrics['loss'], sharded_metrics['loss'], rtol=1e-6)
print('max abs difference', worst)
'''


def test_sharded_step_on_8_devices_matches_one_device():
    """Two steps (batch 64, real Fashion-MNIST) on a mesh of 8 CPU devices agree with the
    same steps on one device to rtol 1e-5 / atol 1e-6 (float32 reduction order)."""
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
               JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, '-c', SHARDED_SCRIPT], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "Mesh('data': 8" in result.stdout and 'spec=P()' in result.stdout
    assert 'max abs difference' in result.stdout


def test_run_writes_metrics_summary_and_curves(finished_run):
    config, workdir, summary = finished_run
    assert summary['steps'] == TOTAL_STEPS and summary['rollbacks'] == 0
    assert 0.1 < summary['test_top1'] <= summary['test_top5'] <= 1.0
    assert summary['train_images_per_second'] > 0
    with open(os.path.join(workdir, training.SUMMARY_FILE)) as f:
        assert json.load(f)['test_top1'] == summary['test_top1']
    records = metrics.read_metrics(workdir)
    assert [row['step'] for row in records['train']] == [4, 8, 12]
    assert [row['step'] for row in records['test']] == [TOTAL_STEPS]
    assert os.path.getsize(os.path.join(workdir, metrics.CURVES_FILE)) > 1000
    assert any(name.startswith('events.out.tfevents')
               for name in os.listdir(os.path.join(workdir, 'tensorboard')))
    store = checkpoints.CheckpointStore(workdir, read_only=True)
    assert store.steps() == [12, 8, 4]  # max_to_keep=3; step 0 rotated out
    store.close()


def test_restore_variables_and_evaluate(finished_run):
    config, workdir, summary = finished_run
    _, restored_config, variables = training.restore_variables(workdir)
    assert restored_config.model.to_dict() == config.model.to_dict()
    assert set(variables) == {'params', 'batch_stats'}
    scores = training.evaluate(restored_config, variables)
    assert scores['top1'] == pytest.approx(summary['test_top1'])
    assert scores['loss'] == pytest.approx(summary['test_loss'], rel=1e-5)


def test_killed_and_resumed_run_ends_with_the_same_parameters(finished_run, tmp_path, monkeypatch,
                                                              caplog):
    config, uninterrupted, _ = finished_run
    monkeypatch.chdir(tmp_path)
    workdir = 'workdir'  # relative, as in the README's command
    injection.crash_after(monkeypatch, step=7)
    with pytest.raises(injection.SimulatedCrash):
        training.train_and_evaluate(tiny_config(log_every_steps=2), workdir)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    # The newest checkpoint is step 4: the resumed run repeats steps 5-7.
    store = checkpoints.CheckpointStore(workdir, read_only=True)
    assert store.steps()[0] == 4
    store.close()
    with caplog.at_level(logging.WARNING):
        training.train_and_evaluate(tiny_config(), workdir)
    # orbax's notices about the read-only look at the workdir before resuming are dropped.
    assert 'is read only' not in caplog.text and 'read_only=True' not in caplog.text
    *_, expected = training.restore_variables(uninterrupted)
    *_, resumed = training.restore_variables(workdir)
    assert_trees_equal(expected, resumed, rtol=1e-6, atol=1e-7)
    events = [json.loads(line) for line in open(os.path.join(workdir, metrics.METRICS_FILE))]
    assert [e['step'] for e in events if e.get('event') == 'resume'] == [4]
    # The row of step 6, written before the crash and redone after the resume, is marked.
    train_rows = [e for e in events if e.get('split') == 'train']
    assert [(e['step'], e.get('superseded', False)) for e in train_rows] == [
        (2, False), (4, False), (6, True), (8, False), (12, False)]
    assert [row['step'] for row in metrics.read_metrics(workdir)['train']] == [2, 4, 8, 12]


def test_restored_state_that_breaks_down_again_walks_back(tmp_path, monkeypatch):
    """A NaN batch at step 6, twice: the rollback to step 4 breaks down again, so the second
    rollback goes back to step 0 rather than to step 4 once more."""
    injection.nan_batches(monkeypatch, at_step=6, times=2)
    config = tiny_config()
    workdir = str(tmp_path / 'workdir')
    summary = training.train_and_evaluate(config, workdir)
    assert summary['rollbacks'] == 2 and summary['steps'] == TOTAL_STEPS
    events = [json.loads(line) for line in open(os.path.join(workdir, metrics.METRICS_FILE))]
    assert [e['restored_step'] for e in events if e.get('event') == 'rollback'] == [4, 0]
    assert os.listdir(os.path.join(workdir, checkpoints.ABANDONED_DIR)) == ['4']
    *_, variables = training.restore_variables(workdir)
    assert all_finite(variables)


def flip_bytes(step_dir: str, count: int = 64) -> str:
    """Overwrites `count` bytes in the middle of the largest variables file; returns its path."""
    files = [os.path.join(root, name) for root, _, names in
             os.walk(os.path.join(step_dir, 'variables')) for name in names]
    path = max(files, key=os.path.getsize)
    with open(path, 'r+b') as f:
        f.seek(os.path.getsize(path) // 2)
        original = f.read(count)
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(b ^ 0xFF for b in original))
    return path


def test_flipped_bytes_in_a_checkpoint_are_detected(finished_run, tmp_path, caplog):
    """A checkpoint whose bytes changed after it was written still reads back (orbax does not
    notice); its digest does, and the previous checkpoint is restored instead."""
    _, finished, _ = finished_run
    workdir = str(tmp_path / 'workdir')
    shutil.copytree(finished, workdir)
    flip_bytes(os.path.join(workdir, checkpoints.CHECKPOINT_DIR, str(TOTAL_STEPS)))
    with caplog.at_level(logging.WARNING):
        step, _, variables = training.restore_variables(workdir)
    assert step == 8
    assert f'checkpoint at step {TOTAL_STEPS} is corrupt (content digest mismatch' in caplog.text
    *_, expected = training.restore_variables(finished)
    assert not np.allclose(np.asarray(jax.tree.leaves(variables)[0]),
                           np.asarray(jax.tree.leaves(expected)[0])) or step != TOTAL_STEPS


@pytest.mark.parametrize('path,value,message', [
    ('seed', 1, 'seed: checkpoint has 0, config has 1'),
    ('num_train_steps', 16, 'num_train_steps: checkpoint has 12, config has 16'),
    ('optimizer.base_lr', 0.2, 'optimizer.base_lr: checkpoint has 0.1, config has 0.2'),
])
def test_resume_with_another_seed_or_schedule_is_refused(finished_run, path, value, message):
    """The step count, the random stream and the schedule of a resumed run must be the run's."""
    _, workdir, _ = finished_run
    before = snapshot(workdir)
    with pytest.raises(training.IncompatibleWorkdirError, match=re.escape(message)):
        training.train_and_evaluate(tiny_config(**{path: value}), workdir)
    assert snapshot(workdir) == before


def test_non_finite_batch_rolls_back_and_finishes(tmp_path, caplog, monkeypatch):
    workdir = str(tmp_path / 'workdir')
    injection.nan_batches(monkeypatch, at_step=6)
    config = tiny_config()
    with caplog.at_level(logging.WARNING):
        summary = training.train_and_evaluate(config, workdir)
    assert summary['rollbacks'] == 1 and summary['steps'] == TOTAL_STEPS
    *_, variables = training.restore_variables(workdir)
    assert all_finite(variables)
    events = [json.loads(line) for line in open(os.path.join(workdir, metrics.METRICS_FILE))]
    rollbacks = [e for e in events if e.get('event') == 'rollback']
    assert len(rollbacks) == 1
    assert rollbacks[0]['step'] == 6 and rollbacks[0]['restored_step'] == 4
    assert rollbacks[0]['lr_scale'] == 0.5
    assert 'non-finite loss or gradient at step 6' in caplog.text
    # After the rollback the learning rate is halved.
    train_rows = {row['step']: row for row in metrics.read_metrics(workdir)['train']}
    schedule = recipe.learning_rate_schedule(config, 1500 // 32, TOTAL_STEPS)
    assert train_rows[8]['learning_rate'] == pytest.approx(0.5 * float(schedule(7)), rel=1e-5)


def test_breakdown_gives_up_after_max_retries(tmp_path, monkeypatch):
    injection.nan_batches(monkeypatch, at_step=2, times=3)
    config = tiny_config(**{'num_train_steps': 3, 'optimizer.warmup_epochs': 0.0,
                            'breakdown.max_retries': 2})
    with pytest.raises(training.TrainingDivergedError, match='2 rollbacks with the learning rate'):
        training.train_and_evaluate(config, str(tmp_path / 'workdir'))


def test_workdir_of_another_model_fails_and_is_left_untouched(finished_run):
    _, workdir, _ = finished_run
    before = snapshot(workdir)
    other = tiny_config(**{'model.widths': (8, 32)})
    with pytest.raises(training.IncompatibleWorkdirError,
                       match=r'model.widths: checkpoint has \[8, 16\], config has \[8, 32\]'):
        training.train_and_evaluate(other, workdir)
    assert snapshot(workdir) == before


def test_workdir_accepts_changes_that_keep_the_function(finished_run):
    """remat, the derivative implementation and the compute dtype change how, not what."""
    _, workdir, _ = finished_run
    before = snapshot(workdir)
    workdirs.check_workdir(workdir, tiny_config(**{'model.remat': True, 'model.dtype': 'bfloat16',
                                                'model.derivative_impl': 'folded'}))
    assert snapshot(workdir) == before


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(finished_run, tmp_path, caplog):
    config, finished, _ = finished_run
    workdir = str(tmp_path / 'workdir')
    shutil.copytree(finished, workdir)
    latest = os.path.join(workdir, checkpoints.CHECKPOINT_DIR, str(TOTAL_STEPS))
    for root, _, names in os.walk(os.path.join(latest, 'variables')):
        for name in names:
            with open(os.path.join(root, name), 'r+b') as f:
                f.truncate(os.path.getsize(f.name) // 2)
    with caplog.at_level(logging.WARNING):
        *_, variables = training.restore_variables(workdir)  # reads only: step 8
    assert f'checkpoint at step {TOTAL_STEPS} is corrupt' in caplog.text
    assert all_finite(variables)
    # Training again resumes from step 8, sets the corrupt one aside and saves step 12 anew.
    summary = training.train_and_evaluate(config, workdir)
    assert summary['steps'] == TOTAL_STEPS
    assert os.path.isdir(os.path.join(workdir, checkpoints.CORRUPT_DIR, str(TOTAL_STEPS)))
    *_, expected = training.restore_variables(finished)
    *_, resumed = training.restore_variables(workdir)
    assert_trees_equal(expected, resumed, rtol=1e-6, atol=1e-7)


def test_an_evaluation_lost_between_save_and_evaluate_is_run_on_resume(tmp_path, monkeypatch):
    """Killed after the checkpoint at the end of epoch 1 was saved, before its evaluation: the
    resumed run finds the checkpoint without its evaluation and evaluates it first, so that
    metrics.jsonl holds every epoch's."""
    config = tiny_config(**{'batch_size': 500, 'num_train_steps': 6, 'log_every_steps': 3,
                            'optimizer.warmup_epochs': 0.0})  # 3 steps per epoch
    workdir = str(tmp_path / 'workdir')
    log_eval = loop.TrainingRun.log_eval

    def killed_at_step_3(run, step, state):
        if step == 3:
            raise injection.SimulatedCrash('killed before evaluating step 3')
        log_eval(run, step, state)

    with monkeypatch.context() as patch:
        patch.setattr(loop.TrainingRun, 'log_eval', killed_at_step_3)
        with pytest.raises(injection.SimulatedCrash):
            training.train_and_evaluate(config, workdir)
    assert 'test' not in metrics.read_metrics(workdir)
    training.train_and_evaluate(config, workdir)
    assert [row['step'] for row in metrics.read_metrics(workdir)['test']] == [3, 6]


PROCESS_STATE_SCRIPT = r'''
import errno, logging, os, sys, tempfile, threading, warnings
import matplotlib
matplotlib.use('svg')  # a backend that is not Agg, as a notebook's is not
from absl import flags
import orbax.checkpoint as ocp

def state():
    return dict(hooks=(sys.excepthook, threading.excepthook, sys.unraisablehook),
                filters=list(warnings.filters), warnoptions=list(sys.warnoptions),
                loggers={name: list(logging.getLogger(name).filters)
                         for name in ('', 'absl', 'asyncio')},
                backend=matplotlib.get_backend(), flags_parsed=flags.FLAGS.is_parsed())

backend = matplotlib.get_backend()
from qhnet import config as qhnet_config, data, training
from qhnet.training import loop, metrics
assert matplotlib.get_backend() == backend, 'importing qhnet changed the matplotlib backend'
import sklearn.datasets  # what qhnet imports on first use adds its own warnings filters
from tests.conftest import grayscale_imagefolder
from tests.test_training import tiny_config
import pathlib
before = state()

def run(fault, step):
    save = ocp.CheckpointManager.save
    def failing(manager, at, *args, **kwargs):
        if at == step:
            raise fault
        return save(manager, at, *args, **kwargs)
    ocp.CheckpointManager.save = failing
    try:
        training.train_and_evaluate(tiny_config(), tempfile.mkdtemp())
    finally:
        ocp.CheckpointManager.save = save

try:
    run(OSError(errno.ENOSPC, 'No space left on device'), 4)
except training.CheckpointWriteError as error:
    print('caught', type(error).__name__)
try:
    run(KeyboardInterrupt(), 4)
except KeyboardInterrupt:
    print('caught KeyboardInterrupt')
training.train_and_evaluate(tiny_config(), tempfile.mkdtemp())  # a finished run draws curves
root, _ = grayscale_imagefolder(pathlib.Path(tempfile.mkdtemp()))
folder = qhnet_config.data_config()
folder.update(name='imagefolder', data_dir=str(root), image_size=16, num_workers=1)
batches = data.make_iterator(folder, 'train', batch_size=4, seed=0, train=True)
next(batches)
batches.close()
after = state()
for key in before:
    assert after[key] == before[key], (key, before[key], after[key])
print('process state unchanged')
sys.stdout.flush()
thread = threading.Thread(target=lambda: 1 / 0)
thread.start()
thread.join()
warnings.warn('an unrelated warning')
'''


def test_a_failed_or_interrupted_save_leaves_the_process_as_it_was():
    """In one process, as a notebook would: a save that fails (a full disk), one interrupted
    by Ctrl-C, a finished run and a stream decoded by a worker process. The process's hooks,
    warnings settings, logger filters, matplotlib backend and absl flags are as they were,
    and an unrelated thread exception and warning still reach the user."""
    result = subprocess.run([sys.executable, '-c', PROCESS_STATE_SCRIPT], cwd=ROOT, text=True,
                            capture_output=True, timeout=600, check=False,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.splitlines() == ['caught CheckpointWriteError',
                                          'caught KeyboardInterrupt', 'process state unchanged']
    assert 'ZeroDivisionError: division by zero' in result.stderr
    assert 'UserWarning: an unrelated warning' in result.stderr
