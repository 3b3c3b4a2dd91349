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
< 1 and a model other than Eq. (3) or a QLNet.

  python -m qhnet.symmetry quantize --workdir=DIR --bits=w4a4 --transform=learned
      [--calibration_images=512] [--learn_steps=200] --output_workdir=OUT

quantizes the newest checkpoint of --workdir after the group element of --transform
(`qhnet.symmetry.quantize`, identity shortcuts tied) and writes OUT/quantized_form (orbax: the
form, the activation ranges, the bits) and OUT/quantize.json (top-1 before and after on the
test split, the error of every weight and activation point). It refuses, as `slice` does, a
bad --workdir or --output_workdir, and bad --bits, an unknown --transform, a rotation of a
model without a stream that admits one, and a model other than a QHNet or ResNet50.

  python -m qhnet.symmetry align --workdir=A --other=B [--match=group] [--repair]
      [--calibration_images=512] --output_workdir=OUT

aligns the newest checkpoint of --other (B) to that of --workdir (A) through the group
(`qhnet.symmetry.align`, identity shortcuts tied; --match=permutation: permutations only),
checks that the aligned B computes B's function on the first --num_images test images, and
evaluates the line between the models on the test split at 11 values of alpha, naive and
aligned (and, with --repair, aligned with REPAIR's correction of the statistics). It writes
OUT/aligned (B in A's coordinates) and OUT/midpoint (alpha = 0.5, repaired with --repair),
each a checkpoint of the model (`mixing=True` for a QHNet), and OUT/align.json: the curves,
their barriers, each set's match before and after, and the invariance check; the exit status
is 1 if the aligned B's logits moved by more than their tolerance. It refuses, as `slice`
does, a bad --workdir, --other or --output_workdir, and two models of different
architectures, widths or datasets, and a model whose logits are not finite.
"""

import json
import os
import sys

from absl import app
from absl import flags
import jax
import orbax.checkpoint as ocp

from qhnet import allocator, data, models, symmetry
from qhnet.symmetry import align, commands, quantize, slicing
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
flags.DEFINE_string('other', None, 'align: the workdir of model B, aligned to --workdir\'s.')
flags.DEFINE_enum('match', 'group', align.METHODS, 'align: match every set of channels through '
                  'its own group, or through permutations only (Git Re-Basin).')
flags.DEFINE_enum('gl', 'least_squares', align.GL_SOLVERS, 'align: how GL streams are matched.')
flags.DEFINE_bool('repair', False, 'align: also evaluate the aligned line with REPAIR\'s '
                  'correction of the statistics, and write the repaired midpoint.')
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


def run_and_report(run, default_output: str, summary_name: str, report) -> dict:
    """`run(--workdir, output_workdir)` (default: <workdir>/<default_output>), its summary written
    as JSON to <output_workdir>/<summary_name> and `report(summary)` printed, and returned; a
    `CommandError` exits with its one line."""
    try:
        output_workdir = FLAGS.output_workdir or os.path.join(FLAGS.workdir or '', default_output)
        summary = run(FLAGS.workdir, output_workdir)
    except CommandError as error:
        sys.exit(f'error: {error}')
    with open(os.path.join(output_workdir, summary_name), 'w') as f:
        json.dump(summary, f, indent=2)
    print('\n'.join(report(summary)))
    return summary


def main(argv: list[str]) -> None:
    if argv[1:] not in (['verify'], ['slice'], ['quantize'], ['align']):
        raise app.UsageError('usage: python -m qhnet.symmetry verify --workdir=DIR, '
                             'python -m qhnet.symmetry slice --workdir=DIR --keep=0.75 '
                             '--output_workdir=OUT, python -m qhnet.symmetry quantize '
                             '--workdir=DIR --bits=w4a4 --transform=learned, or python -m '
                             'qhnet.symmetry align --workdir=A --other=B --output_workdir=OUT; '
                             f'got {argv[1:]}')
    allocator.reuse_freed_memory()  # before JAX's backend starts its threads
    if argv[1] == 'slice':
        run_and_report(commands.run_slice, f'sliced_{FLAGS.method}_{FLAGS.keep:g}', 'slice.json',
                       commands.slice_report)
        return
    if argv[1] == 'quantize':
        run_and_report(commands.run_quantize, f'quantized_{FLAGS.bits}_{FLAGS.transform}',
                       'quantize.json', commands.quantize_report)
        return
    if argv[1] == 'align':
        summary = run_and_report(commands.run_align, f'aligned_{FLAGS.match}', 'align.json',
                                 commands.align_report)
        if not summary['invariance']['invariant']:
            sys.exit(1)
        return
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
