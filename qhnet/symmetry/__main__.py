"""Checks the symmetry on a trained checkpoint and writes a transformed copy of the model;
slices a trained model through its group; quantizes it.

  python -m qhnet.symmetry verify --workdir=DIR [--output_workdir=DIR/transformed] [--cond=10]

1. Restores the newest checkpoint in --workdir (`qhnet.training.restore_variables`) and
   folds it (`fold`) in float32, the checkpoint's precision.
2. Samples a random element of the group the model admits (`group_spec`, every
   stream's full group), reports the largest relative change of the logits on the
   first --num_images test images (`verify`), writes the transformed inference form
   (orbax, <output_workdir>/full_group_form), reads it back and evaluates it with
   `symmetry.apply` on the whole test split.
3. A QHNet (Flax) has no parameters for its identity shortcuts, so the full group's
   T_in^-1 T_out there has no place in it. Samples an element of the subgroup that keeps
   them the identity (`tie_identity_shortcuts=True`), verifies it the same way, writes
   the transformed model as a checkpoint of the same model with `mixing=True`
   (`unfold`) to --output_workdir, reads it back with `restore_variables`, and evaluates
   it and the original on the whole test split (`qhnet.training.evaluate`). For the
   baselines (ResNet50, MobileNetV3) the subgroup is the whole group and the model's
   config is unchanged: their layers hold any element as they are.

It prints a summary and writes it as JSON to <output_workdir>/symmetry.json; the exit
status is 1 if an element changed the logits by more than its tolerance. The written
checkpoint holds variables and config only (no optimizer state): evaluate it, do not
resume training from it. Its step, and the summary's, is the checkpoint restored: the
newest readable one.

Before any work it refuses, with one line 'error: <problem>; <fix>' and exit status 1: a
missing or empty --workdir, one that is not a directory or holds no readable checkpoint,
an --output_workdir that is --workdir or holds checkpoints of other steps, --num_images < 1,
--cond outside [1, MAX_CONDITION], and a model whose logits on the test images are not
finite.

  python -m qhnet.symmetry slice --workdir=DIR --keep=0.75 [--calibration_images=512]
      [--method=rotate] [--slice_stem] --output_workdir=OUT

slices the newest checkpoint of --workdir (`qhnet.symmetry.slicing`): every stream rotated
to the principal axes of its second moment on the first --calibration_images training
images and cut to round(keep * width) channels (--keep, a fraction of each stream; the
stem's stream keeps all of its channels unless --slice_stem). It
writes OUT as a workdir: a checkpoint of the sliced model (variables and config; evaluate
it, fold it, verify it), OUT/config.py, a config file that fine-tunes it (the recipe's
schedule at --finetune_lr_factor=0.1 times its peak learning rate),

  python -m qhnet.main --config=OUT/config.py --workdir=OUT/finetune --config.num_epochs=1

and OUT/slice.json: params_before, params_after, top1_before, top1_after (test split) and,
per stream, its width, the kept width, the explained variance and the FLOPs per image of
the arrays it names, before and after. It refuses, as `verify` does, a bad --workdir or
--output_workdir, and a --keep outside (0, 1], an unknown --method, --calibration_images
< 1 and a model other than Eq. (3).

  python -m qhnet.symmetry quantize --workdir=DIR --bits=w4a4 --transform=learned
      [--calibration_images=512] [--learn_steps=200] --output_workdir=OUT

quantizes the newest checkpoint of --workdir after the group element of --transform
(`qhnet.symmetry.quantize`, identity shortcuts tied) and writes OUT/quantized_form (orbax: the
form, the activation ranges, the bits) and OUT/quantize.json (top-1 before and after on the
test split, the error of every weight and activation point). It refuses, as `slice` does, a
bad --workdir or --output_workdir, and bad --bits, an unknown --transform, a rotation of a
model without a stream that admits one, and a model other than a QHNet or ResNet50.
"""

import json
import os
import sys

from absl import app
from absl import flags
import jax
import orbax.checkpoint as ocp

from qhnet import allocator, data, models, symmetry
from qhnet import config as qhnet_config
from qhnet.symmetry import quantize, slicing
from qhnet.symmetry.checks import CommandError, check_finite, check_output, first_images, restore
from qhnet.symmetry.action import MAX_CONDITION
from qhnet.training import checkpoints, evaluation

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'A training workdir holding checkpoints.')
flags.DEFINE_string('output_workdir', None, 'Where the transformed model goes '
                    '(default: <workdir>/transformed).')
flags.DEFINE_integer('seed', 0, 'Seed of the random group elements.')
flags.DEFINE_float('cond', 10.0, 'Condition number of the GL and scaled-permutation elements '
                   'and of the hidden-channel scales.')
flags.DEFINE_integer('num_images', 256, 'Test images on which the logits are compared.')
flags.DEFINE_float('keep', 0.75, 'slice: the fraction of each stream\'s channels kept.')
flags.DEFINE_bool('slice_stem', False, 'slice: cut the stem\'s stream too (by default it keeps '
                  'all of its channels: it admits no rotation and holds few parameters).')
flags.DEFINE_float('finetune_lr_factor', 0.1, 'slice: OUT/config.py fine-tunes with the '
                   'recipe\'s schedule at this times its peak learning rate.')
flags.DEFINE_integer('calibration_images', 512, 'slice, quantize: training images whose '
                     'stream moments choose the directions kept, or that calibrate the ranges.')
flags.DEFINE_bool('trust_unverified', False, 'Restore checkpoints that have no content digest '
                  'at all (checkpoint_digests/ deleted); they cannot be verified.')
flags.DEFINE_string('bits', 'w8a8', 'quantize: weight and activation bits, w<bits>a<bits> '
                    '(w8a8, w4a8, w4a4; each in 2..16).')
flags.DEFINE_string('transform', 'none', 'quantize: the group element applied before rounding: '
                    f'one of {", ".join(quantize.TRANSFORMS)}.')
flags.DEFINE_integer('learn_steps', 200, 'quantize: Adam steps of --transform=learned.')
flags.DEFINE_enum('method', 'rotate', slicing.METHODS, 'slice: rotate to the principal axes '
                  '(where the group allows), select channels by variance, or by weight norm.')

FORM_DIR = 'full_group_form'


def check(spec, form, images, key) -> tuple[dict, dict]:
    """(element, verify's report) for a random element of `spec`'s groups."""
    element = symmetry.sample(spec, key, cond=FLAGS.cond)
    return element, symmetry.verify(spec, form, element, images)


def run(workdir: str, output_workdir: str) -> dict:
    restored = restore(workdir, FLAGS.trust_unverified)
    step, config, variables = restored
    check_output(workdir, output_workdir, step)
    model = models.build(config.model)
    dataset = data.open_dataset(config.data)
    images = first_images(dataset, 'test', FLAGS.num_images)
    full, tied = symmetry.group_spec(model), symmetry.group_spec(model, tie_identity_shortcuts=True)
    form = symmetry.fold(full, restored)
    check_finite(full, form, images, step, variables)
    keys = jax.random.split(jax.random.key(FLAGS.seed))
    full_element, full_report = check(full, form, images, keys[0])
    form_path = os.path.join(os.path.abspath(output_workdir), FORM_DIR)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(form_path, symmetry.act(full, form, full_element), force=True)
        checkpointer.wait_until_finished()
        full_moved = checkpointer.restore(form_path)
    element, tied_report = check(tied, form, images, keys[1])
    moved = symmetry.unfold(tied, symmetry.act(tied, form, element))

    moved_config = config.copy_and_resolve_references()
    if moved_config.model.name == 'qhnet':  # the baselines' layers hold any element as they are
        moved_config.model.mixing = True
    checkpoints.save_variables(output_workdir, step, moved, moved_config)
    _, reloaded_config, reloaded = checkpoints.restore_variables(output_workdir)  # the step written
    return {
        'workdir': workdir, 'output_workdir': output_workdir, 'step': int(step),
        'num_images': int(len(images)),
        'streams': str(full), 'tied_streams': str(tied),
        'full_group': full_report, 'tied_group': tied_report,
        'evaluation': {
            'original': evaluation.evaluate(config, variables, dataset=dataset),
            'full_group_form': evaluation.evaluate(
                config, full_moved, logits_fn=lambda f, x: symmetry.apply(full, f, x),
                dataset=dataset),
            'transformed': evaluation.evaluate(reloaded_config, reloaded, dataset=dataset)},
    }


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
    if config.model.name != 'qhnet' or config.model.equation != 3:
        raise CommandError(f'slicing covers QHNets of Eq. (3) for now; {workdir} holds a '
                           f'{config.model.name} (equation {config.model.equation}); slice an '
                           'Eq. (3) model (configs/eq3_*.py)')
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


def run_and_report(run, default_output: str, summary_name: str, report) -> None:
    """`run(--workdir, output_workdir)` (default: <workdir>/<default_output>), its summary written
    as JSON to <output_workdir>/<summary_name> and `report(summary)` printed; a `CommandError`
    exits with its one line."""
    try:
        output_workdir = FLAGS.output_workdir or os.path.join(FLAGS.workdir or '', default_output)
        summary = run(FLAGS.workdir, output_workdir)
    except CommandError as error:
        sys.exit(f'error: {error}')
    with open(os.path.join(output_workdir, summary_name), 'w') as f:
        json.dump(summary, f, indent=2)
    print('\n'.join(report(summary)))


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


def main(argv: list[str]) -> None:
    if argv[1:] not in (['verify'], ['slice'], ['quantize']):
        raise app.UsageError('usage: python -m qhnet.symmetry verify --workdir=DIR, '
                             'python -m qhnet.symmetry slice --workdir=DIR --keep=0.75 '
                             '--output_workdir=OUT, or python -m qhnet.symmetry quantize '
                             f'--workdir=DIR --bits=w4a4 --transform=learned; got {argv[1:]}')
    allocator.reuse_freed_memory()  # before JAX's backend starts its threads
    if argv[1] == 'slice':
        return run_and_report(run_slice, f'sliced_{FLAGS.method}_{FLAGS.keep:g}', 'slice.json',
                              slice_report)
    if argv[1] == 'quantize':
        return run_and_report(run_quantize, f'quantized_{FLAGS.bits}_{FLAGS.transform}',
                              'quantize.json', quantize_report)
    try:
        if FLAGS.num_images < 1:
            raise CommandError(f'--num_images={FLAGS.num_images}: the check needs test images; '
                               'pass --num_images=N with N >= 1')
        if not 1 <= FLAGS.cond <= MAX_CONDITION:
            raise CommandError(f'--cond={FLAGS.cond:g} is outside [1, {MAX_CONDITION:g}], the '
                               'condition numbers the check has a tolerance for; pass one inside')
        output_workdir = FLAGS.output_workdir or os.path.join(FLAGS.workdir or '', 'transformed')
        summary = run(FLAGS.workdir, output_workdir)
    except CommandError as error:
        sys.exit(f'error: {error}')
    with open(os.path.join(output_workdir, 'symmetry.json'), 'w') as f:
        json.dump(summary, f, indent=2, default=float)
    print(f'streams of the full group:\n{summary["streams"]}\n'
          f'tied across identity shortcuts (written):\n{summary["tied_streams"]}')
    for name in ('full_group', 'tied_group'):
        r = summary[name]
        print(f'{name}: max relative change of the logits {r["error"]:.2e} '
              f'(tolerance {r["tolerance"]:.2e}, kappa {r["kappa"]:.3g}) on '
              f'{summary["num_images"]} test images: '
              + ('invariant' if r['invariant'] else 'NOT INVARIANT' if r['verifiable']
                 else r['note']))
    for name, result in summary['evaluation'].items():
        print(f'{name:>15}: top1 {result["top1"]:.4f}  top5 {result["top5"]:.4f}  '
              f'loss {result["loss"]:.4f}')
    tied = summary['streams'] != summary['tied_streams']
    written = ' (tied subgroup, model.mixing=True)' if tied else ''
    print(f'wrote the transformed model{written} to {output_workdir} and the '
          f'full group\'s transformed inference form to {os.path.join(output_workdir, FORM_DIR)}')
    if not (summary['full_group']['invariant'] and summary['tied_group']['invariant']):
        sys.exit(1)


if __name__ == '__main__':
    app.run(main)
