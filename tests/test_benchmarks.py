"""`benchmarks/gpu_quick.sh --dry-run`: every step of the quick GPU benchmark end to end,
at tiny sizes on the CPU; the step benchmark's comparison of two versions' models."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # about 2 minutes on 2 cores, most of it compiling ResNet50 and Eq. (3)
def test_gpu_quick_dry_run(tmp_path):
    result = subprocess.run(['bash', 'benchmarks/gpu_quick.sh', '--dry-run'], cwd=ROOT, text=True,
                            capture_output=True, timeout=600, check=False,
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
    assert [row['label'] for row in models['rows']] == ['ResNet50', 'Eq. (3) softball@ds']
    assert models['peak_tflops'] is None  # no known peak on a CPU: the MFU column reads n/a
    assert all(row['mfu'] is None for row in models['rows'])
    table = (tmp_path / 'models.md').read_text()
    assert '| train MFU |' in table and table.count('| n/a |') == 2, table

    assert reports['derivative']['image_size'] == 32
    assert reports['pipeline']['old'] == []  # --no-baseline
    assert [run['workers'] for run in reports['pipeline']['workers']] == [1, 1]
    for layout in ('ws m=4 (Eq. 3)', 'no ws m=4 (Eq. 3 no ws)'):
        assert f'fastest K in train mode (forward + backward), {layout}: ' in result.stdout, \
            result.stdout[-3000:]


def test_step_benchmark_separates_model_changes():
    from benchmarks import step
    baseline = dict(stem='small', widths=[16, 32, 128, 256], depths=[1, 1, 1, 1],
                    derivative_impl='folded', retired_field=1)
    current = dict(stem='small_stride2', widths=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                   derivative_impl='stencil', stream_widths=None)
    # How the code computes K is the code's; a field one version lacks is not compared.
    assert step.model_changes(baseline, current) == dict(stem='small', widths=[16, 32, 128, 256])
    assert step.model_changes(current, current) == {}
