"""Timing helpers shared by the benchmarks: interleaved repetitions, medians, device names,
where results go and the provenance line that heads every report.

Candidates are timed round-robin in one process (candidate A, B, C, A, B, C, ...), so
that load from other processes on a shared machine hits all of them alike; we report
the median of the repetitions and their spread.
"""

import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from typing import Callable, Sequence

import jax

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO_ROOT, 'benchmarks', 'results')
# Words of a device kind that name the vendor or the product line, not the chip.
VENDOR_WORDS = {'nvidia', 'amd', 'intel', 'tesla', 'geforce', 'radeon', 'instinct'}
# The chip's dense (no sparsity) bfloat16 TFLOP/s and HBM GB/s by the words of jax's
# device_kind, the most specific first: 'NVIDIA H100 PCIe', 'NVIDIA H100 80GB HBM3' (SXM),
# 'NVIDIA H200', 'NVIDIA A100-SXM4-80GB'.
PEAKS = (
    (('H100', 'PCIe'), 756.0, 2000.0),
    (('H100', 'HBM3'), 989.0, 3350.0),
    (('H200',), 989.0, 4800.0),
    (('A100', '80GB'), 312.0, 2039.0),
    (('A100',), 312.0, 1555.0),
)


def block(tree):
    return jax.tree_util.tree_map(lambda leaf: leaf.block_until_ready() if hasattr(leaf, 'block_until_ready') else leaf, tree)


def interleaved(candidates: dict[str, Callable[[], object]], repetitions: int, warmup: int = 1,
                slow_seconds: float = float('inf')) -> dict[str, dict[str, list[float]]]:
    """Per candidate, {'wall': [...], 'cpu': [...]}: wall-clock and process CPU seconds per
    call, `repetitions` times each, round-robin. CPU time (all threads of this process) is
    what a busy shared machine distorts least; wall time is what a user waits.

    A candidate whose warm-up call took longer than `slow_seconds` is timed once only.
    """
    slow = set()
    for name, fn in candidates.items():
        for _ in range(warmup):
            start = time.perf_counter()
            block(fn())
            if time.perf_counter() - start > slow_seconds:
                slow.add(name)
    times = {name: {'wall': [], 'cpu': []} for name in candidates}
    for rep in range(repetitions):
        for name, fn in candidates.items():
            if name in slow and rep > 0:
                continue
            start, start_cpu = time.perf_counter(), time.process_time()
            block(fn())
            times[name]['cpu'].append(time.process_time() - start_cpu)
            times[name]['wall'].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> float:
    """Relative half-range of the middle half (a robust noise figure): (q3 - q1) / 2 / median."""
    if len(values) < 4:
        return (max(values) - min(values)) / 2 / statistics.median(values)
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / 2 / statistics.median(values)


def device_name() -> str:
    """'NVIDIA H100 80GB HBM3' on a GPU, the CPU model and core count on a CPU."""
    device = jax.devices()[0]
    if device.platform != 'cpu':
        return f'{device.device_kind} ({device.platform}, jax {jax.__version__})'
    model = platform.processor() or 'cpu'
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    model = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    return f'{model}, {os.cpu_count()} cores ({device.platform}, jax {jax.__version__})'


def device_slug() -> str:
    """A short name of the device for results folders: 'cpu_<N>core' on a CPU (N from
    os.cpu_count()); on an accelerator, the platform ('gpu' for CUDA and ROCm) and the chip's
    short name from its device kind, lowercased, the vendor's words left out: 'NVIDIA H200'
    -> 'gpu_h200', 'NVIDIA H100 80GB HBM3' -> 'gpu_h100', 'TPU v4' -> 'tpu_v4'. For the long
    name, `device_name()`."""
    device = jax.devices()[0]
    if device.platform == 'cpu':
        return f'cpu_{os.cpu_count()}core'
    platform_name = 'gpu' if device.platform in ('gpu', 'cuda', 'rocm') else device.platform.lower()
    words = [word for word in re.split(r'[^a-z0-9]+', device.device_kind.lower())
             if word and word not in VENDOR_WORDS and word != platform_name]
    # Up to the first word with a digit: 'RTX 4090' -> 'rtx4090', 'A100-SXM4-40GB' -> 'a100'.
    short = next((i + 1 for i, word in enumerate(words) if any(c.isdigit() for c in word)),
                 min(len(words), 1))
    return f'{platform_name}_{"".join(words[:short])}' if words else platform_name


def _peak(device_kind: str, column: int) -> float | None:
    for words, *peaks in PEAKS:
        if all(word in device_kind for word in words):
            return peaks[column]
    return None


def peak_bf16_tflops(device_kind: str) -> float | None:
    """The chip's dense bfloat16 peak, or None for a chip not in PEAKS."""
    return _peak(device_kind, 0)


def peak_hbm_gbps(device_kind: str) -> float | None:
    """The chip's memory bandwidth, GB/s, or None for a chip not in PEAKS."""
    return _peak(device_kind, 1)


def results_stem(benchmark: str) -> str:
    """The default `--out` of a benchmark: benchmarks/results/<device_slug()>/<benchmark>."""
    return os.path.join(RESULTS, device_slug(), benchmark)


def display_path(path: str) -> str:
    """`path` relative to the repository root when it lies inside it (for report text)."""
    relative = os.path.relpath(os.path.abspath(path), REPO_ROOT)
    return path if relative.startswith('..') else relative


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """'python -m <module> <args>', the args as given (sys.argv[1:] when argv is None)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return ' '.join(['python', '-m', module, *(shlex.quote(str(arg)) for arg in args)])


def provenance_fields(module: str, argv: Sequence[str] | None = None) -> dict:
    """{'command', 'device', 'date'} of this run, for a JSON report (`provenance_line` reads
    them back)."""
    return dict(command=command_line(module, argv), device=device_name(),
                date=datetime.date.today().isoformat())


def provenance_line(report: dict) -> str:
    """'Command: `...`. Device: .... Date: YYYY-MM-DD.' from a report's fields; a field that an
    older report lacks is left out."""
    parts = []
    if report.get('command'):
        parts.append(f'Command: `{report["command"]}`.')
    if report.get('device'):
        parts.append(f'Device: {report["device"]}.')
    if report.get('date'):
        parts.append(f'Date: {report["date"]}.')
    return ' '.join(parts)


def load_average() -> str:
    try:
        return ' '.join(f'{x:.1f}' for x in os.getloadavg())
    except OSError:
        return 'n/a'


def git_revision() -> str:
    try:
        return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'w') as f:
        json.dump(payload, f, indent=1)
        f.write('\n')


def write_report(stem: str, text: str, report: dict) -> None:
    """The markdown `text` to <stem>.md and the `report` to <stem>.json."""
    os.makedirs(os.path.dirname(stem) or '.', exist_ok=True)
    with open(stem + '.md', 'w') as f:
        f.write(text)
    write_json(stem + '.json', report)
