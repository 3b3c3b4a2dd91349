"""Low-bit quantization through the symmetry, on the Fashion-MNIST models.

    python -m experiments.quantize --workdirs W0 W1 W2 [--identity_workdirs I0 I1] \
        [--resnet_workdirs R0 R1] [--bits w8a8 w4a8 w4a4] [--learn_steps 100]
        # -> experiments/quantize/results.{md,json,png}

For each trained workdir (`python -m qhnet.main --config=configs/eq3_softball.py:fashion_mnist`,
one per seed; `--identity_workdirs`: the same with `--config.model.activation=identity`, GL
streams; `--resnet_workdirs`: `configs/resnet50.py:fashion_mnist`, whose relu streams admit no
rotation), it quantizes the newest checkpoint with every transform at every bit width
(`qhnet.symmetry.quantize`, calibrated on the first 512 training images) and evaluates test
top-1 on the whole test split. The report gives, per model, transform and bits, the mean and
spread over seeds and the gap to the float model; the bars of the quantization issue checked
on the main model; a plot of top-1 against bits per transform (`results.png`); and, on the
first main workdir at the lowest bits, each activation point's max/RMS ratio and rounding
error under each transform: what a rotation changes and what it cannot.
"""

import argparse
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

from benchmarks import timing
from qhnet import data, symmetry
from qhnet.symmetry import quantize
from qhnet.symmetry.families import tap_streams
from qhnet.symmetry.checks import first_images
from qhnet.training import checkpoints, evaluation

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = 'experiments.quantize'
ROTATING = ('none', 'smooth', 'random', 'hadamard', 'learned', 'smooth+hadamard', 'smooth+learned')
LABELS = {'softball@ds': ROTATING, 'identity': ROTATING, 'ResNet50': ('none', 'smooth')}


def point_groups(spec, points) -> dict[str, list[str]]:
    """The activation points by kind: block inputs on streams that admit a rotation, the other
    block inputs (relu streams), products (QHNet) or hidden activations (ResNet50), pooled."""
    rotatable = {s.name for s in quantize.rotatable(spec)}
    streams = tap_streams(spec)
    groups = {'inputs, rotatable streams': [], 'inputs, other streams': [],
              'products or hidden': [], 'pooled': ['pooled']}
    for point in points:
        if point.endswith('/input'):
            kind = 'rotatable' if streams[point] in rotatable else 'other'
            groups[f'inputs, {kind} streams'].append(point)
        elif point != 'pooled':
            groups['products or hidden'].append(point)
    return groups


def attribution(spec, moved, quantized, config, dataset) -> dict[str, float]:
    """Test top-1 with one part quantized alone (the rest float): the weights, or the
    activations of one group of points at their calibrated ranges."""
    evaluate = quantize.logits_fn(spec, quantized.bits)
    out = {'weights': {'form': quantized.form, 'ranges': {}}}
    for name, points in point_groups(spec, quantized.ranges).items():
        if points:
            out[name] = {'form': moved, 'ranges': {p: quantized.ranges[p] for p in points}}
    return {name: 100 * evaluation.evaluate(config, variables, logits_fn=evaluate,
                                            dataset=dataset)['top1']
            for name, variables in out.items()}


def run_workdir(workdir: str, label: str, args, progress) -> dict:
    restored = checkpoints.restore_variables(workdir)
    spec = symmetry.group_spec(restored, tie_identity_shortcuts=True)
    form = symmetry.fold(spec, restored)
    dataset = data.open_dataset(restored.config.data)
    images = first_images(dataset, 'train', args.calibration_images)
    result = {'workdir': workdir, 'label': label, 'step': int(restored.step),
              'float_top1': 100 * evaluation.evaluate(restored.config, restored.variables,
                                                      dataset=dataset)['top1'],
              'top1': {}, 'points': {}}
    for bits in args.bits:
        for transform in LABELS[label]:
            progress.set_postfix_str(f'{label} {os.path.basename(workdir)} {bits} {transform}')
            quantized = quantize.quantize(spec, form, images, bits, transform,
                                          steps=args.learn_steps)
            top1 = evaluation.evaluate(restored.config, quantized.variables(),
                                       logits_fn=quantize.logits_fn(spec, bits),
                                       dataset=dataset)['top1']
            result['top1'][f'{transform} {bits}'] = 100 * top1
            if bits == args.bits[-1]:
                moved = symmetry.act(spec, form, quantized.element)
                result['points'][transform] = {
                    'peak_to_rms': quantize.peak_to_rms(spec, moved, images),
                    'error': quantized.activation_errors,
                    'alone': attribution(spec, moved, quantized, restored.config, dataset)}
            progress.update()
    return result


def rows(report: dict) -> list[dict]:
    """Per model, transform and bits: top-1 per seed, mean, spread, gap to the float mean."""
    out = []
    for label, transforms in LABELS.items():
        runs = [r for r in report['runs'] if r['label'] == label]
        if not runs:
            continue
        float_mean = float(np.mean([r['float_top1'] for r in runs]))
        out.append(dict(label=label, transform='float', bits='-',
                        seeds=[r['float_top1'] for r in runs], mean=float_mean,
                        spread=float(np.ptp([r['float_top1'] for r in runs])), gap=0.0))
        for bits in report['bits']:
            for transform in transforms:
                seeds = [r['top1'][f'{transform} {bits}'] for r in runs]
                out.append(dict(label=label, transform=transform, bits=bits, seeds=seeds,
                                mean=float(np.mean(seeds)), spread=float(np.ptp(seeds)),
                                gap=float_mean - float(np.mean(seeds))))
    return out


def bars(table: list[dict]) -> list[tuple[str, bool, str]]:
    """The issue's bars on the main model: (claim, met, measured)."""
    main = {(r['transform'], r['bits']): r for r in table if r['label'] == 'softball@ds'}
    found = []
    if ('learned', 'w4a4') in main:
        learned, none = main['learned', 'w4a4'], main['none', 'w4a4']
        found.append(('W4A4 learned within 1.0 point of float (mean over seeds)',
                      learned['gap'] <= 1.0, f'gap {learned["gap"]:.2f}'))
        closed = 1 - learned['gap'] / none['gap'] if none['gap'] > 0 else float('nan')
        found.append(('W4A4 learned closes at least half of the gap that none leaves',
                      closed >= 0.5, f'none {none["gap"]:.2f}, learned {learned["gap"]:.2f}: '
                      f'{100 * closed:.0f}% closed'))
    w8 = [r for (t, b), r in main.items() if b == 'w8a8']
    if w8:
        worst = max(w8, key=lambda r: r['gap'])
        found.append(('W8A8: every transform within 0.3 points of float',
                      worst['gap'] <= 0.3,
                      f'largest gap {worst["gap"]:.2f} ({worst["transform"]})'))
    return found


def markdown(report: dict) -> str:
    table = rows(report)
    lines = ['# Quantization through the symmetry', '', timing.provenance_line(report), '',
             'Weights: symmetric per-output-channel integers, round to nearest. Activations: '
             'static per-tensor integers at every value a linear map reads after a '
             f'nonlinearity, calibrated on {report["calibration_images"]} training images. '
             'Transforms are group elements applied before rounding (exact in float); '
             f'`learned` ran {report["learn_steps"]} Adam steps. Test top-1 (%) on the whole '
             'Fashion-MNIST test split; gap = float mean - mean.', '',
             '| model | transform | bits | top-1 per seed | mean | spread | gap |',
             '|---|---|---|---|---:|---:|---:|']
    for r in table:
        seeds = ', '.join(f'{v:.2f}' for v in r['seeds'])
        lines.append(f'| {r["label"]} | {r["transform"]} | {r["bits"]} | {seeds} | '
                     f'**{r["mean"]:.2f}** | {r["spread"]:.2f} | {r["gap"]:.2f} |')
    lines += ['', '## The bars, on the main model (softball@ds)', '']
    for claim, met, measured in bars(table):
        lines.append(f'- {claim}: **{"met" if met else "missed"}** ({measured})')
    lines += ['', f'## Which rounding costs the accuracy, at {report["bits"][-1]}', '',
              'Test top-1 (%, mean over seeds) with one part quantized alone and the rest in '
              'float: the weights, or one group of activation points at its calibrated range. '
              'Rotations reach the block inputs on streams that admit O(n) and the pooled '
              'features; the products (hidden channels) and the relu streams admit only '
              'permutations and scalings.', '']
    for label in LABELS:
        runs = [r for r in report['runs'] if r['label'] == label]
        if not runs:
            continue
        parts = list(runs[0]['points'][next(iter(runs[0]['points']))]['alone'])
        lines += [f'| {label}: transform | float | all | ' + ' | '.join(parts) + ' |',
                  '|---|' + '---:|' * (len(parts) + 2)]
        float_mean = np.mean([r['float_top1'] for r in runs])
        for transform in runs[0]['points']:
            everything = np.mean([r['top1'][f'{transform} {report["bits"][-1]}'] for r in runs])
            alone = [np.mean([r['points'][transform]['alone'][p] for r in runs]) for p in parts]
            lines.append(f'| {transform} | {float_mean:.2f} | {everything:.2f} | '
                         + ' | '.join(f'{v:.2f}' for v in alone) + ' |')
        lines.append('')
    first = next(r for r in report['runs'] if r['label'] == 'softball@ds')
    points = first['points']
    transforms = list(points)
    lines += ['', f'## Activation points at {report["bits"][-1]}, {first["workdir"]}', '',
              'max|x| / rms(x) of each quantized point on the calibration images, and the '
              'relative rounding error there, under each transform. A stream rotation changes '
              'the block inputs (on O(n) streams) and the pooled features; the products are '
              'hidden channels, which no stream element reaches: only their scalings do.', '',
              '| point | ' + ' | '.join(f'{t} max/rms' for t in transforms) + ' | '
              + ' | '.join(f'{t} error' for t in transforms) + ' |',
              '|---|' + '---:|' * (2 * len(transforms))]
    for point in points[transforms[0]]['error']:
        ratio = ' | '.join(f'{points[t]["peak_to_rms"][point]:.1f}' for t in transforms)
        error = ' | '.join(f'{points[t]["error"][point]:.3f}' for t in transforms)
        lines.append(f'| {point} | {ratio} | {error} |')
    return '\n'.join(lines + [''])


def plot(report: dict, path: str) -> None:
    table = rows(report)
    labels = [label for label in LABELS if any(r['label'] == label for r in table)]
    figure = Figure(figsize=(4.5 * len(labels), 3.8))
    FigureCanvasAgg(figure)
    for i, label in enumerate(labels):
        axes = figure.add_subplot(1, len(labels), i + 1)
        mine = [r for r in table if r['label'] == label]
        float_mean = next(r['mean'] for r in mine if r['transform'] == 'float')
        axes.axhline(float_mean, color='black', linestyle=':', label='float')
        for transform in LABELS[label]:
            points = [r for r in mine if r['transform'] == transform]
            axes.errorbar(range(len(points)), [r['mean'] for r in points],
                          yerr=[r['spread'] / 2 for r in points], marker='o', capsize=3,
                          label=transform)
        axes.set_xticks(range(len(report['bits'])), report['bits'])
        axes.set_title(label)
        axes.set_ylabel('test top-1 (%)')
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--workdirs', nargs='+', required=True)
    parser.add_argument('--identity_workdirs', nargs='*', default=[])
    parser.add_argument('--resnet_workdirs', nargs='*', default=[])
    parser.add_argument('--bits', nargs='+', default=['w8a8', 'w4a8', 'w4a4'])
    parser.add_argument('--learn_steps', type=int, default=100)
    parser.add_argument('--calibration_images', type=int, default=512)
    parser.add_argument('--out', default=os.path.join(HERE, 'quantize', 'results'))
    args = parser.parse_args(argv)
    for bits in args.bits:
        quantize.parse_bits(bits)
    jobs = [(w, 'softball@ds') for w in args.workdirs] + \
        [(w, 'identity') for w in args.identity_workdirs] + \
        [(w, 'ResNet50') for w in args.resnet_workdirs]
    report = dict(**timing.provenance_fields(MODULE, argv), bits=args.bits,
                  learn_steps=args.learn_steps, calibration_images=args.calibration_images,
                  runs=[])
    total = sum(len(args.bits) * len(LABELS[label]) for _, label in jobs)
    with tqdm(total=total, desc='quantize', unit='model') as progress:
        for workdir, label in jobs:
            report['runs'].append(run_workdir(workdir, label, args, progress))
    text = markdown(report)
    timing.write_report(args.out, text, report)
    plot(report, args.out + '.png')
    print(text)


if __name__ == '__main__':
    main()
