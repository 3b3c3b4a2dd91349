"""The subcommands `slice`, `quantize` and `align` of `python -m qhnet.symmetry` (their usage and
flags: `qhnet.symmetry.__main__`): each a `run_*(workdir, output_workdir) -> summary` that
`run_and_report` calls, and a `*_report(summary)` of the lines it prints.
"""

import json
import os

from absl import flags
import orbax.checkpoint as ocp

from qhnet import data, symmetry
from qhnet import config as qhnet_config
from qhnet.symmetry import align, quantize, slicing
from qhnet.symmetry.checks import CommandError, check_finite, check_output, first_images, restore
from qhnet.symmetry.families import structure_difference
from qhnet.symmetry.structure import trace
from qhnet.training import checkpoints, evaluation

FLAGS = flags.FLAGS


FINETUNE_CONFIG = '''"""The model sliced from {workdir} (step {step})
by `python -m qhnet.symmetry slice --keep={keep:g} --method={method}{stem}`. Fine-tune it
(config.init_from starts from its variables; the recipe's schedule at {factor:g} times its peak
learning rate, optimizer.base_lr, with the warmup the same fraction of the epochs):

  python -m qhnet.main --config={output}/config.py --workdir={output}/finetune --config.num_epochs=1
"""

import json
import os

from qhnet import config


def get_config():
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config.json')) as f:
        finetune = config.from_json(json.load(f))
    # --config.num_epochs=N keeps the warmup at the same fraction of the training.
    finetune.optimizer.warmup_epochs = finetune.get_ref('num_epochs') * {warmup_fraction!r}
    return finetune
'''


def run_slice(workdir: str, output_workdir: str) -> dict:
    if not 0 < FLAGS.keep <= 1:
        raise CommandError(f'--keep={FLAGS.keep:g} is the fraction of each stream to keep; pass '
                           'a number in (0, 1]')
    if not FLAGS.finetune_lr_factor > 0:
        raise CommandError(f'--finetune_lr_factor={FLAGS.finetune_lr_factor:g} scales the '
                           'fine-tuning learning rate; pass a number > 0')
    if FLAGS.calibration_images < 1:
        raise CommandError(f'--calibration_images={FLAGS.calibration_images}: slicing needs '
                           'training images; pass --calibration_images=N with N >= 1')
    restored = restore(workdir, FLAGS.trust_unverified)
    step, config, variables = restored
    check_output(workdir, output_workdir, step)
    if not (config.model.name == 'qlnet' or (config.model.name, config.model.equation) ==
            ('qhnet', 3)):
        raise CommandError(f'slicing covers QHNets of Eq. (3) and QLNets for now; {workdir} '
                           f'holds a {config.model.name} (equation {config.model.equation}); '
                           'slice an Eq. (3) model (configs/eq3_*.py) or a QLNet')
    dataset = data.open_dataset(config.data)
    images = first_images(dataset, 'train', FLAGS.calibration_images)
    spec = symmetry.group_spec(restored)
    check_finite(spec, symmetry.fold(spec, restored), images, step, variables)
    sliced = slicing.slice_variables(config, variables, images, FLAGS.keep, FLAGS.method,
                                     slice_stem=FLAGS.slice_stem)
    output = os.path.abspath(output_workdir)
    checkpoints.save_variables(output, step, sliced.variables, sliced.config)
    finetune = sliced.config.copy_and_resolve_references()
    finetune.init_from = output
    finetune.optimizer.base_lr *= FLAGS.finetune_lr_factor
    with open(os.path.join(output, 'config.json'), 'w') as f:
        json.dump(qhnet_config.to_json(finetune), f, indent=2)
    with open(os.path.join(output, 'config.py'), 'w') as f:
        f.write(FINETUNE_CONFIG.format(workdir=os.path.abspath(workdir), step=step,
                                       keep=FLAGS.keep, method=FLAGS.method, output=output,
                                       stem=' --slice_stem' if FLAGS.slice_stem else '',
                                       factor=FLAGS.finetune_lr_factor,
                                       warmup_fraction=(finetune.optimizer.warmup_epochs
                                                        / finetune.num_epochs)))
    _, reloaded_config, reloaded = checkpoints.restore_variables(output)  # what was written
    return {
        'workdir': workdir, 'output_workdir': output_workdir, 'step': int(step),
        'keep': FLAGS.keep, 'method': FLAGS.method, 'slice_stem': FLAGS.slice_stem,
        'finetune_base_lr': finetune.optimizer.base_lr,
        'calibration_images': int(len(images)),
        'stream_widths': list(sliced.config.model.stream_widths),
        'params_before': slicing.count_params(variables),
        'params_after': slicing.count_params(reloaded),
        'top1_before': evaluation.evaluate(config, variables, dataset=dataset)['top1'],
        'top1_after': evaluation.evaluate(reloaded_config, reloaded, dataset=dataset)['top1'],
        'streams': [dict(name=s.name, group=s.group, width=s.width, kept=s.kept,
                         rotated=s.rotated, explained_variance=s.explained_variance,
                         flops_before=2 * s.macs_before, flops_after=2 * s.macs_after)
                    for s in sliced.streams],
    }


def slice_report(summary: dict) -> list[str]:
    """What `slice` prints: each stream, the totals, a note where no stream could rotate, and
    the fine-tuning command."""
    lines = [f'{s["name"]:>16}: {s["kept"]:>4} of {s["width"]:>4} channels '
             f'({"rotated" if s["rotated"] else "selected"}), explained variance '
             f'{s["explained_variance"]:.4f}, MFLOPs per image {s["flops_before"] / 1e6:.2f} -> '
             f'{s["flops_after"] / 1e6:.2f}' for s in summary['streams']]
    cut = [s for s in summary['streams'] if s['kept'] < s['width']]
    if summary['method'] == 'rotate' and cut and not any(s['rotated'] for s in cut):
        lines.append('note: no stream of this model admits a rotation (its activations admit '
                     'only permutations and scalings), so it was sliced with permutations only: '
                     'the channels of largest variance, as --method=select')
    output = os.path.abspath(summary['output_workdir'])
    return lines + [
        f'parameters {summary["params_before"]:,} -> {summary["params_after"]:,}; test top-1 '
        f'{summary["top1_before"]:.4f} -> {summary["top1_after"]:.4f}',
        f'wrote the sliced model to {summary["output_workdir"]}; fine-tune it with\n  python -m '
        f'qhnet.main --config={output}/config.py --workdir={output}/finetune '
        '--config.num_epochs=1']


QUANTIZED_DIR = 'quantized_form'


def run_quantize(workdir: str, output_workdir: str) -> dict:
    try:
        bits = quantize.parse_bits(FLAGS.bits)
        quantize.parse_transform(FLAGS.transform)
    except ValueError as error:
        raise CommandError(f'--bits/--transform: {error}') from error
    if FLAGS.calibration_images < 1:
        raise CommandError(f'--calibration_images={FLAGS.calibration_images}: quantizing needs '
                           'training images; pass --calibration_images=N with N >= 1')
    if FLAGS.learn_steps < 1:
        raise CommandError(f'--learn_steps={FLAGS.learn_steps}; pass a number >= 1')
    restored = restore(workdir, FLAGS.trust_unverified)
    step, config, variables = restored
    check_output(workdir, output_workdir, step)
    spec = symmetry.group_spec(restored, tie_identity_shortcuts=True)
    try:
        quantize.check_supported(spec, FLAGS.transform)
    except ValueError as error:
        raise CommandError(str(error)) from error
    dataset = data.open_dataset(config.data)
    images = first_images(dataset, 'train', FLAGS.calibration_images)
    form = symmetry.fold(spec, restored)
    check_finite(spec, form, images, step, variables)
    quantized = quantize.quantize(spec, form, images, bits, FLAGS.transform, seed=FLAGS.seed,
                                  steps=FLAGS.learn_steps)
    path = os.path.join(os.path.abspath(output_workdir), QUANTIZED_DIR)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, quantize.to_tree(quantized), force=True)
        checkpointer.wait_until_finished()
    return {
        'workdir': workdir, 'output_workdir': output_workdir, 'step': int(step),
        'bits': str(bits), 'transform': FLAGS.transform, 'seed': FLAGS.seed,
        'calibration_images': int(len(images)),
        'top1_before': evaluation.evaluate(config, variables, dataset=dataset)['top1'],
        'top1_after': evaluation.evaluate(config, quantized.variables(),
                                          logits_fn=quantize.logits_fn(spec, bits),
                                          dataset=dataset)['top1'],
        'weight_error': quantized.weight_errors,
        'activation_error': quantized.activation_errors,
        'activation_range': {p: [float(v) for v in r] for p, r in quantized.ranges.items()},
    }


def quantize_report(summary: dict) -> list[str]:
    """What `quantize` prints: each weight's and activation point's relative rounding error,
    then top-1 before and after."""
    errors = {**summary['weight_error'], **summary['activation_error']}
    return [f'{name:>28}: {error:.3f}' for name, error in errors.items()] + [
        f'{summary["bits"]}, transform {summary["transform"]}: test top-1 '
        f'{summary["top1_before"]:.4f} (float) -> {summary["top1_after"]:.4f}',
        f'wrote the quantized form and quantize.json to {summary["output_workdir"]}']


def restore_pair(workdir: str, other: str):
    """(A, B): the newest checkpoints of --workdir and --other, refused unless they hold one
    model (architecture and widths) on one dataset."""
    if not other:
        raise CommandError('--other is missing; pass --other=DIR, the workdir of the model to '
                           'align to --workdir\'s (a run of the same config with another seed)')
    if os.path.realpath(other) == os.path.realpath(workdir or ''):
        raise CommandError(f'--other is --workdir ({other}); pass the workdir of another run')
    restored_a = restore(workdir, FLAGS.trust_unverified)
    restored_b = restore(other, FLAGS.trust_unverified)
    names = [r.config.model.name for r in (restored_a, restored_b)]
    if names[0] != names[1]:
        raise CommandError(f'--workdir holds a {names[0]} model, --other a {names[1]}; align two '
                           'runs of one config that differ in the seed only')
    difference = structure_difference(symmetry.group_spec(restored_a),
                                      trace(restored_b.config.model))
    if difference:
        difference = difference.replace('in the checkpoint', 'in --other').replace(
            'in the spec', 'in --workdir')
        raise CommandError(f'--workdir and --other hold different models ({difference}); align '
                           'two runs of one config that differ in the seed only')
    datasets = [r.config.data.name for r in (restored_a, restored_b)]
    if datasets[0] != datasets[1]:
        raise CommandError(f'--workdir was trained on {datasets[0]}, --other on {datasets[1]}; '
                           'align two runs on one dataset')
    return restored_a, restored_b


def run_align(workdir: str, output_workdir: str) -> dict:
    if FLAGS.calibration_images < 1 or FLAGS.num_images < 1:
        raise CommandError(f'--calibration_images={FLAGS.calibration_images}, --num_images='
                           f'{FLAGS.num_images}: align needs both; pass numbers >= 1')
    restored_a, restored_b = restore_pair(workdir, FLAGS.other)
    config = restored_a.config
    outputs = {name: os.path.join(os.path.abspath(output_workdir), name)
               for name in ('aligned', 'midpoint')}
    check_output(workdir, outputs['midpoint'], restored_a.step)
    check_output(FLAGS.other, outputs['aligned'], restored_b.step)
    spec = symmetry.group_spec(restored_a, tie_identity_shortcuts=True)
    dataset = data.open_dataset(config.data)
    images = first_images(dataset, 'train', FLAGS.calibration_images)
    test_images = first_images(dataset, 'test', FLAGS.num_images)
    forms = [symmetry.fold(spec, r) for r in (restored_a, restored_b)]
    for restored, form in zip((restored_a, restored_b), forms):
        check_finite(spec, form, test_images, restored.step, restored.variables)
    form_a, form_b = forms
    element = align.align(spec, form_a, form_b, images, method=FLAGS.match, gl=FLAGS.gl)
    aligned = symmetry.act(spec, form_b, element)
    invariance = {**symmetry.verify(spec, form_b, element, test_images),
                  'num_images': int(len(test_images))}
    evaluate = evaluation.evaluator(config, logits_fn=lambda f, x: symmetry.apply(spec, f, x),
                                    dataset=dataset)
    lines = {'naive': (form_b, None), 'aligned': (aligned, None)}
    if FLAGS.repair:
        lines['aligned_repaired'] = (aligned, align.repairer(spec, form_a, aligned, images))
    from tqdm import tqdm  # here: the other commands start without it
    curves = {}
    with tqdm(total=len(lines) * len(align.ALPHAS), desc='line between the models') as bar:
        for name, (end, correct) in lines.items():
            curves[name] = align.curve(form_a, end, evaluate, correct=correct,
                                       progress=lambda alpha: bar.update())
    midpoint = align.interpolate(form_a, aligned, 0.5)
    if FLAGS.repair:
        midpoint = lines['aligned_repaired'][1](midpoint, 0.5)
    written_config = config.copy_and_resolve_references()
    if written_config.model.name == 'qhnet':  # explicit mixing maps hold the element
        written_config.model.mixing = True
    for name, form, step in (('aligned', aligned, restored_b.step),
                             ('midpoint', midpoint, restored_a.step)):
        checkpoints.save_variables(outputs[name], step, symmetry.unfold(spec, form),
                                   written_config)
    _, reloaded_config, reloaded = checkpoints.restore_variables(outputs['midpoint'])
    return {
        'workdir': workdir, 'other': FLAGS.other, 'output_workdir': output_workdir,
        'steps': [int(restored_a.step), int(restored_b.step)], 'match': FLAGS.match,
        'gl': FLAGS.gl, 'repair': FLAGS.repair, 'calibration_images': int(len(images)),
        'invariance': invariance,
        'curves': curves,
        'barriers': {name: align.barriers(c) for name, c in curves.items()},
        'match_residuals': align.residuals(spec, form_a, form_b, element, images),
        'midpoint_top1': evaluation.evaluate(reloaded_config, reloaded, dataset=dataset)['top1'],
    }


def align_report(summary: dict) -> list[str]:
    """What `align` prints: top-1 and loss along each line, the barriers, the invariance."""
    names = list(summary['curves'])
    lines = ['alpha  ' + '  '.join(f'{name:>24}' for name in names)]
    for i, alpha in enumerate(summary['curves'][names[0]]['alpha']):
        lines.append(f'{alpha:5.2f}  ' + '  '.join(
            f'top-1 {c["top1"][i]:.4f} loss {c["loss"][i]:6.3f}'.rjust(24)
            for c in summary['curves'].values()))
    lines += [f'{name}: barrier {b["top1"] * 100:.2f} points of top-1, {b["loss"]:.4f} of loss'
              for name, b in summary['barriers'].items()]
    check = summary['invariance']
    lines.append(f'aligned B\'s logits moved by {check["error"]:.2e} (tolerance '
                 f'{check["tolerance"]:.2e}) on {check["num_images"]} test images: '
                 + ('same function' if check['invariant'] else 'NOT THE SAME FUNCTION'))
    return lines + [f'wrote OUT/aligned, OUT/midpoint (test top-1 {summary["midpoint_top1"]:.4f}) '
                    f'and align.json, OUT = {summary["output_workdir"]}']
