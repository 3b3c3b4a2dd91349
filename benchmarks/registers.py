"""Registers, spills and shared memory of Eq. (3)'s fused kernels (`qhnet.models.fused_kernels`)
as Triton compiles them for an sm_90 GPU (H100, H200), on any machine, no GPU needed.

    python -m benchmarks.registers                                 # every layer, default tiles
    python -m benchmarks.registers --tiles 64x32x64/w4s1,32x32x256/w8s1 --per-channel

Each kernel is lowered for CUDA by jax (its Triton IR, as XLA receives it) and compiled to a
cubin by the `triton` package from PyPI (Linux x86-64; in `.[dev]`), whose bundled `cuobjdump`
reads the cubin's resources: registers per thread (255 at most), stack bytes per thread
(spilled registers: none of the kernels keeps an array in local memory, so any stack is a
spill, and a spill in a loop costs a round trip to memory) and shared memory per program.
The device compiles with the Triton inside its jaxlib, another version: its counts may
differ, not the structure that causes them. Lowering for CUDA on a machine without a GPU
takes a jaxlib up to 0.10.2, which leaves Triton's compilation to XLA (later ones compile
while lowering, through the GPU plugin). Writes markdown (stdout and `--out`.md) and JSON
(`--out`.json); `--out` defaults to benchmarks/results/sm_90/registers (registers_per_channel
with `--per-channel`). Exit status 1 when a kernel spills or fails to compile.
"""

import argparse
import functools
import os
import re
import subprocess
import sys
import tempfile
import traceback

import jax
import jax.numpy as jnp
from jax.interpreters import mlir

from benchmarks import timing
from benchmarks.derivative import LAYERS
from benchmarks.kernels import KERNELS, add_layer_arguments, kernel_calls, parse_layer_arguments
from benchmarks.models import failure
from qhnet.models import fused_kernels

MODULE = 'benchmarks.registers'
TARGET = 90  # compute capability: Hopper (H100, H200)
TRITON_CALL = '__gpu$xla.gpu.triton'


def triton_programs(lowered) -> list[dict]:
    """The Triton programs in a function lowered for CUDA: for each of its `pallas_call`s, the
    Triton IR as text and the warps and stages it asks for."""
    from jaxlib.mlir import ir
    from jaxlib.triton import dialect

    context = mlir.make_ir_context()
    dialect.register_dialect(context)
    programs = []

    def visit(operation):
        for region in operation.regions:
            for block in region.blocks:
                for op in block.operations:
                    attributes = op.operation.attributes
                    if (op.operation.name == 'stablehlo.custom_call'
                            and ir.StringAttr(attributes['call_target_name']).value == TRITON_CALL):
                        config = attributes['mhlo.backend_config']
                        module = ir.Module.parse(ir.StringAttr(config['ir']).value_bytes, context=context)
                        programs.append(dict(
                            ir=module.operation.get_asm(enable_debug_info=False),
                            warps=ir.IntegerAttr(config['num_warps']).value,
                            stages=ir.IntegerAttr(config['num_stages']).value))
                    visit(op.operation)

    visit(lowered.compiler_ir('stablehlo').operation)
    return programs


def compile_for_gpu(program: dict) -> dict:
    """{'registers', 'stack', 'shared'} of one Triton program compiled for sm_90 by the
    `triton` package: registers per thread, stack (spill) and shared-memory bytes."""
    os.environ.setdefault('TRITON_DEFAULT_FP_FUSION', '1')  # Triton's default, stated
    import triton
    from triton.backends.compiler import GPUTarget

    tools = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin')
    with tempfile.TemporaryDirectory() as directory:
        source = os.path.join(directory, 'kernel.ttir')
        with open(source, 'w') as f:
            f.write(program['ir'])
        kernel = triton.compile(source, target=GPUTarget('cuda', TARGET, 32),
                                options=dict(num_warps=program['warps'],
                                             num_stages=program['stages']))
        cubin = os.path.join(directory, 'kernel.cubin')
        with open(cubin, 'wb') as f:
            f.write(kernel.asm['cubin'])
        usage = subprocess.run([os.path.join(tools, 'cuobjdump'), '--dump-resource-usage', cubin],
                               capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r'(REG|STACK):(\d+)', usage))
    return dict(registers=int(fields['REG']), stack=int(fields['STACK']),
                shared=kernel.metadata.shared)


def layer_resources(size, channels, stride, shared, tiles_list) -> dict:
    """'<tiles> <kernel>' -> its resources, or an error string, on one layer."""
    calls, geometry = kernel_calls(1, size, channels, stride, shared, jnp.bfloat16, interpret=False)
    results = {}
    for tiles in tiles_list:
        tiled = fused_kernels.Geometry(geometry.height, geometry.width, stride, tiles)
        for name, (call, inputs) in calls.items():
            try:
                lowered = jax.jit(functools.partial(call, geometry=tiled)).trace(*inputs).lower(
                    lowering_platforms=('cuda',))
                [program] = triton_programs(lowered)
                results[f'{tiles} {name}'] = compile_for_gpu(program)
            except Exception as error:  # reported in the table; the others still compile
                traceback.print_exc()
                results[f'{tiles} {name}'] = failure(error)
    return results


def spills(report) -> list[str]:
    """'<layer> <tiles> <kernel>' of every kernel that spills or failed to compile."""
    return [f'{_layer(row)} {name}' for row in report['layers']
            for name, value in row['kernels'].items()
            if not isinstance(value, dict) or value['stack']]


def _layer(row):
    return f'{row["size"]}x{row["size"]}x{row["channels"]}/{row["stride"]}'


def _cell(value):
    if not isinstance(value, dict):
        return 'failed'
    spill = f', **{value["stack"]} B spilled**' if value['stack'] else ''
    return f'{value["registers"]}{spill}, {value["shared"] / 1024:.1f} KiB'


def markdown(report: dict) -> str:
    lines = ['# Eq. (3)\'s fused kernels compiled for sm_90: registers, spills, shared memory', '',
             timing.provenance_line(report), '',
             f'Triton {report["triton"]}, sm_{TARGET}, '
             f'{"one shared bank" if report["shared"] else "a bank per channel"} of m = 4 '
             'kernels, bfloat16. Each cell: registers per thread (of 255), the bytes per thread '
             'spilled to local memory (none, unless in bold), shared memory per program.', '',
             '| layer (HxWxC/stride) | tiles | ' + ' | '.join(KERNELS) + ' |',
             '|' + '---|' * (len(KERNELS) + 2)]
    for row in report['layers']:
        for tiles in report['tiles']:
            cells = [_cell(row['kernels'][f'{tiles} {kernel}']) for kernel in KERNELS]
            lines.append(f'| {_layer(row)} | {tiles} | ' + ' | '.join(cells) + ' |')
    bad = spills(report)
    lines += ['', 'Spills or failures: ' + ', '.join(bad) + '.' if bad else 'No kernel spills.']
    failed = [f'{_layer(row)} {name}: {value}' for row in report['layers']
              for name, value in row['kernels'].items() if not isinstance(value, dict)]
    lines += ['', 'Failed: ' + '; '.join(failed) + '.'] if failed else []
    return '\n'.join(lines) + '\n'


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    add_layer_arguments(parser)
    parser.add_argument('--out', default=None, help='path stem for .md and .json outputs (default: '
                                                    'benchmarks/results/sm_90/registers, '
                                                    'registers_per_channel with --per-channel)')
    args = parser.parse_args(argv)
    try:
        import triton
    except ImportError:
        parser.error("needs the 'triton' package (Linux x86-64): pip install -e '.[dev]'")
    parse_layer_arguments(parser, args)
    layers = []
    for index in args.layers:
        size, channels, stride, _ = LAYERS[index]
        row = dict(size=size, channels=channels, stride=stride)
        row['kernels'] = layer_resources(size, channels, stride, not args.per_channel, args.tiles)
        print(f'  {_layer(row)}: compiled', file=sys.stderr, flush=True)
        layers.append(row)
    report = {**timing.provenance_fields(MODULE, argv), 'device': f'sm_{TARGET} (compiled, not run)',
              'triton': triton.__version__, 'jax': jax.__version__, 'shared': not args.per_channel,
              'tiles': [str(tiles) for tiles in args.tiles], 'layers': layers}
    text = markdown(report)
    print(text)
    stem = 'registers_per_channel' if args.per_channel else 'registers'
    timing.write_report(args.out or os.path.join(timing.RESULTS, f'sm_{TARGET}', stem), text, report)
    if spills(report):
        raise SystemExit('kernels that spill or failed: ' + ', '.join(spills(report)))


if __name__ == '__main__':
    main()
