"""Aligning two trained models through the group, and the loss barrier on the line between them.

    python -m experiments.align --workdirs W0 W1 W2 [--identity_workdirs I0 I1 I2] \
        [--resnet_workdirs R0 R1 R2] [--calibration_images 512]
        # -> experiments/align/results.{md,json,png}

Each list holds trained workdirs of one config that differ in the seed
(`python -m qhnet.main --config=configs/eq3_softball.py:fashion_mnist --config.seed=S`; the
identity model adds `--config.model.activation=identity`, GL streams; the ResNet50 is
`configs/resnet50.py:fashion_mnist`, whose relu streams admit permutations and scalings only).
For every pair of seeds, B is aligned to A (`qhnet.symmetry.align`, calibrated on the first
512 training images, identity shortcuts tied) with permutations only (Git Re-Basin's activation
matching) and with each set's own group, and the line between A and B is evaluated on the whole
test split: naive, aligned (11 values of alpha) and aligned with REPAIR's correction (5 values).
The report gives each method's loss and top-1 barriers, mean and spread over the pairs; the
bars of the alignment issue on the main model; where the barrier comes from on the first pair
(A with one layer moved halfway to the aligned B, and how well each set's values match); and
the barrier curves (`results.png`).
"""

import argparse
import itertools
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

from benchmarks import timing
from qhnet import data, symmetry
from qhnet.symmetry import align
from qhnet.symmetry.checks import first_images
from qhnet.training import checkpoints, evaluation

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = 'experiments.align'
REPAIR_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
# (method, match, REPAIR): the rows of the table.
METHODS = (('naive', None, False), ('permutation', 'permutation', False),
           ('group', 'group', False), ('permutation + REPAIR', 'permutation', True),
           ('group + REPAIR', 'group', True))


def run_pair(workdir_a: str, workdir_b: str, label: str, args, progress) -> dict:
    restored_a, restored_b = (checkpoints.restore_variables(w) for w in (workdir_a, workdir_b))
    spec = symmetry.group_spec(restored_a, tie_identity_shortcuts=True)
    form_a, form_b = (symmetry.fold(spec, r) for r in (restored_a, restored_b))
    dataset = data.open_dataset(restored_a.config.data)
    images = first_images(dataset, 'train', args.calibration_images)
    evaluate = evaluation.evaluator(restored_a.config, dataset=dataset,
                                    logits_fn=lambda f, x: symmetry.apply(spec, f, x))
    ends = [evaluate(form_a), evaluate(form_b)]
    result = {'label': label, 'workdirs': [workdir_a, workdir_b], 'curves': {}, 'barriers': {},
              'residuals': {}, 'layers': {}}
    aligned = {}
    for method, match, repaired in METHODS:
        progress.set_postfix_str(f'{label} {method}')
        if match and match not in aligned:
            element = align.align(spec, form_a, form_b, images, method=match)
            aligned[match] = symmetry.act(spec, form_b, element)
            result['residuals'][match] = align.residuals(spec, form_a, form_b, element, images)
        end = aligned[match] if match else form_b
        alphas = REPAIR_ALPHAS if repaired else align.ALPHAS
        correct = align.repairer(spec, form_a, end, images) if repaired else None
        inner = align.curve(form_a, end, evaluate, alphas[1:-1], correct=correct)
        curve = {'alpha': list(alphas),
                 **{key: [ends[0][key]] + inner[key] + [ends[1][key]] for key in ('loss', 'top1')}}
        result['curves'][method] = curve
        result['barriers'][method] = align.barriers(curve)
        progress.update()
    if args.layers:
        for match, end in aligned.items():
            progress.set_postfix_str(f'{label} {match}: one layer at a time')
            result['layers'][match] = {}
            for layer in form_a:
                form = {**form_a, layer: align.interpolate({layer: form_a[layer]},
                                                           {layer: end[layer]}, 0.5)[layer]}
                result['layers'][match][layer] = evaluate(form)['top1']
    return result


def summary_rows(report: dict) -> list[dict]:
    """Per model and method: each barrier's mean and spread over the pairs, and the midpoint."""
    out = []
    for label in dict.fromkeys(r['label'] for r in report['pairs']):
        pairs = [p for p in report['pairs'] if p['label'] == label]
        for method, _, _ in METHODS:
            row = dict(label=label, method=method, pairs=len(pairs))
            for key in ('top1', 'loss'):
                values = [p['barriers'][method][key] for p in pairs]
                row[key] = float(np.mean(values))
                row[f'{key}_spread'] = float(np.ptp(values))
            middles = [p['curves'][method]['top1'][len(p['curves'][method]['alpha']) // 2]
                       - np.mean([p['curves'][method]['top1'][0], p['curves'][method]['top1'][-1]])
                       for p in pairs]
            row['midpoint_drop'] = -float(np.mean(middles))
            out.append(row)
    return out


def bars(rows: list[dict]) -> list[tuple[str, bool, str]]:
    """The issue's bars on the main model (softball@ds)."""
    main = {r['method']: r for r in rows if r['label'] == 'softball@ds'}
    if not main:
        return []
    group, permutation = main['group'], main['permutation']
    return [
        ('accuracy barrier after O(n) plus permutation alignment at most half the barrier after '
         'permutation-only alignment (mean over pairs)',
         group['top1'] <= permutation['top1'] / 2,
         f'group {100 * group["top1"]:.2f} points, permutation {100 * permutation["top1"]:.2f}'),
        ('midpoint of the group-aligned line within 1.0 point of the endpoints\' mean top-1, '
         'without statistic correction', group['midpoint_drop'] <= 0.01,
         f'{100 * group["midpoint_drop"]:.2f} points below')]


def network_order(name: str) -> tuple:
    """Stem first, then the blocks (each with its sets), then the head."""
    return (0 if name.startswith('stem') else 2 if name == 'head' else 1, name)


def markdown(report: dict) -> str:
    rows = summary_rows(report)
    lines = ['# Aligning two models through the group', '', timing.provenance_line(report), '',
             'B is aligned to A on the first {} training images; the line (1 - alpha) A + alpha '
             'B between the folded forms is evaluated on the whole Fashion-MNIST test split. '
             'Barrier: the largest drop of top-1 (points) below, or rise of the loss above, the '
             'straight line between the endpoints; midpoint: top-1 at alpha = 0.5 below the '
             'endpoints\' mean. Mean and spread (max - min) over the pairs of seeds.'.format(
                 report['calibration_images']), '',
             '| model | method | top-1 barrier | spread | loss barrier | spread | midpoint drop |',
             '|---|---|---:|---:|---:|---:|---:|']
    for r in rows:
        lines.append(f'| {r["label"]} | {r["method"]} | **{100 * r["top1"]:.2f}** | '
                     f'{100 * r["top1_spread"]:.2f} | {r["loss"]:.3f} | {r["loss_spread"]:.3f} | '
                     f'{100 * r["midpoint_drop"]:.2f} |')
    lines += ['', '## The bars, on the main model (softball@ds)', '']
    for claim, met, measured in bars(rows):
        lines.append(f'- {claim}: **{"met" if met else "missed"}** ({measured})')
    for label in dict.fromkeys(p['label'] for p in report['pairs']):
        first = next(p for p in report['pairs'] if p['label'] == label)
        if not first['layers']:
            continue
        matches = list(first['layers'])
        lines += ['', f'## Where the barrier comes from: {label}, {" and ".join(first["workdirs"])}',
                  '', 'Test top-1 (%) of A with one layer of its inference form moved halfway to '
                  'the aligned B (the rest is A\'s), and how well each set of channels matches '
                  '(|X_B T - X_A| / |X_A| on the calibration images, before and after alignment).',
                  '', '| layer | ' + ' | '.join(matches) + ' |', '|---|' + '---:|' * len(matches)]
        for layer in sorted(first['layers'][matches[0]], key=network_order):
            lines.append(f'| {layer} | ' + ' | '.join(
                f'{100 * first["layers"][m][layer]:.2f}' for m in matches) + ' |')
        lines += ['', '| set | before | ' + ' | '.join(f'after, {m}' for m in matches) + ' |',
                  '|---|---:|' + '---:|' * len(matches)]
        for name, values in sorted(first['residuals'][matches[0]].items(),
                                   key=lambda item: network_order(item[0])):
            lines.append(f'| {name} | {values["before"]:.2f} | ' + ' | '.join(
                f'{first["residuals"][m][name]["after"]:.2f}' for m in matches) + ' |')
    return '\n'.join(lines + [''])


def plot(report: dict, path: str) -> None:
    labels = list(dict.fromkeys(p['label'] for p in report['pairs']))
    figure = Figure(figsize=(4.5 * len(labels), 4.2))
    FigureCanvasAgg(figure)
    for i, label in enumerate(labels):
        axes = figure.add_subplot(1, len(labels), i + 1)
        pairs = [p for p in report['pairs'] if p['label'] == label]
        for method, _, _ in METHODS:
            alpha = pairs[0]['curves'][method]['alpha']
            top1 = 100 * np.array([p['curves'][method]['top1'] for p in pairs])
            axes.plot(alpha, top1.mean(0), marker='o', markersize=3, label=method)
            axes.fill_between(alpha, top1.min(0), top1.max(0), alpha=0.15)
        axes.set_title(label)
        axes.set_xlabel('alpha: (1 - alpha) A + alpha B')
        axes.set_ylabel('test top-1 (%)')
    figure.legend(*axes.get_legend_handles_labels(), loc='lower center', ncol=len(METHODS),
                  fontsize=8)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--workdirs', nargs='+', required=True)
    parser.add_argument('--identity_workdirs', nargs='*', default=[])
    parser.add_argument('--resnet_workdirs', nargs='*', default=[])
    parser.add_argument('--calibration_images', type=int, default=512)
    parser.add_argument('--no_layers', dest='layers', action='store_false',
                        help='skip the one-layer-at-a-time view of the first pair')
    parser.add_argument('--out', default=os.path.join(HERE, 'align', 'results'))
    args = parser.parse_args(argv)
    jobs = []
    for label, workdirs in (('softball@ds', args.workdirs), ('identity', args.identity_workdirs),
                            ('ResNet50', args.resnet_workdirs)):
        pairs = list(itertools.combinations(workdirs, 2))
        jobs += [(a, b, label, i == 0) for i, (a, b) in enumerate(pairs)]
    report = dict(**timing.provenance_fields(MODULE, argv),
                  calibration_images=args.calibration_images, pairs=[])
    with tqdm(total=len(jobs) * len(METHODS), desc='align', unit='line') as progress:
        for workdir_a, workdir_b, label, first in jobs:
            layers = args.layers and first
            report['pairs'].append(run_pair(workdir_a, workdir_b, label,
                                            argparse.Namespace(**{**vars(args), 'layers': layers}),
                                            progress))
    text = markdown(report)
    timing.write_report(args.out, text, report)
    plot(report, args.out + '.png')
    print(text)


if __name__ == '__main__':
    main()
