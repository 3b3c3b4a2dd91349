"""Eq. (3)'s fused product and each of its Pallas kernels, layer by layer and per tile
configuration, beside the same product computed by XLA.

    python -m benchmarks.kernels        # batch 256, bfloat16, 224x224 (on a CPU: batch 2, 32x32)
    python -m benchmarks.kernels --tiles 64x32x64/w4s1,128x32x64/w8s1,64x16x64/w4s2   # a sweep
    python -m benchmarks.kernels --render benchmarks/results/gpu_h200/kernels.json

For every Eq. (3) layer of the 224x224 network (`benchmarks.derivative.LAYERS`, resolutions
scaled to `--image-size`), with one bank of m = 4 kernels shared by every channel
(`--per-channel`: a bank per channel), times, forward + backward with BN_d in training mode:

- `xla`: the product `z = A[(C u) * BN_d(K u)]` as the layers compute it (K by the
  default implementation);
- per `--tiles` (`qhnet.models.fused_kernels.Tiles`, PIXELSxCHANNELSxOUTPUTS/wWARPSsSTAGES):
  `product`, the same by `qhnet.models.fused.product`, and each of its kernels alone on
  inputs of the shapes it gets there: `moments`, `forward` or `uncombined` (the layer's
  forward pass: `fused.stores_product` picks; the other is timed too, in brackets),
  `backward` and `input`; `rest` is the product's time outside the kernels it runs (XLA's
  matrix products for A where the product is stored, for C's and A's gradients and for u's
  gradient through C, BN_d's fold and the sums), by difference.

Bytes: a kernel's are its operands read once and its results written once (a floor: the
windows it reads again come from the cache); the product's are the fewest it must move
(`product_bytes`), its FLOPs `product_flops`. Each is reported per wall-clock second against
the chip's HBM bandwidth and dense bfloat16 peak (`timing.PEAKS`). Candidates are timed
interleaved in one process; medians of `--reps`. One that fails to compile is reported in
the table, the rest still run, and the exit status is 1. Writes markdown (stdout and
`--out`.md) and JSON (`--out`.json); `--out` defaults to benchmarks/results/<device>/kernels.
On the CPU the kernels run in the Pallas interpreter: tiny sizes only.
"""

import argparse
import dataclasses
import functools
import json
import math
import sys
import traceback

import jax
import jax.numpy as jnp

from benchmarks import timing
from benchmarks.derivative import DTYPES, LAYERS, batch_norm
from benchmarks.models import failure
from qhnet.models import fused, fused_kernels
from qhnet.models.derivative import DEFAULT_IMPL, depthwise_conv

MODULE = 'benchmarks.kernels'
MULTIPLIER = 4
KERNELS = ('moments', 'forward', 'uncombined', 'backward', 'input')
PARTS = ('product',) + KERNELS


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


def xla_product(u, coef, kernel, bn_scale, bn_bias, combine, *, multiplier, stride, epsilon=1e-5):
    """z = A[(C u) * BN_d(K u)] as the layers of `QuasiLinearBlock.eq3` compute it
    (block_impl='xla'): the 1x1 maps as matrix products in u's dtype, K by `depthwise_conv`,
    BN_d from the batch moments in float32."""
    coefficients = u[:, ::stride, ::stride] @ coef.astype(u.dtype)
    d = depthwise_conv(u, kernel, stride, channel_multiplier=multiplier)
    normed = batch_norm(d, bn_scale, bn_bias, epsilon).astype(u.dtype)
    return (coefficients * normed) @ combine.astype(u.dtype)


def product_candidates(batch, size, channels, stride, shared, dtype, tiles_list, seed=0):
    """'xla' and, per tiles, '<tiles> product': the jitted forward + backward of the product
    on one layer (weights as the layers store them), with its inputs (u, weights, dz)."""
    m = MULTIPLIER
    wide, outputs = channels * m, block_outputs(channels, stride)
    out_size = (size - 1) // stride + 1
    keys = jax.random.split(jax.random.key(seed), 5)
    u = jax.random.normal(keys[0], (batch, size, size, channels), dtype)
    weights = dict(coef=jax.random.normal(keys[1], (channels, wide)) / math.sqrt(channels),
                   kernel=jax.random.normal(keys[2], (3, 3, 1, m if shared else wide)) / 3,
                   bn_scale=jnp.ones(wide), bn_bias=jnp.zeros(wide),
                   combine=jax.random.normal(keys[3], (wide, outputs)) / math.sqrt(wide))
    cotangent = jax.random.normal(keys[4], (batch, out_size, out_size, outputs), dtype)
    running = (jnp.zeros(wide), jnp.ones(wide))  # BN_d's running averages: unread in training

    def pallas(tiles, u, weights):
        return fused.product(u, **weights, mean=running[0], var=running[1], multiplier=m,
                             stride=stride, train=True, tiles=tiles)[0]

    def xla(u, weights):
        return xla_product(u, **weights, multiplier=m, stride=stride)

    def train(product, u, weights, cotangent):
        z, vjp = jax.vjp(product, u, weights)
        return z, vjp(cotangent)

    inputs = (u, weights, cotangent)
    products = {'xla': xla} | {f'{tiles} product': functools.partial(pallas, tiles)
                               for tiles in tiles_list}
    return {name: (jax.jit(functools.partial(train, product)), inputs)
            for name, product in products.items()}


def kernel_calls(batch, size, channels, stride, shared, dtype, interpret, seed=0):
    """kernel -> (call, inputs): each of `fused_kernels`' calls, taking a `geometry`, with
    inputs of the shapes and dtypes that `fused.product` gives it (values random: times do
    not depend on them)."""
    m, n = MULTIPLIER, channels
    geometry = fused_kernels.Geometry(size, size, stride)
    keys = iter(jax.random.split(jax.random.key(seed), 16))

    def normal(shape, kind=jnp.float32):
        return jax.random.normal(next(keys), shape, kind)

    u = normal((batch, size * size, n), dtype)
    dz = normal((batch, geometry.outputs, block_outputs(n, stride)), dtype)
    ck, ak = normal((m, n, n), dtype), normal((m, n, dz.shape[-1]), dtype)
    taps = normal((9, m) if shared else (9, m, n))
    scale, shift, dmean, dsquare = (normal((m, n)) for _ in range(4))
    dnorm, der = (normal((batch, geometry.outputs, m * n), dtype) for _ in range(2))
    dcentres = normal((batch, geometry.outputs, n), dtype)
    calls = dict(moments=(fused_kernels.moments, (u, taps)),
                 forward=(fused_kernels.forward, (u, ck, taps, scale, shift, ak)),
                 uncombined=(fused_kernels.uncombined, (u, ck, taps, scale, shift)),
                 backward=(fused_kernels.backward, (u, dz, ck, taps, scale, shift, ak)),
                 input=(fused_kernels.input_gradient, (dnorm, der, u, dcentres, taps, dmean, dsquare)))
    return {name: (functools.partial(call, interpret=interpret), inputs)
            for name, (call, inputs) in calls.items()}, geometry


def kernel_candidates(batch, size, channels, stride, shared, dtype, tiles_list, seed=0):
    """'<tiles> <kernel>' for each tiles and kernel: the jitted call and its inputs."""
    calls, geometry = kernel_calls(batch, size, channels, stride, shared, dtype,
                                   jax.default_backend() != 'gpu', seed)

    def jitted(call, tiles):
        return jax.jit(functools.partial(call, geometry=dataclasses.replace(geometry, tiles=tiles)))

    return {f'{tiles} {name}': (jitted(call, tiles), inputs)
            for tiles in tiles_list for name, (call, inputs) in calls.items()}


def io_bytes(fn, inputs) -> int:
    """The bytes of `fn`'s operands and results: each read or written once."""
    arrays = jax.tree.leaves(inputs) + jax.tree.leaves(jax.eval_shape(fn, *inputs))
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays)


def time_layer(args, size, channels, stride) -> dict:
    """One layer's times per candidate, its kernels' bytes, the product's fewest bytes and
    FLOPs, and the error of any candidate that fails to compile (left out of the timing)."""
    dtype = DTYPES[args.dtype]
    candidates = (product_candidates(args.batch, size, channels, stride, not args.per_channel,
                                     dtype, args.tiles)
                  | kernel_candidates(args.batch, size, channels, stride, not args.per_channel, dtype,
                                       args.tiles))
    compiled, errors, io = {}, {}, {}
    for name, (fn, inputs) in candidates.items():
        if name.split()[-1] in KERNELS:  # per tiles: K's gradient comes per block of pixels
            io[name] = io_bytes(fn, inputs)
        try:
            compiled[name] = functools.partial(fn.lower(*inputs).compile(), *inputs)
        except Exception as error:  # reported in the table; the other candidates still run
            traceback.print_exc()
            errors[name] = failure(error)
    itemsize = jnp.dtype(dtype).itemsize
    stored = {str(tiles): fused.stores_product(
        fused_kernels.Geometry(size, size, stride, tiles), channels,
        block_outputs(channels, stride), itemsize) for tiles in args.tiles}
    return dict(size=size, channels=channels, stride=stride, io=io, errors=errors, stored=stored,
                bytes=product_bytes(args.batch, size, channels, stride, MULTIPLIER,
                                    not args.per_channel, itemsize),
                flops=product_flops(args.batch, size, channels, stride, MULTIPLIER),
                times=timing.interleaved(compiled, args.reps, slow_seconds=args.slow_seconds))


def run(args) -> dict:
    layers = []
    for index in args.layers:
        size_at_224, channels, stride, count = LAYERS[index]
        size = -(-size_at_224 * args.image_size // 224)  # as the network's stem and strides give
        row = dict(count=count, **time_layer(args, size, channels, stride))
        layers.append(row)
        medians = {name: f'{timing.median(times[args.clock]) * 1e3:.2f}'
                   for name, times in row['times'].items()}
        print(f'  {size}x{size}x{channels}/{stride}: '
              + ', '.join(f'{name} {value}' for name, value in medians.items()) + ' ms',
              file=sys.stderr, flush=True)
    kind = jax.devices()[0].device_kind
    return dict(device=timing.device_name(), device_kind=kind, batch=args.batch,
                image_size=args.image_size, dtype=args.dtype, reps=args.reps, clock=args.clock,
                shared=not args.per_channel, default_impl=DEFAULT_IMPL,
                tiles=[str(tiles) for tiles in args.tiles], peak_tflops=timing.peak_bf16_tflops(kind),
                peak_gbps=timing.peak_hbm_gbps(kind), load_average_at_end=timing.load_average(),
                layers=layers)


def _layer(row):  # 'HxWxC/stride'
    return f'{row["size"]}x{row["size"]}x{row["channels"]}/{row["stride"]}'


def runs(row, tiles) -> tuple[str, ...]:
    """The kernels that the product runs on a layer under `tiles`: `forward` or, where it
    stores the product, `uncombined`, beside the other three."""
    skipped = 'forward' if row.get('stored', {}).get(tiles) else 'uncombined'
    return tuple(kernel for kernel in KERNELS if kernel != skipped)


def network_seconds(report, name, clock):
    """A candidate's seconds per network, each layer times its block count (a kernel counts
    only on the layers where the product runs it); None if it failed on any layer."""
    tiles, _, part = name.rpartition(' ')
    seconds = [0.0 if part in KERNELS and part not in runs(row, tiles) else _seconds(row, name, clock)
               for row in report['layers']]
    if None in seconds:
        return None
    return sum(value * row['count'] for value, row in zip(seconds, report['layers']))


def _seconds(row, name, clock):
    times = row['times'].get(name)
    return None if times is None else timing.median(times[clock])


def _rate(count, seconds, peak, unit):
    """count / seconds in `unit`s (1e9: GB/s, 1e12: TFLOP/s) and, in brackets, its share of
    `peak` (in the same unit) when one is known."""
    rate = count / seconds / unit
    return f'{rate:.0f}' + (f' ({rate / peak:.0%})' if peak else '')


def markdown(report: dict, note: str = '') -> str:
    clock, peak_gbps, peak_tflops = report['clock'], report['peak_gbps'], report['peak_tflops']
    lines = ['# Eq. (3)\'s fused product: kernels and tiles', '', timing.provenance_line(report), '',
             f'Batch {report["batch"]}, {report["dtype"]}, '
             f'{"one shared bank" if report["shared"] else "a bank per channel"} of m = '
             f'{MULTIPLIER} kernels, forward + backward with BN_d in training mode; median of '
             f'{report["reps"]} interleaved repetitions, ms ('
             f'{"process CPU time" if clock == "cpu" else "wall clock"}). {note}'.rstrip(), '',
             f'`xla`: the layers (K `{report["default_impl"]}`). `product`: '
             '`qhnet.models.fused.product` under the row\'s tiles (PIXELSxCHANNELSxOUTPUTS/wWARPS'
             'sSTAGES); `xla / product` > 1: the kernels are faster. GB/s: the fewest bytes the '
             'product moves (`product_bytes`), or a kernel\'s operands and results once each, per '
             'wall-clock second; in brackets, against '
             + (f'{peak_gbps:g} GB/s of HBM bandwidth' if peak_gbps else 'a peak (none known here)')
             + '. TFLOP/s: `product_flops` per wall-clock second; in brackets, against '
             + (f'the {peak_tflops:g} TFLOP/s dense bfloat16 peak' if peak_tflops else 'a peak')
             + '. `rest`: the product less the kernels it runs (XLA\'s matrix products and sums); '
             'in brackets, the forward kernel it does not run on that layer.', '']
    header = ['layer (HxWxC/stride) x count', 'tiles', 'xla ms', 'product ms', 'xla / product',
              'product GB/s', 'TFLOP/s'] + [f'{kernel} ms (GB/s)' for kernel in KERNELS] + ['rest ms']
    lines += ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for row in report['layers']:
        xla = _seconds(row, 'xla', clock)
        for tiles in report['tiles']:
            cells = [f'{xla * 1e3:.2f}' if xla else 'failed']
            seconds = {part: _seconds(row, f'{tiles} {part}', clock) for part in PARTS}
            product = seconds['product']
            if product is None:
                cells += ['failed', '', '', '']
            else:
                wall = _seconds(row, f'{tiles} product', 'wall')
                cells += [f'{product * 1e3:.2f}', f'{xla / product:.2f}x' if xla else '',
                          _rate(row['bytes'], wall, peak_gbps, 1e9),
                          _rate(row['flops'], wall, peak_tflops, 1e12)]
            for kernel in KERNELS:
                name = f'{tiles} {kernel}'
                wall = _seconds(row, name, 'wall')
                cell = 'failed' if wall is None else (f'{seconds[kernel] * 1e3:.2f} ('
                                                      + _rate(row['io'][name], wall, peak_gbps, 1e9) + ')')
                cells.append(cell if kernel in runs(row, tiles) else f'[{cell}]')
            used = [seconds[kernel] for kernel in runs(row, tiles)]
            cells.append(f'{(product - sum(used)) * 1e3:.2f}'
                         if product is not None and None not in used else '')
            lines.append(f'| {_layer(row)} x{row["count"]} | {tiles} | ' + ' | '.join(cells) + ' |')
    xla = network_seconds(report, 'xla', clock)
    lines += ['', '**Per network** (the layers above, each times its block count), ms; xla '
              + ('failed' if xla is None else f'{xla * 1e3:.1f}') + ':', '',
              '| tiles | ' + ' | '.join(PARTS) + ' | xla / product |', '|' + '---|' * (len(PARTS) + 2)]
    for tiles in report['tiles']:
        total = {part: network_seconds(report, f'{tiles} {part}', clock) for part in PARTS}
        cells = ['failed' if value is None else f'{value * 1e3:.1f}' for value in total.values()]
        ratio = f'{xla / total["product"]:.2f}x' if xla and total['product'] else ''
        lines.append(f'| {tiles} | ' + ' | '.join(cells) + f' | {ratio} |')
    best = {}
    for row in report['layers']:
        timed = {tiles: _seconds(row, f'{tiles} product', clock) for tiles in report['tiles']}
        timed = {tiles: value for tiles, value in timed.items() if value is not None}
        if timed:
            best[_layer(row)] = min(timed, key=timed.get)
    if len(report['tiles']) > 1 and best:
        lines += ['', 'Fastest tiles per layer: ' + ', '.join(f'{layer} {tiles}'
                                                              for layer, tiles in best.items()) + '.']
    failed = [f'{_layer(row)} {name}: {error}' for row in report['layers']
              for name, error in row['errors'].items()]
    lines += ['', 'Failed to compile: ' + '; '.join(failed) + '.'] if failed else []
    return '\n'.join(lines) + '\n'


def add_layer_arguments(parser):
    """--tiles, --layers and --per-channel, which this benchmark and benchmarks.registers share."""
    parser.add_argument('--tiles', default=str(fused_kernels.TILES),
                        help="','-separated tiles, PIXELSxCHANNELSxOUTPUTS/wWARPSsSTAGES "
                             f'(default: {fused_kernels.TILES}, what the model uses)')
    parser.add_argument('--layers', default=None,
                        help=f"','-separated indices into benchmarks.derivative.LAYERS (default: "
                             f'all {len(LAYERS)})')
    parser.add_argument('--per-channel', action='store_true',
                        help="the product's K per channel instead of one shared bank")


def parse_layer_arguments(parser, args):
    """args.tiles into `Tiles`, args.layers into indices; a bad value stops with its fix."""
    try:
        args.tiles = [fused_kernels.Tiles.parse(text) for text in args.tiles.split(',')]
    except ValueError as error:
        parser.error(f'--tiles: {error}')
    indices = [str(index) for index in range(len(LAYERS))]
    if args.layers is not None and not set(args.layers.split(',')) <= set(indices):
        parser.error(f'--layers {args.layers}: choose from {",".join(indices)}')
    args.layers = [int(index) for index in (args.layers.split(',') if args.layers else indices)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--batch', type=int, default=None,
                        help='default 256; 2 on a CPU, where the kernels run in the interpreter')
    parser.add_argument('--image-size', type=int, default=None,
                        help="the network's input size, which gives the layers' resolutions "
                             '(default 224; 32 on a CPU)')
    parser.add_argument('--dtype', choices=sorted(DTYPES), default='bfloat16')
    parser.add_argument('--reps', type=int, default=10)
    add_layer_arguments(parser)
    parser.add_argument('--clock', choices=('cpu', 'wall'), default=None,
                        help="'cpu': process CPU time (default on CPU); 'wall' (default elsewhere)")
    parser.add_argument('--slow-seconds', type=float, default=20.0,
                        help='a candidate slower than this per call is timed once')
    parser.add_argument('--note', default='', help='free text for the table header')
    parser.add_argument('--out', default=None, help='path stem for .md and .json outputs '
                                                    '(default: benchmarks/results/<device>/kernels)')
    parser.add_argument('--render', default=None, help='only re-render the markdown of this JSON')
    args = parser.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            report = json.load(f)
        print(markdown(report, report.get('note', '')))
        return
    parse_layer_arguments(parser, args)
    cpu = jax.default_backend() == 'cpu'
    args.batch = args.batch or (2 if cpu else 256)
    args.image_size = args.image_size or (32 if cpu else 224)
    args.clock = args.clock or ('cpu' if cpu else 'wall')
    args.out = args.out or timing.results_stem('kernels')
    report = {**timing.provenance_fields(MODULE, argv), **run(args), 'note': args.note}
    text = markdown(report, args.note)
    print(text)
    timing.write_report(args.out, text, report)
    if any(row['errors'] for row in report['layers']):
        raise SystemExit('failed: candidates that did not compile (see the report)')


if __name__ == '__main__':
    main()
