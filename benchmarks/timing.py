"""Timing helpers shared by the benchmarks: interleaved repetitions, medians, device names.

Candidates are timed round-robin in one process (candidate A, B, C, A, B, C, ...), so
that load from other processes on a shared machine hits all of them alike; we report
the median of the repetitions and their spread.
"""

import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Sequence

import jax


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
