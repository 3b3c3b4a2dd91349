"""Slicing through the group against channel pruning, on the Fashion-MNIST main model.

    python -m experiments.slicing --workdirs W0 W1 [--identity_workdirs I0 I1] \
        [--resnet_workdirs R0 R1] [--removed 0 0.02 0.05 0.1 0.2 0.3 0.4 0.5 0.6] \
        [--finetune_removed 0.3 0.5] [--finetune_epochs 1]    # -> experiments/slicing/results.*

For each trained workdir (`python -m qhnet.main --config=configs/eq3_softball.py:fashion_mnist`,
one per seed; `--identity_workdirs`: the same with `--config.model.activation=identity`, GL
streams), it calibrates on the first 512 training images (`qhnet.symmetry.slicing`) and,
for each fraction of the parameters to remove, finds the largest `keep` (the same fraction
of every stream but the stem's, which stays whole: `slicing.kept_widths`) that removes at
least that much, slices with each method

    rotate     rotate each O(n)/GL(n) stream to its principal axes, then delete
    select     (a) the same deletion without rotation: the channels of largest variance
    magnitude  (b) the channels whose weights have the largest L2 norm

(the same kept widths for all three, so the same parameter count), and evaluates test top-1
without fine-tuning. At `--finetune_removed` it fine-tunes 'rotate' and 'select' for
`--finetune_epochs` with the training loop (`config.init_from`), with the recipe's schedule
at `--finetune_lr_factor` (0.1) times its peak learning rate. `--resnet_workdirs`
(`configs/resnet50.py:fashion_mnist`) is baseline (c): the ResNet50 of the same recipe, whose
group has only permutations and scalings, pruned by (a) and (b) in every stream. Writes
experiments/slicing/results.md, results.json and results.png (top-1 against the fraction of
parameters removed) beside this file (`--out`: another path stem); the markdown opens with
the command, the device and the date, and the JSON holds them too.
"""

import argparse
import json
import os
import tempfile

from qhnet import allocator

allocator.reuse_freed_memory()  # before JAX starts: the fine-tuning runs train in this process

import jax  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from benchmarks import timing  # noqa: E402
from qhnet import data, models, params, training  # noqa: E402
from qhnet.symmetry import baseline_family, slicing  # noqa: E402
from qhnet.symmetry.checks import first_images  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = 'experiments.slicing'
METHODS = ('rotate', 'select', 'magnitude')


def param_count(model_config) -> int:
    return params.count_params(models.build(model_config), (28, 28, 1))


def keep_for(config, spec, removed: float) -> float:
    """The largest keep (on a grid of 1/256) whose sliced model has at most (1 - removed) of
    the original's parameters; 1.0 for removed = 0."""
    if removed <= 0:
        return 1.0
    stages = slicing.stage_streams(spec, config.model)

    def params_at(keep):
        kept = slicing.kept_widths(spec, keep)
        return param_count(slicing.sliced_config(config, [kept[name] for name in stages]).model)

    return largest_keep(params_at, (1 - removed) * param_count(config.model))


def largest_keep(params_at, budget: float) -> float:
    """The largest keep on a grid of 1/256 whose model has at most `budget` parameters
    (`params_at(keep)`); 1/256 if none has."""
    return next((step / 256 for step in range(256, 0, -1) if params_at(step / 256) <= budget),
                1 / 256)


def finetune(sliced: slicing.Sliced, epochs: int, lr_factor: float, step: int,
             directory: str) -> float:
    """Test top-1 after fine-tuning the sliced model for `epochs` (from its variables), with the
    recipe's schedule at `lr_factor` times its peak learning rate."""
    source = os.path.join(directory, 'sliced')
    training.save_variables(source, step, sliced.variables, sliced.config)
    config = sliced.config.copy_and_resolve_references()
    config.init_from, config.num_epochs, config.progress_bar = source, epochs, False
    config.optimizer.base_lr *= lr_factor
    return training.train_and_evaluate(config, os.path.join(directory, 'run'))['test_top1']


def run_resnet(workdir: str, args) -> list[dict]:
    """Baseline (c): the ResNet50 of the same recipe, every stream (residual and hidden) cut
    by 'select' and 'magnitude' at the largest keep that removes each target (no rotation: its
    group has none); parameters are those of the folded form."""
    _, config, variables = training.restore_variables(workdir)
    dataset = data.open_dataset(config.data)
    images = first_images(dataset, 'train', args.calibration_images)
    calibration = slicing.calibrate(config, variables, images)
    spec, form = calibration.spec, calibration.form
    params_before = slicing.count_form_params(form)

    def top1(pruned):
        pruned = jax.tree.map(lambda x: np.asarray(x, np.float32), pruned)
        return training.evaluate(config, pruned, dataset=dataset,
                              logits_fn=lambda f, x: baseline_family.apply(spec, f, x))['top1']

    def params_at(keep):
        kept = slicing.kept_widths(spec, keep)
        return slicing.count_form_params(slicing.slice_form(spec, form, kept))

    before, rows = top1(form), []
    for removed in args.removed:
        keep = largest_keep(params_at, (1 - removed) * params_before)
        for method in ('select', 'magnitude'):
            pruned, kept = slicing.prune(calibration, keep, method)
            row = dict(model='ResNet50', workdir=workdir, seed=int(config.seed),
                       removed_target=removed, keep=keep, method=method,
                       stream_widths=[kept[name] for name in _stage_streams(spec)],
                       params_before=params_before,
                       params_after=slicing.count_form_params(pruned),
                       top1_before=before, top1_after=top1(pruned))
            row['removed'] = 1 - row['params_after'] / params_before
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def _stage_streams(spec) -> list[str]:
    """A ResNet50's residual streams (the stem's and each stage's), in order."""
    blocks = {block.name for block in spec.structure.blocks}
    return [s.name for s in spec.streams if s.name == 'stem' or s.name in blocks]


def run_model(workdir: str, label: str, args) -> list[dict]:
    step, config, variables = training.restore_variables(workdir)
    dataset = data.open_dataset(config.data)
    images = first_images(dataset, 'train', args.calibration_images)
    calibration = slicing.calibrate(config, variables, images)
    before = training.evaluate(config, variables, dataset=dataset)['top1']
    params_before = slicing.count_params(variables)
    rows = []
    for removed in args.removed:
        keep = keep_for(config, calibration.spec, removed)
        for method in METHODS:
            sliced = slicing.slice_variables(config, variables, images, keep, method, calibration)
            row = dict(model=label, workdir=workdir, seed=int(config.seed),
                       removed_target=removed, keep=keep, method=method,
                       stream_widths=list(sliced.config.model.stream_widths),
                       params_before=params_before,
                       params_after=slicing.count_params(sliced.variables),
                       top1_before=before,
                       top1_after=training.evaluate(sliced.config, sliced.variables,
                                                 dataset=dataset)['top1'],
                       explained_variance=[s.explained_variance for s in sliced.streams])
            if removed in args.finetune_removed and method != 'magnitude' and args.finetune_epochs:
                with tempfile.TemporaryDirectory() as directory:
                    row['top1_finetuned'] = finetune(sliced, args.finetune_epochs,
                                                   args.finetune_lr_factor, step, directory)
            row['removed'] = 1 - row['params_after'] / params_before
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def markdown(report: dict) -> str:
    unsliced = {row['model']: row['stream_widths'] for row in report['rows']
                if row['keep'] == 1.0}
    lines = ['# Slicing through the group against channel pruning', '',
             timing.provenance_line(report), '',
             'Fashion-MNIST main model (Eq. (3) softball@ds), its identity-activation twin '
             'and the small-input ResNet50 of the same recipe, trained by '
             '`python -m qhnet.main`; unsliced stream widths '
             f'{"; ".join(f"{model} {widths}" for model, widths in unsliced.items())}. '
             'Calibration on the first '
             f'{report["calibration_images"]} training images; test top-1 on the 10,000 test '
             'images, no fine-tuning unless a column says so. `keep` is the fraction of every '
             'stream kept but the stem\'s, which stays whole, the largest that removes the '
             'target fraction of parameters; the methods keep the same widths, so the same '
             'parameters. ResNet50: every stream (residual and hidden) at that fraction; its '
             'group has no rotation, and its parameters are those of the folded form. '
             'Stream widths: the residual streams, the stem\'s first. '
             f'{report["note"]}', '',
             '| model | seed | params removed | keep | stream widths | rotate | select (a) '
             '| magnitude (b) | rotate, fine-tuned | select, fine-tuned |',
             '|---|---:|---:|---:|---|---:|---:|---:|---:|---:|']
    groups = {}
    for row in report['rows']:
        key = (row['model'], row['seed'], row['removed_target'])
        groups.setdefault(key, {})[row['method']] = row
    for (model, seed, _), by_method in groups.items():
        first = next(iter(by_method.values()))

        def cell(method, key='top1_after'):
            value = by_method.get(method, {}).get(key)
            return f'{100 * value:.2f}' if value is not None else '-'
        lines.append(f'| {model} | {seed} | {100 * first["removed"]:.1f}% | '
                     f'{first["keep"]:.3f} | '
                     f'{first["stream_widths"]} | {cell("rotate")} | {cell("select")} | '
                     f'{cell("magnitude")} | {cell("rotate", "top1_finetuned")} | '
                     f'{cell("select", "top1_finetuned")} |')
    lines += ['', '## At most 1.0 point of top-1 lost', '',
              'The largest fraction of parameters removed (on the grid above) whose top-1, the '
              'mean over seeds, is at most 1.0 point below the unsliced model\'s, without '
              'fine-tuning:', '', '| model | method | parameters removed |', '|---|---|---:|']
    lines += [f'| {model} | {method} | {100 * removed:.1f}% |'
              for model, method, removed in frontier(report)]
    return '\n'.join(lines) + '\n'


def frontier(report: dict, max_loss: float = 0.01) -> list[tuple[str, str, float]]:
    """(model, method, the largest fraction of parameters removed whose top-1, the mean over
    seeds, is at most `max_loss` below the unsliced model's), without fine-tuning."""
    found = []
    for model in dict.fromkeys(row['model'] for row in report['rows']):
        for method in METHODS:
            rows = [r for r in report['rows'] if r['model'] == model and r['method'] == method]
            if not rows:
                continue
            best = 0.0
            for target in sorted({r['removed_target'] for r in rows}):
                at = [r for r in rows if r['removed_target'] == target]
                loss = np.mean([r['top1_before'] - r['top1_after'] for r in at])
                if loss <= max_loss:
                    best = max(best, float(np.mean([r['removed'] for r in at])))
            found.append((model, method, best))
    return found


def plot(report: dict, path: str) -> None:
    models_seen = sorted({row['model'] for row in report['rows']})
    figure = Figure(figsize=(5.5 * len(models_seen), 4))  # not pyplot's: no global backend
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(models_seen), squeeze=False)
    for axis, model in zip(axes[0], models_seen):
        for method, style in zip(METHODS, ('o-', 's--', '^:')):
            rows = [r for r in report['rows'] if r['model'] == model and r['method'] == method]
            if not rows:
                continue
            fractions = sorted({r['removed_target'] for r in rows})
            mean = [np.mean([r['top1_after'] for r in rows if r['removed_target'] == f])
                    for f in fractions]
            removed = [np.mean([r['removed'] for r in rows if r['removed_target'] == f])
                       for f in fractions]
            axis.plot(100 * np.array(removed), 100 * np.array(mean), style, label=method)
        axis.set(title=model, xlabel='parameters removed (%)',
                 ylabel='test top-1 (%), mean of seeds, no fine-tuning')
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--workdirs', nargs='*', default=[])
    parser.add_argument('--identity_workdirs', nargs='*', default=[])
    parser.add_argument('--resnet_workdirs', nargs='*', default=[])
    parser.add_argument('--removed', type=float, nargs='+',
                        default=[0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    parser.add_argument('--finetune_removed', type=float, nargs='*', default=[0.3, 0.5])
    parser.add_argument('--finetune_epochs', type=int, default=1)
    parser.add_argument('--finetune_lr_factor', type=float, default=0.1,
                        help='fine-tuning: this times the recipe\'s peak learning rate')
    parser.add_argument('--calibration_images', type=int, default=512)
    parser.add_argument('--rows_from', nargs='*', default=[],
                        help='earlier results.json files: their rows are kept, and their '
                             'workdirs not run again')
    parser.add_argument('--note', default='')
    parser.add_argument('--out', default=os.path.join(HERE, 'slicing', 'results'),
                        help='path stem of the .md, .json and .png results (default: '
                             'experiments/slicing/results)')
    args = parser.parse_args(argv)
    rows = []
    for path in args.rows_from:
        with open(path, encoding='utf-8') as f:
            rows += json.load(f)['rows']
    done = {row['workdir'] for row in rows}
    for label, workdirs in (('softball@ds', args.workdirs), ('identity', args.identity_workdirs),
                            ('ResNet50', args.resnet_workdirs)):
        for workdir in workdirs:
            if workdir not in done:
                rows += (run_resnet(workdir, args) if label == 'ResNet50'
                         else run_model(workdir, label, args))
    report = dict(**timing.provenance_fields(MODULE, argv),
                  calibration_images=args.calibration_images, finetune_epochs=args.finetune_epochs, finetune_lr_factor=args.finetune_lr_factor,
                  note=args.note, rows=rows)
    text = markdown(report)
    print(text)
    timing.write_report(args.out, text, report)
    plot(report, args.out + '.png')


if __name__ == '__main__':
    main()
