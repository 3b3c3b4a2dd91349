"""`benchmarks/gpu_quick.sh --dry-run`: every step of the quick GPU benchmark end to end,
at tiny sizes on the CPU; the step benchmark's comparison of two versions' models; the rows
of the models benchmark per block implementation; the fused product's byte and FLOP counts
and the kernels benchmark's table, with a candidate that failed to compile."""

import argparse
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# About 8.5 to 10 minutes on 2 cores, most of it compiling the fused kernels in the Pallas
# interpreter (the models' pallas rows and the kernels benchmark).
@pytest.mark.slow
def test_gpu_quick_dry_run(tmp_path):
    result = subprocess.run(['bash', 'benchmarks/gpu_quick.sh', '--dry-run'], cwd=ROOT, text=True,
                            capture_output=True, timeout=1800, check=False,
                            env={**os.environ, 'OUT': str(tmp_path), 'PYTHON': sys.executable})
    assert result.returncode == 0, result.stderr[-5000:]

    reports = {}
    for stem in ('models', 'kernels', 'models_stage1', 'derivative', 'pipeline'):
        reports[stem] = json.loads((tmp_path / f'{stem}.json').read_text())
        device = reports[stem]['device']
        assert '(cpu, jax ' in device, device
        module = stem.split('_')[0]
        assert reports[stem]['command'].startswith(f'python -m benchmarks.{module} '), stem
        # The title, then one line naming the command, the device and the date.
        title, provenance = [line for line in (tmp_path / f'{stem}.md').read_text().splitlines()
                             if line][:2]
        assert title.startswith('# '), stem
        assert provenance == (f'Command: `{reports[stem]["command"]}`. Device: {device}. '
                              f'Date: {reports[stem]["date"]}.'), provenance

    models = reports['models']
    assert [row['label'] for row in models['rows']] == [
        'ResNet50', 'Eq. (3) softball@ds (block_impl=xla)', 'Eq. (3) softball@ds (block_impl=pallas)']
    assert [row['block_impl'] for row in models['rows']] == [None, 'xla', 'pallas']
    assert models['failed'] == []
    # The pallas row's FLOPs are counted on the same model's XLA program.
    assert models['rows'][1]['flops_train_per_image'] == models['rows'][2]['flops_train_per_image'] > 0
    assert models['peak_tflops'] is None  # no known peak on a CPU: the MFU column reads n/a
    assert all(row['mfu'] is None for row in models['rows'])
    table = (tmp_path / 'models.md').read_text()
    assert '| train MFU |' in table and table.count('| n/a |') == 3, table
    stage1 = reports['models_stage1']
    assert stage1['stages'] == 1 and stage1['failed'] == []
    assert [row['label'] for row in stage1['rows']] == [row['label'] for row in models['rows']]
    # Stage 1 alone has fewer parameters than the whole model, for every row.
    assert all(cut['params'] < whole['params'] for cut, whole in zip(stage1['rows'], models['rows']))
    assert 'The first 1 stage(s) of each model' in (tmp_path / 'models_stage1.md').read_text()

    derivative = reports['derivative']
    assert derivative['image_size'] == 32 and derivative['impls'] == ['folded', 'stencil']
    assert len(derivative['layers']) == 14
    for layer in derivative['layers']:
        assert set(layer['times']) == {'fwd', 'train'}
    kernels = reports['kernels']
    assert kernels['image_size'] == 32 and kernels['tiles'] == ['64x32x64/w4s1']
    assert len(kernels['layers']) == 7
    for layer in kernels['layers']:
        assert layer['errors'] == {}
        assert set(layer['times']) == {'xla'} | {f'64x32x64/w4s1 {part}' for part in (
            'product', 'moments', 'forward', 'uncombined', 'backward', 'input')}
    assert reports['pipeline']['old'] == []  # --no-baseline
    assert [run['workers'] for run in reports['pipeline']['workers']] == [1, 1]
    for layout in ('ws m=4 (Eq. 3)', 'no ws m=4 (Eq. 3 no ws)'):
        assert f'fastest K in train mode (forward + backward), {layout}: ' in result.stdout, \
            result.stdout[-3000:]
    assert 'Eq. (3) product per network (forward + backward), 64x32x64/w4s1: ' in result.stdout, \
        result.stdout[-3000:]
    assert 'Eq. (3) softball@ds training against ResNet50 (' in result.stdout, result.stdout[-3000:]
    assert 'Eq. (3) softball@ds training against ResNet50, first 1 stage(s) (' in result.stdout
    assert 'pallas not measured' not in result.stdout


def test_step_benchmark_separates_model_changes():
    from benchmarks import step
    baseline = dict(stem='small', widths=[16, 32, 128, 256], depths=[1, 1, 1, 1],
                    derivative_impl='folded', retired_field=1)
    current = dict(stem='small_stride2', widths=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                   derivative_impl='stencil', stream_widths=None)
    # How the code computes K is the code's; a field one version lacks is not compared.
    assert step.model_changes(baseline, current) == dict(stem='small', widths=[16, 32, 128, 256])
    assert step.model_changes(current, current) == {}


def test_models_rows_per_block_impl():
    from benchmarks import models
    args = argparse.Namespace(models='eq3_softball;eq4;eq3_nows', dtype='bfloat16', impl='stencil',
                              block_impls=['xla', 'pallas'], variants=False, impls=['folded'],
                              stages=None)
    # Eq. (4)'s blocks have no fused product: one row, the layers'.
    assert [(entry.label, entry.block_impl) for entry in models.entries(args)] == [
        ('ResNet50', None),
        ('Eq. (3) softball@ds (block_impl=xla)', 'xla'),
        ('Eq. (3) softball@ds (block_impl=pallas)', 'pallas'),
        ('Eq. (3) no ws (block_impl=xla)', 'xla'),
        ('Eq. (3) no ws (block_impl=pallas)', 'pallas'),
        ('Eq. (4)', 'xla'),
    ]
    # The default keeps the labels of the committed tables.
    args.block_impls = ['xla']
    assert [entry.label for entry in models.entries(args)] == [
        'ResNet50', 'Eq. (3) softball@ds', 'Eq. (3) no ws', 'Eq. (4)']


def test_models_cut_to_their_first_stages():
    from benchmarks import models
    args = argparse.Namespace(models='all', dtype='float32', impl='stencil', block_impls=['xla'],
                              variants=False, impls=['folded'], stages=1)
    labels = [entry.label for entry in models.entries(args)]
    assert labels[:2] == ['ResNet50', 'Eq. (3) relu@all'] and 'MobileNet_v3_large' not in labels
    for entry in models.entries(args)[:2]:
        model = models.build(entry, 100, stages=1)
        assert (tuple(model.widths), tuple(model.depths)) == ((64,), (3,)), entry.label


def test_fused_product_counts():
    from benchmarks.kernels import product_bytes, product_flops
    # u 2x4x4x8, stride 2, m = 4, n' = 16, bfloat16: u 512 bytes, z 2x2x2x16 = 256 bytes; weights
    # C 8x32 + K 9x4 + A 32x16 + BN_d 2x32 = 868 float32 = 3472 bytes, read in both passes and
    # their gradients written: 512 + 3472 + 256 + (512 + 256 + 3472 + 512 + 3472).
    assert product_bytes(2, 4, 8, 2, 4, True, 2) == 12464
    # Per-channel kernels: K 9x32 instead of 9x4, 1008 more bytes in each of its three passes.
    assert product_bytes(2, 4, 8, 2, 4, False, 2) == 12464 + 3 * 1008
    # P = 2x2x2 output pixels: 2P (8x32 + 9x32 + 32x16) forward, x3 with the backward pass.
    assert product_flops(2, 4, 8, 2, 4) == 3 * 2 * 8 * (256 + 288 + 512)
    assert product_flops(2, 4, 8, 1, 4) == 3 * 2 * 32 * (256 + 288 + 256)  # stride 1: n' = n


def test_registers_table_marks_spills_and_failures():
    from benchmarks import registers

    fine = dict(registers=152, stack=0, shared=8192)
    kernels = {'64x32x64/w4s1 moments': dict(registers=255, stack=1120, shared=256),
               '64x32x64/w4s1 forward': fine, '64x32x64/w4s1 uncombined': fine,
               '64x32x64/w4s1 backward': fine,
               '64x32x64/w4s1 input': 'CompilationError: out of resources'}
    report = dict(triton='3.9.0', shared=True, tiles=['64x32x64/w4s1'],
                  layers=[dict(size=56, channels=64, stride=1, kernels=kernels)])
    text = registers.markdown(report)
    assert ('| 56x56x64/1 | 64x32x64/w4s1 | 255, **1120 B spilled**, 0.2 KiB | 152, 8.0 KiB | '
            '152, 8.0 KiB | 152, 8.0 KiB | failed |') in text, text
    assert registers.spills(report) == ['56x56x64/1 64x32x64/w4s1 moments',
                                        '56x56x64/1 64x32x64/w4s1 input']
    assert 'Failed: 56x56x64/1 64x32x64/w4s1 input: CompilationError: out of resources.' in text


def test_kernels_table_reports_a_failed_candidate():
    from benchmarks import kernels

    def times(ms):
        return {'wall': [ms / 1e3], 'cpu': [ms / 1e3]}

    tiles = ['64x32x64/w4s1', '128x32x64/w8s1']
    layer = dict(size=56, channels=64, stride=1, count=3, bytes=4e8, flops=2e11,
                 io={f'{t} {kernel}': size for t in tiles for kernel, size in dict(
                     moments=1e8, forward=2e8, uncombined=4e8, backward=5e8, input=3e8).items()},
                 stored={'64x32x64/w4s1': False, '128x32x64/w8s1': True},
                 errors={'128x32x64/w8s1 product': 'ValueError: out of shared memory'},
                 times={'xla': times(4.0), '64x32x64/w4s1 product': times(2.0),
                        '64x32x64/w4s1 moments': times(0.1), '64x32x64/w4s1 forward': times(0.4),
                        '64x32x64/w4s1 uncombined': times(0.5),
                        '64x32x64/w4s1 backward': times(0.8), '64x32x64/w4s1 input': times(0.3),
                        '128x32x64/w8s1 moments': times(0.2), '128x32x64/w8s1 forward': times(0.5),
                        '128x32x64/w8s1 uncombined': times(0.6),
                        '128x32x64/w8s1 backward': times(1.0), '128x32x64/w8s1 input': times(0.3)})
    report = dict(clock='wall', batch=256, dtype='bfloat16', reps=1, shared=True,
                  default_impl='stencil', tiles=tiles, peak_tflops=989.0, peak_gbps=4800.0,
                  device_kind='NVIDIA H200', layers=[layer])
    text = kernels.markdown(report)
    # 4e8 bytes in 2 ms: 200 GB/s, 4% of 4800; 2e11 FLOPs: 100 TFLOP/s, 10% of 989; the rest
    # 2.0 - (0.1 + 0.4 + 0.8 + 0.3) ms, without the uncombined kernel, which these tiles do
    # not run on this layer (in brackets); the other tiles store the product instead.
    assert ('| 56x56x64/1 x3 | 64x32x64/w4s1 | 4.00 | 2.00 | 2.00x | 200 (4%) | 100 (10%) | '
            '0.10 (1000 (21%)) | 0.40 (500 (10%)) | [0.50 (800 (17%))] | 0.80 (625 (13%)) | '
            '0.30 (1000 (21%)) | 0.40 |' in text), text
    assert '| 0.20 (500 (10%)) | [0.50 (400 (8%))] | 0.60 (667 (14%)) |' in text, text
    assert '| 56x56x64/1 x3 | 128x32x64/w8s1 | 4.00 | failed |  |  |  | 0.20 (' in text, text
    assert '| 64x32x64/w4s1 | 6.0 | 0.3 | 1.2 | 0.0 | 2.4 | 0.9 | 2.00x |' in text, text
    assert '| 128x32x64/w8s1 | failed | 0.6 | 0.0 | 1.8 | 3.0 | 0.9 |  |' in text, text
    assert 'Fastest tiles per layer: 56x56x64/1 64x32x64/w4s1.' in text
    assert 'Failed to compile: 56x56x64/1 128x32x64/w8s1 product: ValueError: out of shared ' \
        'memory.' in text
