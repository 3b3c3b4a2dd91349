"""Micro-benchmark of the derivative operator K's implementations, layer by layer.

    python -m benchmarks.derivative                      # CPU defaults: batch 8
    python -m benchmarks.derivative --batch 256 --dtype bfloat16 --reps 20   # on a GPU
    python -m benchmarks.derivative --render benchmarks/results/cpu_2core/derivative.json

For every distinct K layer of the 224x224 network (resolution, width, stride; the
resolutions scaled to another `--image-size`) and every kernel layout (weight-shared
bank, per-channel kernels, Eq. (7)'s (j, k) channels), times each implementation of
`qhnet.models.derivative.depthwise_conv`:

- `fwd`: K alone, forward;
- `train`: K forward and backward (gradients for the input and the kernel);
- `block`: the Eq. (3) fragment around K, forward and backward:
  `(C u) * BN_d(K u)` with training-mode batch statistics, so that the elementwise
  product and the batchnorm take part in the fusion.

Eq. (3)'s whole product and its fused kernels: `python -m benchmarks.kernels`.

Layer times are summed with each layer's multiplicity in the network (16 blocks) to
give a per-network total. Candidates are timed interleaved in one process; medians
of `--reps` repetitions. Writes a markdown table (stdout and `--out`.md) and JSON
(`--out`.json); `--out` defaults to benchmarks/results/<device>/derivative
(`timing.device_slug()`: cpu_2core, gpu_h200, ...), overwritten by a rerun.
"""

import argparse
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from qhnet.models.derivative import DEFAULT_IMPL, IMPLEMENTATIONS, depthwise_conv

# (input resolution, input channels, stride, blocks with this K) for the 224x224 network:
# widths (64, 128, 256, 512), depths (3, 4, 6, 3), the first block of stages 2-4 strided.
LAYERS = (
    (56, 64, 1, 3),
    (56, 64, 2, 1),
    (28, 128, 1, 3),
    (28, 128, 2, 1),
    (14, 256, 1, 5),
    (14, 256, 2, 1),
    (7, 512, 1, 3),
)

# name -> (multiplier, shared, expand)
LAYOUTS = {
    'ws m=4 (Eq. 3)': (4, True, True),
    'no ws m=4 (Eq. 3 no ws)': (4, False, True),
    'no ws x6, (j,k) channels (Eq. 7)': (6, False, False),
}

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
MODULE = 'benchmarks.derivative'
MODES = ('fwd', 'train', 'block')


def batch_norm(d, scale=1.0, bias=0.0, epsilon=1e-5):
    """BN_d in training mode, in float32: d normalized by its batch moments over (B, H, W)."""
    d = d.astype(jnp.float32)
    mean = d.mean(axis=(0, 1, 2))
    var = jnp.square(d - mean).mean(axis=(0, 1, 2))
    return (d - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias


def make_case(batch, size, channels, stride, multiplier, shared, expand, dtype, seed=0):
    """Inputs and the three timed functions per implementation for one K layer."""
    rng = np.random.default_rng(seed)
    in_channels = channels if expand else channels * multiplier
    outputs = channels * multiplier
    stored = multiplier if shared else outputs
    ratio = multiplier if expand else 1
    out_size = (size - 1) // stride + 1
    u = jnp.asarray(rng.normal(size=(batch, size, size, in_channels)), dtype)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 1, stored)) / 3, jnp.float32)
    coef = jnp.asarray(rng.normal(size=(batch, out_size, out_size, outputs)), dtype)
    cotangent = jnp.asarray(rng.normal(size=(batch, out_size, out_size, outputs)), dtype)

    def forward(impl, u, kernel):
        return depthwise_conv(u, kernel, stride, channel_multiplier=ratio, impl=impl)

    def train(impl, u, kernel, cotangent):
        y, vjp = jax.vjp(functools.partial(forward, impl), u, kernel)
        return y, vjp(cotangent)  # y too: otherwise XLA drops the forward pass of a linear map

    def block(impl, u, kernel, coef, cotangent):
        def loss(u, kernel, coef):
            normed = batch_norm(forward(impl, u, kernel)).astype(dtype)
            return jnp.sum((coef * normed).astype(jnp.float32) * cotangent.astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2))(u, kernel, coef)

    fns = {}
    for impl in IMPLEMENTATIONS:
        fwd = jax.jit(functools.partial(forward, impl))
        trn = jax.jit(functools.partial(train, impl))
        blk = jax.jit(functools.partial(block, impl))
        fns[impl] = {
            'fwd': functools.partial(fwd, u, kernel),
            'train': functools.partial(trn, u, kernel, cotangent),
            'block': functools.partial(blk, u, kernel, coef, cotangent),
        }
    return fns


def progress(row, clock, impls) -> str:
    """One layer's medians, ms: each mode's per implementation."""
    parts = [f'{mode} ' + '/'.join(f'{timing.median(times[i][clock]) * 1e3:.2f}' for i in impls)
             for mode, times in row['times'].items()]
    return ', '.join(parts) + f' ms ({"/".join(impls)})'


def run(args) -> dict:
    dtype = DTYPES[args.dtype]
    impls = args.impls
    results = []
    for layout, (multiplier, shared, expand) in LAYOUTS.items():
        for size_at_224, channels, stride, count in LAYERS:
            # The stem divides the input by 4, each strided block by 2, rounding up.
            size = -(-size_at_224 * args.image_size // 224)
            row = dict(layout=layout, size=size, channels=channels, stride=stride, count=count,
                       times={})
            fns = make_case(args.batch, size, channels, stride, multiplier, shared, expand, dtype)
            for mode in args.modes:
                times = timing.interleaved({impl: fns[impl][mode] for impl in impls}, args.reps,
                                           slow_seconds=args.slow_seconds)
                row['times'][mode] = {impl: times[impl] for impl in impls}
            results.append(row)
            print(f'  {layout} {size}x{size}x{channels}/{stride}: {progress(row, args.clock, impls)}',
                  file=sys.stderr, flush=True)
    return dict(device=timing.device_name(), batch=args.batch, image_size=args.image_size,
                dtype=args.dtype, reps=args.reps, clock=args.clock,
                impls=impls, modes=args.modes, default_impl=DEFAULT_IMPL,
                load_average_at_end=timing.load_average(), layers=results)


def markdown(report: dict, note: str) -> str:
    impls, modes = report['impls'], report['modes']
    lines = [
        '# Derivative operator K: implementations compared',
        '',
        timing.provenance_line(report),
        '',
        f'Batch {report["batch"]}, {report["dtype"]}, '
        f'median of {report["reps"]} interleaved repetitions, milliseconds per call '
        f'({"process CPU time, all threads" if report["clock"] == "cpu" else "wall clock"}; '
        f'the JSON has both clocks). {note}',
        '',
        'Modes: `fwd` = K forward; `train` = K forward + backward (input and kernel '
        'gradients); `block` = the Eq. (3) fragment `(C u) * BN_d(K u)` forward + backward. '
        'C is the input width n; the Eq. (7) layout differentiates n*m channels.',
        '',
    ]
    header = '| layout | layer (HxWxC/stride) x count | ' + ' | '.join(
        f'{mode} {impl}' for mode in modes for impl in impls) + ' |'
    lines += [header, '|' + '---|' * (2 + len(modes) * len(impls))]
    totals = {}
    for row in report['layers']:
        cells = []
        for mode in modes:
            medians = {i: timing.median(row['times'][mode][i][report['clock']]) for i in impls}
            best = min(medians.values())
            for impl in impls:
                value = medians[impl] * 1e3
                cells.append(f'**{value:.2f}**' if medians[impl] == best else f'{value:.2f}')
                key = (row['layout'], mode, impl)
                totals[key] = totals.get(key, 0.0) + medians[impl] * row['count']
        lines.append(f'| {row["layout"]} | {row["size"]}x{row["size"]}x{row["channels"]}/{row["stride"]}'
                     f' x{row["count"]} | ' + ' | '.join(cells) + ' |')
    lines += ['', '**Per network** (sum over the 16 blocks, ms; in brackets, time relative to the '
              'fastest):', '',
              '| layout | mode | ' + ' | '.join(impls) + ' | fastest | next best / fastest |',
              '|' + '---|' * (4 + len(impls))]
    layouts = list(dict.fromkeys(row['layout'] for row in report['layers']))
    for layout in layouts:
        for mode in modes:
            values = {i: totals[(layout, mode, i)] for i in impls}
            ranked = sorted(values, key=values.get)
            best = values[ranked[0]]
            cells = [f'{values[i] * 1e3:.1f} ({values[i] / best:.1f}x)' for i in impls]
            runner_up = f'{values[ranked[1]] / best:.1f}x' if len(ranked) > 1 else ''
            lines.append(f'| {layout} | {mode} | ' + ' | '.join(cells) + f' | {ranked[0]} | {runner_up} |')
    return '\n'.join(lines) + '\n'


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--image-size', type=int, default=224,
                        help="the network's input size: K's layers at the resolutions it gives")
    parser.add_argument('--dtype', choices=sorted(DTYPES), default='float32')
    parser.add_argument('--reps', type=int, default=7)
    parser.add_argument('--impls', type=lambda s: s.split(','), default=list(IMPLEMENTATIONS))
    parser.add_argument('--clock', choices=('cpu', 'wall'), default=None,
                        help="'cpu': process CPU time, robust on a shared CPU (default on CPU); "
                             "'wall': wall clock (default on an accelerator)")
    parser.add_argument('--slow-seconds', type=float, default=20.0,
                        help='a candidate slower than this per call is timed once')
    parser.add_argument('--modes', type=lambda s: s.split(','), default=list(MODES),
                        help=f"','-separated, of {', '.join(MODES)}")
    parser.add_argument('--layouts', type=lambda s: s.split(','), default=None,
                        help='indices into the layout list (0: ws, 1: no ws, 2: Eq. 7)')
    parser.add_argument('--note', default='', help='free text for the table header (e.g. "shared machine")')
    parser.add_argument('--out', default=None,
                        help='path stem for .md and .json outputs (default: '
                             'benchmarks/results/<device>/derivative)')
    parser.add_argument('--render', default=None, help='only re-render the markdown of this JSON')
    args = parser.parse_args(argv)
    if not set(args.modes) <= set(MODES):
        parser.error(f'--modes {",".join(args.modes)}: choose from {", ".join(MODES)}')
    if args.render:
        with open(args.render) as f:
            report = json.load(f)
        print(markdown(report, report.get('note', '')))
        return
    if args.layouts is not None:
        global LAYOUTS
        names = list(LAYOUTS)
        LAYOUTS = {names[int(i)]: LAYOUTS[names[int(i)]] for i in args.layouts}
    args.clock = args.clock or ('cpu' if jax.default_backend() == 'cpu' else 'wall')
    args.out = args.out or timing.results_stem('derivative')
    report = {**timing.provenance_fields(MODULE, argv), **run(args)}
    report['note'] = args.note
    text = markdown(report, args.note)
    print(text)
    timing.write_report(args.out, text, report)


if __name__ == '__main__':
    main()
