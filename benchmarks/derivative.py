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
  product and the batchnorm take part in the fusion;
- `fused` (not by default; Eq. (3)'s layouts only): the whole product
  `A[(C u) * BN_d(K u)]`, forward and backward with training-mode BN_d, by the Pallas
  kernels of `qhnet.models.fused` (`pallas`; Triton on a GPU, the Pallas interpreter on a
  CPU: tiny sizes only) and by XLA as the layers compute it (`xla`, K's default), with the
  fewest bytes the product must move (`product_bytes`) and its FLOPs (`product_flops`), the
  bandwidth and the share of the chip's bfloat16 peak that each reaches. A candidate that
  fails to compile is reported, the rest still run, and the exit status is 1.

Layer times are summed with each layer's multiplicity in the network (16 blocks) to
give a per-network total. Candidates are timed interleaved in one process; medians
of `--reps` repetitions. Writes a markdown table (stdout and `--out`.md) and JSON
(`--out`.json); `--out` defaults to benchmarks/results/<device>/derivative
(`timing.device_slug()`: cpu_2core, gpu_h200, ...), overwritten by a rerun.
"""

import argparse
import functools
import json
import math
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from benchmarks.models import failure, peak_bf16_tflops
from qhnet.models import fused
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
K_MODES = ('fwd', 'train', 'block')  # K's implementations compared
MODES = K_MODES + ('fused',)
FUSED = ('pallas', 'xla')  # how the `fused` mode computes the product


def block_outputs(channels: int, stride: int) -> int:
    """n', the block's output width: a stage's strided first block doubles the width."""
    return 2 * channels if stride == 2 else channels


def product_bytes(batch, size, channels, stride, multiplier, shared, itemsize) -> int:
    """The fewest bytes that one training step's forward and backward pass of Eq. (3)'s
    product z = A[(C u) * BN_d(K u)] move through memory on a layer (u: batch x size x size x
    n, n = `channels`): the forward pass reads u and the weights once and writes z once; the
    backward pass reads u, dz and the weights, and writes du and the weights' gradients. No
    mn-channel tensor (C u, K u, the product) is stored. Activations take `itemsize` bytes a
    value, the weights (C, K, A, BN_d's scale and shift) float32. A lower bound: BN_d's batch
    moments, needed before any product, cost the fused kernels a second read of u."""
    out_size = (size - 1) // stride + 1
    u = batch * size * size * channels * itemsize
    z = batch * out_size * out_size * block_outputs(channels, stride) * itemsize
    wide = multiplier * channels
    kernels = 9 * (multiplier if shared else wide)
    weights = 4 * (channels * wide + kernels + wide * block_outputs(channels, stride) + 2 * wide)
    forward = u + weights + z
    backward = u + z + weights + u + weights  # read u, dz, the weights; write du, their gradients
    return forward + backward


def product_flops(batch, size, channels, stride, multiplier) -> int:
    """The FLOPs of one training step's forward and backward pass of Eq. (3)'s product on a
    layer: 2*P*n*mn for C, 2*9*P*mn for K and 2*P*mn*n' for A in the forward pass (P =
    batch x output pixels; a multiply-add is 2), three times that for forward + backward
    (the backward pass takes each map's input and weight gradients). BN_d and the
    elementwise product are left out."""
    out_size = (size - 1) // stride + 1
    pixels = batch * out_size * out_size
    wide = multiplier * channels
    forward = 2 * pixels * (channels * wide + 9 * wide + wide * block_outputs(channels, stride))
    return 3 * forward


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


def xla_product(u, coef, kernel, bn_scale, bn_bias, combine, *, multiplier, stride, epsilon=1e-5):
    """z = A[(C u) * BN_d(K u)] as the layers of `QuasiLinearBlock.eq3` compute it
    (block_impl='xla'): the 1x1 maps as matrix products in u's dtype, K by `depthwise_conv`,
    BN_d from the batch moments in float32."""
    coefficients = u[:, ::stride, ::stride] @ coef.astype(u.dtype)
    d = depthwise_conv(u, kernel, stride, channel_multiplier=multiplier)
    normed = batch_norm(d, bn_scale, bn_bias, epsilon).astype(u.dtype)
    return (coefficients * normed) @ combine.astype(u.dtype)


def make_fused_case(batch, size, channels, stride, multiplier, shared, dtype, seed=0):
    """Per `FUSED` candidate, the jitted forward + backward of Eq. (3)'s product on one layer
    (weights by name, BN_d in training mode) and its inputs (u, weights, dz)."""
    wide, outputs = channels * multiplier, block_outputs(channels, stride)
    out_size = (size - 1) // stride + 1
    keys = jax.random.split(jax.random.key(seed), 5)
    u = jax.random.normal(keys[0], (batch, size, size, channels), dtype)
    weights = dict(coef=jax.random.normal(keys[1], (channels, wide)) / math.sqrt(channels),
                   kernel=jax.random.normal(keys[2], (3, 3, 1, multiplier if shared else wide)) / 3,
                   bn_scale=jnp.ones(wide), bn_bias=jnp.zeros(wide),
                   combine=jax.random.normal(keys[3], (wide, outputs)) / math.sqrt(wide))
    cotangent = jax.random.normal(keys[4], (batch, out_size, out_size, outputs), dtype)
    running = (jnp.zeros(wide), jnp.ones(wide))  # BN_d's running averages: unread in training

    def pallas(u, weights):
        return fused.product(u, **weights, mean=running[0], var=running[1], multiplier=multiplier,
                             stride=stride, train=True)[0]

    def xla(u, weights):
        return xla_product(u, **weights, multiplier=multiplier, stride=stride)

    def train(product, u, weights, cotangent):
        z, vjp = jax.vjp(product, u, weights)
        return z, vjp(cotangent)

    inputs = (u, weights, cotangent)
    return {name: (jax.jit(functools.partial(train, product)), inputs)
            for name, product in zip(FUSED, (pallas, xla))}


def time_fused(args, size, channels, stride, multiplier, shared) -> dict:
    """Eq. (3)'s product on one layer: its fewest bytes and FLOPs, the times of each `FUSED`
    candidate, and the error of any that fails to compile (left out of the timing)."""
    compiled, errors = {}, {}
    for name, (fn, inputs) in make_fused_case(args.batch, size, channels, stride, multiplier,
                                              shared, DTYPES[args.dtype]).items():
        try:
            compiled[name] = functools.partial(fn.lower(*inputs).compile(), *inputs)
        except Exception as error:  # reported in the table; the other candidates still run
            traceback.print_exc()
            errors[name] = failure(error)
    itemsize = jnp.dtype(DTYPES[args.dtype]).itemsize
    return dict(bytes=product_bytes(args.batch, size, channels, stride, multiplier, shared, itemsize),
                flops=product_flops(args.batch, size, channels, stride, multiplier), errors=errors,
                times=timing.interleaved(compiled, args.reps, slow_seconds=args.slow_seconds))


def progress(row, clock, impls) -> str:
    """One layer's medians, ms: each mode's per implementation, then the fused candidates."""
    parts = [f'{mode} ' + '/'.join(f'{timing.median(times[i][clock]) * 1e3:.2f}' for i in impls)
             for mode, times in row['times'].items()]
    if 'fused' in row:
        parts.append('fused ' + '/'.join(f'{timing.median(times[clock]) * 1e3:.2f}'
                                         for times in row['fused']['times'].values())
                     + f' ({"/".join(row["fused"]["times"])})')
    return ', '.join(parts) + f' ms ({"/".join(impls)})'


def run(args) -> dict:
    dtype = DTYPES[args.dtype]
    impls = args.impls
    k_modes = [mode for mode in args.modes if mode in K_MODES]
    results = []
    for layout, (multiplier, shared, expand) in LAYOUTS.items():
        for size_at_224, channels, stride, count in LAYERS:
            # The stem divides the input by 4, each strided block by 2, rounding up.
            size = -(-size_at_224 * args.image_size // 224)
            row = dict(layout=layout, size=size, channels=channels, stride=stride, count=count,
                       times={})
            if k_modes:
                fns = make_case(args.batch, size, channels, stride, multiplier, shared, expand, dtype)
            for mode in k_modes:
                times = timing.interleaved({impl: fns[impl][mode] for impl in impls}, args.reps,
                                           slow_seconds=args.slow_seconds)
                row['times'][mode] = {impl: times[impl] for impl in impls}
            if 'fused' in args.modes and expand:  # Eq. (7)'s layout has no fused product
                row['fused'] = time_fused(args, size, channels, stride, multiplier, shared)
            results.append(row)
            print(f'  {layout} {size}x{size}x{channels}/{stride}: {progress(row, args.clock, impls)}',
                  file=sys.stderr, flush=True)
    device_kind = jax.devices()[0].device_kind
    return dict(device=timing.device_name(), batch=args.batch, image_size=args.image_size,
                dtype=args.dtype, reps=args.reps, clock=args.clock,
                impls=impls, modes=args.modes, default_impl=DEFAULT_IMPL,
                peak_tflops=peak_bf16_tflops(device_kind), device_kind=device_kind,
                load_average_at_end=timing.load_average(), layers=results)


def fused_markdown(report: dict) -> list[str]:
    """The `fused` mode's section: per layer, the product's fewest bytes and FLOPs and, per
    candidate, its time, bandwidth and share of the peak; then the per-network totals."""
    rows = [row for row in report['layers'] if 'fused' in row]
    if not rows:
        return []
    clock, peak = report['clock'], report.get('peak_tflops')
    block = 'block' in report['modes']
    lines = ['', '## Fused product', '',
             '`A[(C u) * BN_d(K u)]` forward + backward, BN_d in training mode, n\' = the block\'s '
             'output width: `pallas` = `qhnet.models.fused.product`, `xla` = the layers\' XLA ops (K '
             f'`{report["default_impl"]}`). min MB: the fewest bytes the product moves '
             '(`product_bytes`: u, dz, du once each, z once, the weights and their gradients); '
             'GFLOP: `product_flops` (C, K, A; x3 for forward + backward). GB/s: min bytes per '
             'wall-clock second; % peak: GFLOP per wall-clock second over '
             + (f'the {peak:g} TFLOP/s dense bfloat16 peak of {report["device_kind"]!r}' if peak
                else 'a peak, none known for this device (n/a)')
             + '. `xla / pallas` > 1: pallas is faster.'
             + (' `block`: the fragment without C and A (above), fastest K.' if block else ''), '']
    header = ['layout', 'layer (HxWxC/stride) x count', 'min MB', 'GFLOP']
    header += [f'{name} {unit}' for name in FUSED for unit in ('ms', 'GB/s', '% peak')]
    header += ['xla / pallas'] + (['block ms'] if block else [])
    lines += ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    totals = {}  # layout -> candidate -> seconds per network
    for row in rows:
        product = row['fused']
        cells = [f'{product["bytes"] / 1e6:.1f}', f'{product["flops"] / 1e9:.2f}']
        seconds = {name: timing.median(times[clock]) for name, times in product['times'].items()}
        for name in FUSED:
            if name not in seconds:
                cells += ['failed', '', '']
                continue
            wall = timing.median(product['times'][name]['wall'])
            share = 'n/a' if not peak else f'{product["flops"] / wall / (peak * 1e12):.1%}'
            cells += [f'{seconds[name] * 1e3:.2f}', f'{product["bytes"] / wall / 1e9:.0f}', share]
            per_layout = totals.setdefault(row['layout'], {})
            per_layout[name] = per_layout.get(name, 0.0) + seconds[name] * row['count']
        cells.append(f'{seconds["xla"] / seconds["pallas"]:.2f}x' if len(seconds) == 2 else '')
        if block:
            fastest = min(timing.median(times[clock]) for times in row['times']['block'].values())
            cells.append(f'{fastest * 1e3:.2f}')
        lines.append(f'| {row["layout"]} | {row["size"]}x{row["size"]}x{row["channels"]}/{row["stride"]}'
                     f' x{row["count"]} | ' + ' | '.join(cells) + ' |')
    if totals:
        lines += ['', 'Per network (the 16 blocks), ms: ' + '; '.join(
            f'{layout}: ' + ', '.join(f'{name} {total * 1e3:.1f}' for name, total in per_layout.items())
            for layout, per_layout in totals.items()) + '.']
    lines += [f'Failed to compile: {row["layout"]} {row["size"]}x{row["size"]}x{row["channels"]}/'
              f'{row["stride"]} {name}: {error}' for row in rows
              for name, error in row['fused']['errors'].items()]
    return lines


def markdown(report: dict, note: str) -> str:
    impls = report['impls']
    modes = [mode for mode in report['modes'] if mode in K_MODES]
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
    return '\n'.join(lines + fused_markdown(report)) + '\n'


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
    parser.add_argument('--modes', type=lambda s: s.split(','), default=list(K_MODES),
                        help=f"','-separated, of {', '.join(MODES)} (default: {','.join(K_MODES)}; "
                             "'fused' runs in the Pallas interpreter on a CPU: tiny sizes only)")
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
    if any(row.get('fused', {}).get('errors') for row in report['layers']):
        raise SystemExit('failed: fused candidates (see the report)')


if __name__ == '__main__':
    main()
