"""`python -m qhnet.symmetry verify`, `slice`, `quantize` and `align` on a real checkpoint: a QHNet
trained for a few steps on digits is transformed, written, read back and evaluated to the same
accuracy; sliced; quantized; aligned to a second seed; bad input is refused with one line and no
traceback."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np
import orbax.checkpoint as ocp
import pytest

from qhnet import config as qhnet_config
from qhnet import models, symmetry, training
from qhnet.symmetry import commands
from qhnet.symmetry.testing import random_variables
from qhnet.training import checkpoints, preflight

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
    training.train_and_evaluate(config, path)
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
    _, config, variables = training.restore_variables(output)
    assert config.model.mixing
    # The head absorbed the last stream's random rotation: different weights, same function.
    *_, before = training.restore_variables(workdir)
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
    poisoned, step = poisoned_copy(workdir, tmp_path)
    line = error_line(run_cli('verify', f'--workdir={poisoned}', '--num_images=64'))
    assert f'the logits of the checkpoint of step {step} on 64 test images are not finite' in line
    assert 'params/stage1_block1/coef/kernel' in line
    assert not os.path.exists(os.path.join(poisoned, 'transformed', 'symmetry.json'))


def poisoned_copy(workdir: str, tmp_path) -> tuple[str, int]:
    """A checkpoint of the run's newest variables with a NaN kernel, and its step."""
    step, config, variables = training.restore_variables(workdir)
    variables = jax.tree_util.tree_map(np.array, variables)
    variables['params']['stage1_block1']['coef']['kernel'][0, 0, 0, :] = np.nan
    poisoned = str(tmp_path / 'poisoned')
    store = checkpoints.CheckpointStore(poisoned)
    store.save(step, variables, {'step': np.asarray(step)}, config)
    store.close()
    return poisoned, step


def test_slicing_a_non_finite_model_is_refused_in_one_line(workdir, tmp_path):
    poisoned, step = poisoned_copy(workdir, tmp_path)
    line = error_line(run_cli('slice', f'--workdir={poisoned}', '--keep=0.5',
                              f'--output_workdir={tmp_path / "sliced"}'))
    assert f'the logits of the checkpoint of step {step}' in line and 'are not finite' in line


@pytest.mark.parametrize('command', ['verify', 'slice'])
def test_an_output_that_cannot_be_written_is_refused_at_once(workdir, tmp_path, command,
                                                            read_only_mount):
    """Orbax would retry a read-only output for minutes, then print a long traceback."""
    output = read_only_mount(tmp_path / 'read_only') / 'out'
    start = time.time()
    line = error_line(run_cli(command, f'--workdir={workdir}', f'--output_workdir={output}'))
    assert f'cannot write to --output_workdir={output}' in line
    assert time.time() - start < 120


def test_folding_a_checkpoint_with_the_spec_of_another_model_is_refused(workdir):
    """Softball and identity activations have variables of the same shapes; the checkpoint's
    stored config tells them apart."""
    restored = training.restore_variables(workdir)
    other = restored.config.model.copy_and_resolve_references()
    other.activation = 'identity'
    with pytest.raises(ValueError, match=r"holds a model other than the spec's \(block "
                                         r"stage2_block1: activation 'softball' in the checkpoint, "
                                         r"'identity' in the spec\)"):
        symmetry.fold(symmetry.group_spec(other), restored)
    spec = symmetry.group_spec(restored)  # built from the checkpoint's own config
    symmetry.fold(spec, restored)


def unreadable_copy(workdir: str, tmp_path) -> str:
    return copy_with_unreadable(workdir, str(tmp_path / 'broken'), saved_steps(workdir))


def empty_dir(tmp_path) -> str:
    (tmp_path / 'empty').mkdir()
    return str(tmp_path / 'empty')


# case: (the flags, from the trained workdir and tmp_path; what the error line says). Where
# training.restore_variables refuses the workdir, the line is its message, which names the workdir.
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

@pytest.mark.slow  # about 20 s: slices, evaluates and fine-tunes through the command line
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
    before = training.evaluate(*training.restore_variables(workdir)[1:])['top1']
    assert summary['top1_before'] == before and 0 <= summary['top1_after'] <= 1
    for stream in summary['streams']:
        assert stream['kept'] == stream['width'] // 2
        assert 0 < stream['explained_variance'] <= 1
        assert 0 < stream['flops_after'] < stream['flops_before']
    _, config, _ = training.restore_variables(output)
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


# quantize

def test_quantize_writes_the_quantized_form_and_its_summary(workdir, tmp_path):
    output = str(tmp_path / 'quantized')
    result = run_cli('quantize', f'--workdir={workdir}', '--bits=w8a8', '--transform=learned',
                     '--learn_steps=5', '--calibration_images=128', f'--output_workdir={output}')
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'w8a8, transform learned: test top-1' in result.stdout
    with open(os.path.join(output, 'quantize.json')) as f:
        summary = json.load(f)
    assert summary['bits'] == 'w8a8' and summary['transform'] == 'learned'
    assert summary['step'] == 20 and summary['calibration_images'] == 128
    before = training.evaluate(*training.restore_variables(workdir)[1:])['top1']
    assert summary['top1_before'] == before
    assert abs(summary['top1_after'] - before) <= 0.02  # 8 bits on a 20-step digits model
    assert {'stem/kernel', 'head/kernel'} <= set(summary['weight_error'])
    assert 'pooled' in summary['activation_error'] and 'output' not in summary['activation_error']
    assert all(0 <= e < 0.1 for e in summary['weight_error'].values())
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.restore(os.path.join(output, 'quantized_form'))
    assert list(tree['bits']) == [8, 8] and 'stage1_block1' in tree['ranges']


@pytest.mark.parametrize('flags,message', [
    (['--bits=w1a8'], '1 weight bits is outside 2..16'),
    (['--transform=rotate'], "unknown transform 'rotate'"),
    (['--calibration_images=0'], 'quantizing needs training images'),
])
def test_quantize_bad_flags_are_refused_with_one_line(workdir, tmp_path, flags, message):
    line = error_line(run_cli('quantize', f'--workdir={workdir}', *flags,
                              f'--output_workdir={tmp_path / "out"}'))
    assert message in line, line
    assert not os.path.exists(tmp_path / 'out' / 'quantize.json')


def test_quantize_refuses_a_rotation_of_a_resnet(tmp_path):
    config = qhnet_config.row_config('resnet50', 'digits')
    model = models.build(config.model)
    checkpoints.save_variables(str(tmp_path / 'resnet'), 1,
                               random_variables(model, (1, 8, 8, 1), seed=0), config)
    line = error_line(run_cli('quantize', f'--workdir={tmp_path / "resnet"}',
                              '--transform=learned', f'--output_workdir={tmp_path / "out"}'))
    assert ("transform 'learned' rotates the streams that admit O(n), and this model has none"
            in line)
    assert "use 'none' or 'smooth'" in line


def test_init_from_a_workdir_without_checkpoints_is_refused(tmp_path):
    config = qhnet_config.row_config('eq3_softball', 'digits')
    config.init_from = str(tmp_path / 'nothing')
    with pytest.raises(qhnet_config.ConfigError, match='init_from=.* holds no checkpoints'):
        preflight.validate(config)


def test_init_from_another_model_is_refused(workdir, tmp_path):
    config = qhnet_config.row_config('eq3_softball', 'digits')
    config.model.widths = (16, 64)
    config.init_from = workdir
    config.progress_bar = False
    with pytest.raises(qhnet_config.ConfigError, match=r'holds variables of another model'):
        training.train_and_evaluate(config, str(tmp_path / 'run'))


def test_the_command_loads_checkpoints_and_evaluation_not_the_training_loop():
    """`python -m qhnet.symmetry` restores, saves and evaluates variables: it imports
    `qhnet.training.checkpoints` and `qhnet.training.evaluation`, not the loop, the step, the
    metric writers or the workdir checks (nor tqdm, TensorBoard or matplotlib with them), nor
    scipy.optimize, which only align's assignments use."""
    script = ('import sys, qhnet.symmetry.__main__\n'
              'print(" ".join(sorted(m for m in sys.modules if m.startswith("qhnet.training") '
              'or m in ("tqdm", "tensorboardX", "matplotlib", "scipy.optimize"))))')
    result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=True)
    loaded = set(result.stdout.split())
    assert {'qhnet.training.checkpoints', 'qhnet.training.evaluation'} <= loaded
    assert loaded.isdisjoint({'qhnet.training.loop', 'qhnet.training.steps',
                              'qhnet.training.metrics', 'qhnet.training.workdirs',
                              'qhnet.training.preflight', 'tqdm', 'tensorboardX', 'matplotlib',
                              'scipy.optimize'})


def test_the_fine_tune_config_keeps_the_warmup_fraction_when_the_epochs_change(tmp_path):
    """OUT/config.py on the digits recipe (a 1-epoch warmup of 10 epochs), loaded as the
    documented fine-tune command loads it, with --config.num_epochs=1: 0.1 epochs of warmup,
    and a valid config."""
    finetune = qhnet_config.row_config('eq3_softball', 'digits')
    (tmp_path / 'config.json').write_text(json.dumps(qhnet_config.to_json(finetune)))
    (tmp_path / 'config.py').write_text(commands.FINETUNE_CONFIG.format(
        workdir='DIR', step=20, keep=0.5, method='rotate', output=str(tmp_path), stem='',
        factor=0.1, warmup_fraction=finetune.optimizer.warmup_epochs / finetune.num_epochs))
    argv = ['qhnet', f'--config={tmp_path}/config.py', '--config.num_epochs=1']
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, flag_values=flag_values, lock_config=True,
                                    sys_argv=argv)
    flag_values(argv)
    config = flag_values.config
    assert config.num_epochs == 1 and config.optimizer.warmup_epochs == pytest.approx(0.1)
    preflight.validate(config)


@pytest.mark.slow  # about 30 s: trains, slices and fine-tunes through the command line
def test_the_documented_fine_tune_command_works_on_the_digits_recipe(tmp_path):
    """The commands of docs/symmetry.md as written, on the digits variant's own schedule (a
    1-epoch warmup): the sliced model's config keeps the warmup at the same fraction of the epochs,
    so `--config.num_epochs=1` leaves room for the decay."""
    trained = str(tmp_path / 'trained')
    config = qhnet_config.row_config('eq3_softball', 'digits')
    config.num_epochs, config.progress_bar = 2, False
    training.train_and_evaluate(config, trained)
    output = str(tmp_path / 'sliced')
    sliced = run_cli('slice', f'--workdir={trained}', '--keep=0.75', f'--output_workdir={output}')
    assert sliced.returncode == 0, sliced.stderr[-3000:]
    finetune = subprocess.run(
        [sys.executable, '-m', 'qhnet.main', f'--config={output}/config.py',
         f'--workdir={output}/finetune', '--config.num_epochs=1'],
        cwd=ROOT, text=True, capture_output=True, timeout=600,
        env={**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'})
    assert finetune.returncode == 0, finetune.stderr[-3000:]
    with open(os.path.join(output, 'finetune', 'summary.json')) as f:
        assert json.load(f)['epochs'] == 1
    # The run warmed up for 1 of its 2 epochs; the 1-epoch fine-tune keeps that half: 12 of its
    # 23 steps.
    assert re.search(r'23 steps \(23 per epoch\), peak learning rate [0-9.e-]+ after 12 warmup',
                     finetune.stderr), finetune.stderr[-2000:]


# align

@pytest.fixture(scope='module')
def other_workdir(tmp_path_factory) -> str:
    """The `workdir` fixture's run with another seed."""
    config = qhnet_config.row_config('eq3_softball', 'digits')
    config.num_train_steps = 20
    config.optimizer.warmup_epochs = 0.2
    config.progress_bar = False
    config.seed = 1
    path = str(tmp_path_factory.mktemp('digits_seed1'))
    training.train_and_evaluate(config, path)
    return path


def test_align_writes_the_aligned_model_the_midpoint_and_the_curves(workdir, other_workdir,
                                                                    tmp_path):
    output = str(tmp_path / 'aligned')
    result = run_cli('align', f'--workdir={workdir}', f'--other={other_workdir}', '--repair',
                     '--calibration_images=128', '--num_images=64', f'--output_workdir={output}')
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'same function' in result.stdout and 'aligned: barrier' in result.stdout
    with open(os.path.join(output, 'align.json')) as f:
        summary = json.load(f)
    assert set(summary['curves']) == {'naive', 'aligned', 'aligned_repaired'}
    assert all(len(c['alpha']) == len(c['top1']) == len(c['loss']) == 11
               for c in summary['curves'].values())
    assert summary['invariance']['invariant'] and summary['match'] == 'group'
    top1 = [training.evaluate(*training.restore_variables(w)[1:])['top1']
            for w in (workdir, other_workdir)]
    one_image = 1 / 297  # the digits test split holds 297 images
    for curve in summary['curves'].values():
        assert abs(curve['top1'][0] - top1[0]) <= one_image
        assert abs(curve['top1'][-1] - top1[1]) <= one_image
    step, config, variables = training.restore_variables(os.path.join(output, 'aligned'))
    assert step == 20 and config.model.mixing
    assert abs(training.evaluate(config, variables)['top1'] - top1[1]) <= one_image
    midpoint = summary['curves']['aligned_repaired']['top1'][5]
    assert abs(summary['midpoint_top1'] - midpoint) <= one_image
    assert set(summary['match_residuals']) >= {'stem', 'stage2_block1/product'}


def saved_model(tmp_path, name: str, row: str, **model_changes) -> str:
    """A workdir holding one checkpoint (step 20) of random variables of a digits row's model."""
    config = qhnet_config.row_config(row, 'digits')
    config.model.update(model_changes)
    model = models.build(config.model)
    checkpoints.save_variables(str(tmp_path / name), 20,
                               random_variables(model, (1, 8, 8, 1), seed=0), config)
    return str(tmp_path / name)


# case: (the flags, from the trained workdir and tmp_path; what the error line says)
def other(tmp, name: str, row: str, **model_changes) -> list[str]:
    return [f'--other={saved_model(tmp, name, row, **model_changes)}']


ALIGN_BAD_INPUT = {
    'no other': (lambda w, tmp: [], '--other is missing'),
    'other is workdir': (lambda w, tmp: [f'--other={w}'], '--other is --workdir'),
    'other widths': (lambda w, tmp: other(tmp, 'wide', 'eq3_softball', widths=(8, 16)),
                     '--workdir and --other hold different models (block stage1_block1'),
    'other config': (lambda w, tmp: other(tmp, 'hard', 'eq3_softball', activation='hardball'),
                     "activation 'hardball' in --other, 'softball' in --workdir"),
    'baseline': (lambda w, tmp: other(tmp, 'resnet', 'resnet50'),
                 '--workdir holds a qhnet model, --other a resnet50'),
    'non-finite': (lambda w, tmp: [f'--other={poisoned_copy(w, tmp)[0]}'], 'are not finite'),
}


@pytest.mark.parametrize('case', list(ALIGN_BAD_INPUT))
def test_align_bad_input_is_refused_with_one_line(workdir, tmp_path, case):
    flags, says = ALIGN_BAD_INPUT[case]
    line = error_line(run_cli('align', f'--workdir={workdir}', *flags(workdir, tmp_path),
                              f'--output_workdir={tmp_path / "out"}'))
    assert says in line, line
    assert not os.path.exists(tmp_path / 'out' / 'align.json')
