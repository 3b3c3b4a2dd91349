"""`benchmarks/gpu_quick.sh --dry-run`: every step of the quick GPU benchmark end to end,
at tiny sizes on the CPU; the step benchmark's comparison of two versions' models; the rows
of the models benchmark per block implementation; the fused product's byte and FLOP counts
and its table when a candidate fails to compile."""

import argparse
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# About 9.5 minutes on 2 shared cores, most of it compiling the fused kernels in the Pallas
# interpreter (the models' pallas row and the derivative benchmark's `fused` mode).
@pytest.mark.slow
def test_gpu_quick_dry_run(tmp_path):
    result = subprocess.run(['bash', 'benchmarks/gpu_quick.sh', '--dry-run'], cwd=ROOT, text=True,
                            capture_output=True, timeout=1800, check=False,
                            env={**os.environ, 'OUT': str(tmp_path), 'PYTHON': sys.executable})
    assert result.returncode == 0, result.stderr[-5000:]

    reports = {}
    for stem in ('models', 'derivative', 'pipeline'):
        reports[stem] = json.loads((tmp_path / f'{stem}.json').read_text())
        device = reports[stem]['device']
        assert '(cpu, jax ' in device, device
        assert reports[stem]['command'].startswith(f'python -m benchmarks.{stem} '), stem
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

    derivative = reports['derivative']
    assert derivative['image_size'] == 32 and derivative['impls'] == ['folded', 'stencil']
    assert len(derivative['layers']) == 14
    for layer in derivative['layers']:
        assert set(layer['times']) == {'fwd', 'train'}
        assert set(layer['fused']['times']) == {'pallas', 'xla'} and layer['fused']['errors'] == {}
    assert '## Fused product' in (tmp_path / 'derivative.md').read_text()
    assert reports['pipeline']['old'] == []  # --no-baseline
    assert [run['workers'] for run in reports['pipeline']['workers']] == [1, 1]
    for layout in ('ws m=4 (Eq. 3)', 'no ws m=4 (Eq. 3 no ws)'):
        for summary in ('fastest K in train mode', 'fastest Eq. (3) product'):
            assert f'{summary} (forward + backward), {layout}: ' in result.stdout, result.stdout[-3000:]
    assert 'Eq. (3) softball@ds training against ResNet50 (' in result.stdout, result.stdout[-3000:]
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
                              block_impls=['xla', 'pallas'], variants=False, impls=['folded'])
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


def test_fused_product_counts():
    from benchmarks.derivative import product_bytes, product_flops
    # u 2x4x4x8, stride 2, m = 4, n' = 16, bfloat16: u 512 bytes, z 2x2x2x16 = 256 bytes; weights
    # C 8x32 + K 9x4 + A 32x16 + BN_d 2x32 = 868 float32 = 3472 bytes, read in both passes and
    # their gradients written: 512 + 3472 + 256 + (512 + 256 + 3472 + 512 + 3472).
    assert product_bytes(2, 4, 8, 2, 4, True, 2) == 12464
    # Per-channel kernels: K 9x32 instead of 9x4, 1008 more bytes in each of its three passes.
    assert product_bytes(2, 4, 8, 2, 4, False, 2) == 12464 + 3 * 1008
    # P = 2x2x2 output pixels: 2P (8x32 + 9x32 + 32x16) forward, x3 with the backward pass.
    assert product_flops(2, 4, 8, 2, 4) == 3 * 2 * 8 * (256 + 288 + 512)
    assert product_flops(2, 4, 8, 1, 4) == 3 * 2 * 32 * (256 + 288 + 256)  # stride 1: n' = n


def test_fused_table_reports_a_failed_candidate():
    from benchmarks import derivative
    times = {'wall': [0.002], 'cpu': [0.002]}
    layer = dict(layout='ws m=4 (Eq. 3)', size=56, channels=64, stride=1, count=3,
                 times={'train': {'stencil': times}},
                 fused=dict(bytes=4e8, flops=2e11, times={'xla': times},
                            errors={'pallas': 'ValueError: no lowering'}))
    report = dict(impls=['stencil'], modes=['train', 'fused'], clock='wall', batch=256,
                  dtype='bfloat16', reps=1, default_impl='stencil', peak_tflops=989.0,
                  device_kind='NVIDIA H200', layers=[layer])
    text = derivative.markdown(report, '')
    assert '| ws m=4 (Eq. 3) | 56x56x64/1 x3 | 400.0 | 200.00 | failed |  |  | 2.00 | 200 | 10.1% |  |' \
        in text, text
    assert 'Failed to compile: ws m=4 (Eq. 3) 56x56x64/1 pallas: ValueError: no lowering' in text
    assert 'Per network (the 16 blocks), ms: ws m=4 (Eq. 3): xla 6.0.' in text
