"""Where a training step's time goes: an XLA profile attributed to the model's layers.

    python -m benchmarks.profile                           # ResNet50 and the Eq. (3) model
    python -m benchmarks.profile --models 'resnet50;eq3_nows' --batch 8 --steps 3

Traces `--steps` training steps of each model with `jax.profiler`, reads the trace
back (`jax.profiler.ProfileData`), and attributes every executed XLA op (a fusion, a
convolution, a dot, ...) to the layer it came from through the op's metadata
(`op_name`, e.g. `transpose(jvp(QHNet))/stage2_block1/.../derivative/mul`): the
derivative operator K, dense convolutions (1x1 and 3x3; stem), batchnorm, the block's
own elementwise work (the product, residual add, activation), the head and loss, and
the optimizer update; forward and backward separately. A fusion counts for the layer
of its first op with metadata, so a fused BN + product lands on one of the two; ops the
compiler made without metadata (e.g. most backward convolutions on XLA:CPU) are
counted by kind, direction unknown.

Op durations are summed over all threads (CPU time spent in XLA ops). Writes a markdown
report (stdout and `--out`.md) and JSON (`--out`.json); `--out` defaults to
benchmarks/results/<device>/profile (`timing.device_slug()`: cpu_2core, gpu_h200, ...),
overwritten by a rerun.
"""

import argparse
import collections
import glob
import os
import re
import shutil
import sys
import tempfile

import jax

from benchmarks import models as model_bench
from benchmarks import timing
from qhnet import config as qhnet_config

DENSE = re.compile(r'^(Conv_\d+|coef|combine|shortcut|stem_conv|conv.*|Dense_\d+)$')
NORM = re.compile(r'(BatchNorm|_bn$|^bn)')
BLOCK = re.compile(r'^stage\d+_block\d+$')
MODULE = 'benchmarks.profile'


def categorise(op_name: str, kind: str = '') -> tuple[str, str]:
    """(layer category, 'forward' | 'backward' | 'update' | '?') of an op's metadata op_name."""
    if not op_name:  # made by the compiler with no trace back to the model
        if kind in ('convolution', 'dot'):
            return 'dense convolutions', '?'
        if kind == 'reduce-window':
            return 'head, pool, loss', '?'
        return 'no metadata (copies, transposes made by the compiler)', '?'
    if 'transpose(' in op_name:
        direction = 'backward'
    elif 'jvp(' in op_name:
        direction = 'forward'
    else:
        return 'optimizer update, loss, step bookkeeping', 'update'
    segments = [s for s in op_name.split('/') if s]
    in_block = False
    for segment in segments:
        name = segment.split('.')[-1]
        if name == 'derivative':
            return 'K (derivative operator)', direction
        if NORM.search(name):
            return 'batchnorm', direction
        if DENSE.match(name):
            return 'dense convolutions', direction
        if name == 'head':
            return 'head, pool, loss', direction
        in_block = in_block or bool(BLOCK.match(name))
    if in_block:
        return 'block elementwise (product, residual, activation)', direction
    return 'head, pool, loss', direction


def hlo_metadata(compiled_text: str) -> dict[str, tuple[str, str]]:
    """instruction name -> (kind, op_name) from a compiled module's text. An instruction
    without metadata of its own (backend fusions made late, e.g. XLA:CPU's YNNPACK ones)
    takes the first op_name found in the computation it calls; `kind` is its opcode, or
    'convolution' / 'dot' / 'reduce-window' when the computation it calls holds one."""
    instructions, computation_names, computation_kinds = {}, {}, collections.defaultdict(set)
    current = None
    for line in compiled_text.splitlines():
        header = re.match(r'^(?:ENTRY )?%?([\w.\-]+) \(', line)
        if header and not line.startswith(' '):
            current = header.group(1)
            continue
        match = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\(', line)
        if not match:
            continue
        name, opcode = match.groups()
        op_name = re.search(r'op_name="([^"]+)"', line)
        op_name = op_name.group(1) if op_name else ''
        calls = re.search(r'calls=%?([\w.\-]+)', line)
        instructions[name] = (opcode, op_name, calls.group(1) if calls else None)
        if current:
            computation_kinds[current].add(opcode)
            if op_name and current not in computation_names:
                computation_names[current] = op_name
    result = {}
    for name, (opcode, op_name, calls) in instructions.items():
        kinds = computation_kinds.get(calls, set()) | {opcode}
        kind = next((k for k in ('convolution', 'dot', 'reduce-window') if k in kinds), opcode)
        result[name] = (kind, op_name or computation_names.get(calls, ''))
    return result


def profile(entry, args, config) -> dict:
    item = model_bench.prepare(entry, args, config)
    for _ in range(2):
        timing.block(item['run_step']())
    compiled_text = item['step_text']()
    metadata = hlo_metadata(compiled_text)
    directory = tempfile.mkdtemp(prefix='qhnet_profile_')
    try:
        with jax.profiler.trace(directory):
            for _ in range(args.steps):
                timing.block(item['run_step']())
        path = glob.glob(os.path.join(directory, '**', '*.xplane.pb'), recursive=True)[0]
        data = jax.profiler.ProfileData.from_file(path)
        totals = collections.Counter()
        per_op = collections.Counter()
        for plane in data.planes:
            for line in plane.lines:
                for event in line.events:
                    stats = dict(event.stats)
                    op = stats.get('hlo_op')
                    if not op or 'train_step' not in str(stats.get('hlo_module', '')):
                        continue
                    opcode, op_name = metadata.get(op, ('?', ''))
                    category, direction = categorise(op_name, opcode)
                    totals[category, direction] += event.duration_ns
                    per_op[op, opcode, op_name] += event.duration_ns
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    scale = 1e-6 / args.steps  # ns -> ms per step
    return dict(label=entry.label,
                categories={f'{c} | {d}': v * scale for (c, d), v in totals.items()},
                top_ops=[(op, opcode, op_name, v * scale) for (op, opcode, op_name), v in per_op.most_common(args.top)])


def markdown(report: dict) -> str:
    lines = ['# Training-step profile: where the time goes', '',
             timing.provenance_line(report), '',
             f'Batch {report["batch"]}, {report["image_size"]}x'
             f'{report["image_size"]}, {report["dtype"]}, {report["steps"]} traced steps; milliseconds of '
             f'XLA op time per step, summed over threads. {report["note"]}', '']
    for result in report['models']:
        total = sum(result['categories'].values())
        lines += [f'## {result["label"]}: {total:.0f} ms of op time per step', '',
                  '| layers | forward ms | backward ms | update ms | not known ms | share |',
                  '|---|---:|---:|---:|---:|---:|']
        by_category = collections.defaultdict(dict)
        for key, value in result['categories'].items():
            category, direction = key.split(' | ')
            by_category[category][direction] = value
        for category, parts in sorted(by_category.items(), key=lambda kv: -sum(kv[1].values())):
            lines.append(f'| {category} | {parts.get("forward", 0):.0f} | {parts.get("backward", 0):.0f} '
                         f'| {parts.get("update", 0):.0f} | {parts.get("?", 0):.0f} '
                         f'| {sum(parts.values()) / total:.0%} |')
        lines += ['', f'Top {len(result["top_ops"])} ops:', '', '| op | kind | from | ms |', '|---|---|---|---:|']
        for op, opcode, op_name, value in result['top_ops']:
            short = re.sub(r'^jit\(train_step\)/', '', op_name)[-90:]
            lines.append(f'| `{op}` | {opcode} | `{short}` | {value:.1f} |')
        lines.append('')
    return '\n'.join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', default=f'{model_bench.BASELINE};{model_bench.MAIN}',
                        help="';'-separated Table 1 rows or config names")
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--num-classes', type=int, default=100)
    parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32')
    parser.add_argument('--impl', default=None, help='derivative implementation (default: the default)')
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--top', type=int, default=12)
    parser.add_argument('--note', default='')
    parser.add_argument('--out', default=None,
                        help='path stem for .md and .json outputs (default: '
                             'benchmarks/results/<device>/profile)')
    args = parser.parse_args(argv)
    args.out = args.out or timing.results_stem('profile')
    config = qhnet_config.get_config()
    results = []
    for row in model_bench.select_rows(args.models):
        is_qhnet = model_bench.row_config(row).model.name == 'qhnet'
        impl = (args.impl or model_bench.DEFAULT_IMPL) if is_qhnet else None
        entry = model_bench.Entry(row, row, args.dtype, impl=impl)
        print(f'profiling {row} ...', file=sys.stderr, flush=True)
        results.append(profile(entry, args, config))
    report = dict(**timing.provenance_fields(MODULE, argv), batch=args.batch, image_size=args.image_size,
                  dtype=args.dtype, steps=args.steps, note=args.note, models=results)
    text = markdown(report)
    print(text)
    timing.write_report(args.out, text, report)


if __name__ == '__main__':
    main()
