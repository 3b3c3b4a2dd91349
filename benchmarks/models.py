"""Speed, memory and FLOPs of every Table 1 model side by side, ResNet50 the baseline.

    python -m benchmarks.models                           # CPU defaults: batch 8, all rows
    python -m benchmarks.models --models 'eq3_softball;eq7_nows_x6' --variants
    python -m benchmarks.models --batch 256 --dtype bfloat16 --reps 20 --variants  # on a GPU

For every model, at `--image-size` (224) and 100 classes, in one process:

- parameters (trainable, BN scales and shifts included);
- FLOPs per image of the forward pass and of a training step, from XLA's cost analysis
  of the *lowered* (unoptimised) program, lowered for the CPU on every device: what the
  model asks for, independent of how a backend rewrites it (XLA:CPU, for one, turns a
  grouped conv into a dense one);
- training step images/s: the project's own `qhnet.train.train_step` (forward, backward,
  SGD-momentum update with weight decay, BN statistics), jitted with the state donated;
- inference images/s: `model.apply(..., train=False)`, jitted;
- peak memory of both programs from XLA's memory analysis of the compiled program:
  arguments + outputs - donated aliases + temporaries (what the device must hold);
- training MFU: the lowered training step's FLOPs per image x training images/s (wall)
  / the chip's dense bfloat16 peak (`--peak-tflops`, or looked up from the device kind;
  none on a CPU or an unknown chip).

All programs are timed round-robin (model A, B, C, A, B, C, ...) so that a change in
machine load hits every model alike; medians of `--reps` repetitions. On a CPU both the
wall clock and the process CPU time are recorded and speed ratios use CPU time (robust
when other jobs share the machine; `--clock` to change); on an accelerator, wall time.

`--variants` adds, for the Eq. (3) softball@ds row: rematerialisation (`remat=True`),
the other compute dtype, and every other derivative implementation (`--impls`), so that
each switch's effect on speed and memory sits in the same table.

`--stages N` times the first N stages of every model (each with its stem, pool and head;
MobileNetV3 has no stages and is left out): `--stages 1` sets stage 1 against ResNet50's.

`--block-impls xla,pallas` times each Eq. (3) row without mixing maps once per block
implementation (`model.block_impl`; 'pallas': the fused kernels of `qhnet.models.fused`),
labelled `(block_impl=...)`; default `xla` alone. A pallas row's FLOPs are counted on its
`xla` program (XLA counts nothing inside a Pallas kernel). A row other than ResNet50 that
fails to compile is reported as failed, the others are still timed; the exit status is 1.

Writes a markdown table (stdout and `--out`.md) and the raw numbers (`--out`.json); `--out`
defaults to benchmarks/results/<device>/models (`timing.device_slug()`: cpu_2core,
gpu_h200, ...), overwritten by a rerun.
"""

import argparse
import dataclasses
import functools
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import timing
from qhnet import config as qhnet_config
from qhnet import models
from qhnet.models.derivative import DEFAULT_IMPL, IMPLEMENTATIONS
from qhnet.training import recipe, steps

MODULE = 'benchmarks.models'
BASELINE = 'ResNet50'
MAIN = 'Eq. (3) softball@ds'
# model.block_impl values a row can name ('auto' would hide which one ran).
BLOCK_IMPLS = tuple(impl for impl in qhnet_config.BLOCK_IMPLS if impl != 'auto')
# Table 1 row title -> its key in qhnet.config.ROWS.
ROW_KEYS = {row.title: key for key, row in qhnet_config.ROWS.items()}


def row_config(title: str):
    """The ImageNet-100 config of the Table 1 row titled `title`."""
    return qhnet_config.row_config(ROW_KEYS[title])


@dataclasses.dataclass
class Entry:
    label: str
    row: str
    dtype: str
    remat: bool = False
    impl: str | None = None  # QHNet rows: the derivative implementation
    block_impl: str | None = None  # QHNet rows: how Eq. (3)'s product is computed


def select_rows(spec: str) -> list[str]:
    """Table 1 rows from ';'-separated names: row names ('Eq. (7) no ws, x6') or their
    config modules ('eq7_nows_x6')."""
    by_module = {key: title for title, key in ROW_KEYS.items()}
    rows = []
    for name in filter(None, (part.strip() for part in spec.split(';'))):
        row = name if name in ROW_KEYS else by_module.get(name)
        if row is None:
            raise SystemExit(f'unknown model {name!r}; valid: {list(ROW_KEYS)} or {list(by_module)}')
        rows.append(row)
    return rows


def fusable(model_config) -> bool:
    """Whether `block_impl` changes how the model computes: QHNet of Eq. (3) without mixing
    maps, whose blocks `QuasiLinearBlock` can compute by the fused kernels."""
    return model_config.name == 'qhnet' and model_config.equation == 3 and not model_config.mixing


def block_entries(row: str, args) -> list[Entry]:
    """The row's entries: one per `--block-impls` where the block implementation applies,
    labelled `(block_impl=...)` unless it is `xla` alone; one, `xla`, elsewhere."""
    model_config = row_config(row).model
    if model_config.name != 'qhnet':
        return [Entry(row, row, args.dtype)]
    block_impls = args.block_impls if fusable(model_config) else ['xla']
    labelled = block_impls != ['xla']
    return [Entry(f'{row} (block_impl={block_impl})' if labelled else row, row, args.dtype,
                  impl=args.impl, block_impl=block_impl) for block_impl in block_impls]


def entries(args) -> list[Entry]:
    rows = [BASELINE] + [row for row in ROW_KEYS if row != BASELINE]
    if args.models != 'all':
        wanted = select_rows(args.models)
        rows = [BASELINE] + [row for row in rows if row in wanted and row != BASELINE]
    if args.stages:
        rows = [row for row in rows if row_config(row).model.name != 'mobilenet_v3_large']
    impl = args.impl
    out = [entry for row in rows for entry in block_entries(row, args)]
    if args.variants and MAIN in rows:  # the switches below apply to the layers: block_impl xla
        other = 'bfloat16' if args.dtype == 'float32' else 'float32'
        xla = dict(impl=impl, block_impl='xla')
        out.append(Entry(f'{MAIN} +remat', MAIN, args.dtype, remat=True, **xla))
        out.append(Entry(f'{BASELINE} {other}', BASELINE, other))
        out.append(Entry(f'{MAIN} {other}', MAIN, other, **xla))
        for candidate in args.impls:
            if candidate != impl:
                out.append(Entry(f'{MAIN} [K: {candidate}]', MAIN, args.dtype, impl=candidate,
                                 block_impl='xla'))
    return out


def build(entry: Entry, num_classes: int, stages: int | None = None):
    """The entry's model, cut to its first `stages` stages (all by default)."""
    model_config = row_config(entry.row).model
    model_config.num_classes = num_classes
    if stages:
        model_config.widths, model_config.depths = (tuple(model_config.widths)[:stages],
                                                    tuple(model_config.depths)[:stages])
    model_config.dtype = entry.dtype
    if model_config.name == 'qhnet':
        model_config.remat = entry.remat
        model_config.derivative_impl = entry.impl
        model_config.block_impl = entry.block_impl
    return models.build(model_config)


def flops(stage) -> float:
    """XLA's FLOP count of a lowered or compiled program; NaN where the backend gives none."""
    analysis = stage.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0]
    return float(analysis.get('flops', float('nan'))) if analysis else float('nan')


def requested_flops(jitted, *args) -> float:
    """The FLOPs of `jitted`'s unoptimised program, lowered for the host's CPU whatever the
    device (the inputs' placement picks the backend that counts): XLA:GPU's cost analysis
    of a lowered program gives none, and this way every backend reports the same count."""
    on_cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
    specs = jax.tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=on_cpu), args)
    return flops(jitted.lower(*specs))


def peak_bytes(compiled) -> float:
    stats = compiled.memory_analysis()
    if stats is None:
        return float('nan')
    return float(stats.argument_size_in_bytes + stats.output_size_in_bytes
                 - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


def programs(model, optimizer, schedule, config):
    """The jitted training step (state donated) and inference of `model`."""
    # The batch holds the float32 images a model reads, so `inputs` passes them through
    # (training makes them from uint8 batches inside the step).
    step = jax.jit(functools.partial(steps.train_step, model=model, optimizer=optimizer,
                                     schedule=schedule, label_smoothing=config.label_smoothing,
                                     inputs=lambda batch, key: batch['image']),
                   donate_argnums=0)
    infer = jax.jit(lambda variables, images: model.apply(variables, images, train=False))
    return step, infer


def prepare(entry: Entry, args, config) -> dict:
    """Compiles the training and inference programs of one model; returns the callables."""
    model = build(entry, args.num_classes, args.stages)
    rng = np.random.default_rng(0)
    shape = (args.batch, args.image_size, args.image_size, 3)
    images = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    labels = jnp.asarray(rng.integers(0, args.num_classes, args.batch), jnp.int32)
    batch = {'image': images, 'label': labels}
    schedule = optax.constant_schedule(0.01)
    optimizer = recipe.make_optimizer(config, schedule)
    state = steps.create_train_state(model, optimizer, shape[1:], jax.random.key(0))
    count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(state.params))
    step, infer = programs(model, optimizer, schedule, config)
    # FLOPs are counted on the model's XLA program: the same function of the same variables.
    counted_step, counted_infer = step, infer
    if entry.block_impl not in (None, 'xla'):
        layers = build(dataclasses.replace(entry, block_impl='xla'), args.num_classes, args.stages)
        counted_step, counted_infer = programs(layers, optimizer, schedule, config)
    key = jax.random.key(1)
    start = time.perf_counter()
    step_lowered = step.lower(state, batch, key)
    infer_lowered = infer.lower(state.variables(), images)
    step_compiled = step_lowered.compile()
    infer_compiled = infer_lowered.compile()
    compile_seconds = time.perf_counter() - start
    holder = {'state': state}

    def run_step():
        holder['state'], metrics = step_compiled(holder['state'], batch, key)
        return metrics['loss']

    variables = state.variables()  # inference reads a separate copy: the step donates its state
    variables = jax.tree_util.tree_map(jnp.copy, variables)

    def run_infer():
        return infer_compiled(variables, images)

    return dict(
        entry=entry, params=count, compile_seconds=compile_seconds,
        flops_infer=requested_flops(counted_infer, state.variables(), images) / args.batch,
        flops_train=requested_flops(counted_step, state, batch, key) / args.batch,
        flops_train_compiled=flops(step_compiled) / args.batch,
        memory_train=peak_bytes(step_compiled), memory_infer=peak_bytes(infer_compiled),
        run_step=run_step, run_infer=run_infer, step_text=step_compiled.as_text)


def measure(args) -> dict:
    config = qhnet_config.get_config()
    prepared, failed = [], []
    for entry in entries(args):
        print(f'compiling {entry.label} ...', file=sys.stderr, flush=True)
        try:
            item = prepare(entry, args, config)
        except Exception as error:  # the baseline must compile; any other row may fail alone
            if entry.label == BASELINE:
                raise
            traceback.print_exc()
            failed.append(dict(label=entry.label, error=failure(error)))
            continue
        print(f'  {item["compile_seconds"]:.0f}s; {item["flops_infer"] / 1e9:.2f} GFLOP/img forward, '
              f'peak train {item["memory_train"] / 2**20:.0f} MiB', file=sys.stderr, flush=True)
        prepared.append(item)
    results = {}
    for kind in ('train', 'infer'):
        candidates = {item['entry'].label: item['run_step' if kind == 'train' else 'run_infer']
                      for item in prepared}
        print(f'timing {kind} ({args.reps} interleaved repetitions) ...', file=sys.stderr, flush=True)
        results[kind] = timing.interleaved(candidates, args.reps, warmup=args.warmup,
                                           slow_seconds=args.slow_seconds)
    rows = []
    for item in prepared:
        entry = item['entry']
        train_images_per_second = args.batch / timing.median(results['train'][entry.label]['wall'])
        mfu = (None if args.peak_tflops is None
               else item['flops_train'] * train_images_per_second / (args.peak_tflops * 1e12))
        rows.append(dict(
            label=entry.label, row=entry.row, dtype=entry.dtype, remat=entry.remat,
            derivative_impl=entry.impl, block_impl=entry.block_impl, params=item['params'],
            flops_infer_per_image=item['flops_infer'], flops_train_per_image=item['flops_train'],
            flops_train_compiled_per_image=item['flops_train_compiled'],
            peak_bytes_train=item['memory_train'], peak_bytes_infer=item['memory_infer'],
            compile_seconds=item['compile_seconds'],
            train_seconds=results['train'][entry.label],
            infer_seconds=results['infer'][entry.label], mfu=mfu))
    return dict(device=timing.device_name(), backend=jax.default_backend(), batch=args.batch,
                peak_tflops=args.peak_tflops, peak_tflops_source=args.peak_tflops_source,
                image_size=args.image_size, num_classes=args.num_classes, dtype=args.dtype,
                stages=args.stages,
                reps=args.reps, clock=args.clock, default_impl=DEFAULT_IMPL, git=timing.git_revision(),
                load_average_at_end=timing.load_average(), note=args.note, rows=rows, failed=failed)


def failure(error: Exception) -> str:
    """The first line of an error, with its type, at most 300 characters."""
    lines = str(error).strip().splitlines() or ['']
    return f'{type(error).__name__}: {lines[0]}'[:300]


def markdown(report: dict) -> str:
    clock, batch = report['clock'], report['batch']
    rows = report['rows']
    base = next(row for row in rows if row['label'] == BASELINE)

    def seconds(row, kind, which):
        return timing.median(row[f'{kind}_seconds'][which])

    def fmt_ratio(value):
        return f'{value:.2f}x'

    peak = report['peak_tflops']
    mfu_text = (f'training FLOPs per image (the lowered program\'s, as in the FLOPs columns) x '
                f'train img/s / the {peak:g} TFLOP/s dense bfloat16 peak '
                f'({report["peak_tflops_source"]})' if peak is not None
                else 'n/a, no bfloat16 peak known for this device (`--peak-tflops`)')
    lines = [
        '# Models side by side: ResNet50 = 1.00x',
        '',
        timing.provenance_line(report),
        '',
        (f'The first {report["stages"]} stage(s) of each model, with its stem, pool and head. '
         if report.get('stages') else '')
        + f'{report["image_size"]}x{report["image_size"]} images, '
        f'{report["num_classes"]} classes, batch {batch}, compute dtype {report["dtype"]} unless the '
        f'label says otherwise, derivative implementation `{report["default_impl"]}` unless it says '
        f'[K: ...], block implementation `xla` unless it says (block_impl=...). Medians of '
        f'{report["reps"]} interleaved repetitions. {report["note"]}',
        '',
        f'Speed ratios (`x RN50`, > 1 is faster than ResNet50) use '
        f'{"process CPU time (all threads), robust on a shared machine" if clock == "cpu" else "wall time"}'
        f'; img/s columns are wall clock. FLOPs: XLA cost analysis of the lowered program, per image '
        f'(a multiply-add is 2 FLOPs). Memory: XLA memory analysis of the compiled program '
        f'(arguments + outputs - donated + temporaries), MiB. MFU: {mfu_text}. A block_impl=pallas '
        f'row\'s FLOPs are its model\'s, counted on its block_impl=xla program.',
        '',
        '| model | params (M) | x RN50 | GFLOPs fwd | x RN50 | train img/s | train x RN50 | '
        'infer img/s | infer x RN50 | train peak MiB | x RN50 | infer peak MiB | train MFU |',
        '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for row in rows:
        train_speed = seconds(base, 'train', clock) / seconds(row, 'train', clock)
        infer_speed = seconds(base, 'infer', clock) / seconds(row, 'infer', clock)
        lines.append(
            f'| {row["label"]} | {row["params"] / 1e6:.2f} | {fmt_ratio(row["params"] / base["params"])} '
            f'| {row["flops_infer_per_image"] / 1e9:.2f} '
            f'| {fmt_ratio(row["flops_infer_per_image"] / base["flops_infer_per_image"])} '
            f'| {batch / seconds(row, "train", "wall"):.1f} | **{fmt_ratio(train_speed)}** '
            f'| {batch / seconds(row, "infer", "wall"):.1f} | {fmt_ratio(infer_speed)} '
            f'| {row["peak_bytes_train"] / 2**20:.0f} '
            f'| {fmt_ratio(row["peak_bytes_train"] / base["peak_bytes_train"])} '
            f'| {row["peak_bytes_infer"] / 2**20:.0f} '
            f'| {"n/a" if row["mfu"] is None else format(row["mfu"], ".1%")} |')
    lines += ['', 'Spread (half inter-quartile range / median) of the training-step times: ' + ', '.join(
        f'{row["label"]} {timing.spread(row["train_seconds"][clock]):.0%}' for row in rows) + '.']
    lines += [f'\nNot measured, failed to compile: {item["label"]} ({item["error"]}).'
              for item in report.get('failed', [])]
    return '\n'.join(lines) + '\n'


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--num-classes', type=int, default=100)
    parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32')
    parser.add_argument('--models', default='all',
                        help="';'-separated Table 1 rows or config names, e.g. 'eq3_softball;eq4' "
                             "(ResNet50 is always included; default: all)")
    parser.add_argument('--impl', choices=IMPLEMENTATIONS, default=DEFAULT_IMPL,
                        help='derivative implementation of the QHNet rows')
    parser.add_argument('--block-impls', type=lambda s: s.split(','), default=['xla'],
                        help="','-separated block implementations of the Eq. (3) rows without "
                             f"mixing maps, one row each: {', '.join(BLOCK_IMPLS)} (default 'xla')")
    parser.add_argument('--variants', action='store_true',
                        help=f'add {MAIN} with remat, with the other dtype, with the other --impls; '
                             f'{BASELINE} with the other dtype')
    parser.add_argument('--impls', type=lambda s: s.split(','), default=['folded'],
                        help="derivative implementations for --variants (default 'folded': 'grouped' "
                             'takes minutes per step on XLA:CPU; include it on a GPU)')
    parser.add_argument('--stages', type=int, default=None,
                        help='time the first N stages of every model (default: all)')
    parser.add_argument('--reps', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--slow-seconds', type=float, default=120.0,
                        help='a program slower than this per call is timed once')
    parser.add_argument('--clock', choices=('cpu', 'wall'), default=None,
                        help="speed ratios from 'cpu' (process CPU time; default on CPU) or 'wall'")
    parser.add_argument('--peak-tflops', type=float, default=None,
                        help="the chip's dense bfloat16 peak TFLOP/s for the MFU column (default: "
                             'looked up from the device kind: H100 SXM/H200 989, H100 PCIe 756, '
                             'A100 312; other devices get no MFU)')
    parser.add_argument('--note', default='')
    parser.add_argument('--out', default=None,
                        help='path stem for .md and .json outputs (default: '
                             'benchmarks/results/<device>/models)')
    args = parser.parse_args(argv)
    if args.stages is not None and not 1 <= args.stages <= 4:
        parser.error(f'--stages {args.stages}: the models have 4 stages; choose 1 to 4')
    if not set(args.block_impls) <= set(BLOCK_IMPLS):
        parser.error(f'--block-impls {",".join(args.block_impls)}: choose from {", ".join(BLOCK_IMPLS)}')
    args.out = args.out or timing.results_stem(f'models_stage{args.stages}' if args.stages else 'models')
    args.clock = args.clock or ('cpu' if jax.default_backend() == 'cpu' else 'wall')
    if args.peak_tflops is None:
        device_kind = jax.devices()[0].device_kind
        args.peak_tflops = timing.peak_bf16_tflops(device_kind)
        args.peak_tflops_source = f'looked up from the device kind {device_kind!r}'
    else:
        args.peak_tflops_source = '--peak-tflops'
    report = {**timing.provenance_fields(MODULE, argv), **measure(args)}
    text = markdown(report)
    print(text)
    timing.write_report(args.out, text, report)
    if report['failed']:
        raise SystemExit(f'failed: {", ".join(item["label"] for item in report["failed"])}')


if __name__ == '__main__':
    main()
