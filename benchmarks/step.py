"""The README's main config: its training step now against an earlier version's, in one run.

    python -m benchmarks.step                       # against the default --baseline
    python -m benchmarks.step --baseline HEAD~3 --seconds 20 --out benchmarks/step_cpu

Each version (this working tree, and `--baseline` checked out in a temporary git
worktree) runs in its own subprocess with its own `qhnet`: it builds the config of
`configs/eq3_softball.py:fashion_mnist` as that version defines it (model, batch size),
compiles its jitted training step (`qhnet.train.jit_train_step`), feeds it real
Fashion-MNIST batches from its own `qhnet.data`, and times `--seconds` of steps after a
warm-up, the way its training loop calls them. The versions alternate
(baseline, current, baseline, current, ...) `--rounds` times so that a change in machine
load hits both; the report gives the medians and their ratio in images/s, wall clock and
process CPU time.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile


from benchmarks import timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BASELINE = '4f1caf5'  # the last version before this benchmark's speed work

# Runs inside a version's checkout: prints one JSON line of step timings.
PROBE = r'''
import inspect, json, sys, time
import jax, numpy as np
from qhnet import config as qhnet_config, data, models, train
seconds = float(sys.argv[1])
config = qhnet_config.row_config('eq3_softball', 'fashion_mnist')
model = models.build(config.model)
info = data.get_info(config.data)
per_epoch = train.steps_per_epoch(config, info.num_train)
total = train.total_train_steps(config, per_epoch)
schedule = train.learning_rate_schedule(config, per_epoch, total)
optimizer = train.make_optimizer(config, schedule)
step_args = dict(model=model, optimizer=optimizer, schedule=schedule,
                 label_smoothing=config.label_smoothing)
if 'inputs' in inspect.signature(train.train_step).parameters:
    step_args['inputs'] = train.model_inputs(info)
step = train.jit_train_step(train.make_mesh(), **step_args)
state = train.create_train_state(model, optimizer, info.image_shape, jax.random.key(0))
batches = data.make_iterator(config.data, 'train', batch_size=config.batch_size, seed=0,
                             train=True)
host = [next(batches) for _ in range(16)]
rng = jax.random.key(1)
for batch in host[:3]:
    state, metrics = step(state, batch, rng)
jax.block_until_ready(metrics)
count, start, start_cpu = 0, time.perf_counter(), time.process_time()
while time.perf_counter() - start < seconds:
    state, metrics = step(state, host[count % len(host)], rng)
    count += 1
jax.block_until_ready(metrics)
wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
print(json.dumps(dict(batch_size=config.batch_size, steps=count, wall_seconds=wall,
                      cpu_seconds=cpu, images_per_second=count * config.batch_size / wall,
                      images_per_cpu_second=count * config.batch_size / cpu)))
'''


def probe(checkout: str, seconds: float) -> dict:
    """One timing of the training step of the `qhnet` in `checkout`."""
    result = subprocess.run([sys.executable, '-c', PROBE, str(seconds)], cwd=checkout,
                            env={**os.environ, 'PYTHONPATH': checkout}, capture_output=True,
                            text=True, check=False)
    if result.returncode:
        raise RuntimeError(f'the step probe failed in {checkout}:\n{result.stderr[-3000:]}')
    return json.loads(result.stdout.strip().splitlines()[-1])


def baseline_worktree(revision: str) -> str:
    path = tempfile.mkdtemp(prefix='qhnet-step-baseline-')
    subprocess.run(['git', '-C', ROOT, 'worktree', 'add', '--detach', path, revision],
                   check=True, capture_output=True)
    return path


def summarise(runs: list[dict]) -> dict:
    return dict(batch_size=runs[0]['batch_size'], runs=runs,
                images_per_second=timing.median([r['images_per_second'] for r in runs]),
                images_per_cpu_second=timing.median([r['images_per_cpu_second'] for r in runs]))


def markdown(report: dict) -> str:
    base, current = report['baseline'], report['current']
    return '\n'.join([
        "# The README's main config: training step, current code against an earlier version",
        '',
        f'Device: **{report["device"]}**. Config `configs/eq3_softball.py:fashion_mnist` as each '
        f'version defines it; real Fashion-MNIST batches; {report["seconds"]:g} s of steps per '
        f'timing after a warm-up, {report["rounds"]} alternating rounds, medians. Current: '
        f'{report["current_revision"]}; baseline: {report["baseline_revision"]} (git worktree). '
        f'Load average at the end: {report["load_average"]}. {report["note"]}',
        '',
        '| version | batch | images/s (wall) | images/s per CPU second |',
        '|---|---:|---:|---:|',
        f'| baseline {report["baseline_revision"]} | {base["batch_size"]} | '
        f'{base["images_per_second"]:.0f} | {base["images_per_cpu_second"]:.0f} |',
        f'| current | {current["batch_size"]} | {current["images_per_second"]:.0f} | '
        f'{current["images_per_cpu_second"]:.0f} |',
        '',
        f'**Current / baseline: {report["ratio_wall"]:.2f}x** on the wall clock '
        f'({report["ratio_cpu"]:.2f}x per CPU second).',
    ]) + '\n'


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--baseline', default=DEFAULT_BASELINE, help='git revision to compare with')
    parser.add_argument('--seconds', type=float, default=20.0, help='timed steps per round')
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--note', default='')
    parser.add_argument('--out', default=None, help='path stem for .md and .json outputs')
    args = parser.parse_args(argv)
    worktree = baseline_worktree(args.baseline)
    runs = {'baseline': [], 'current': []}
    try:
        for round_index in range(args.rounds):
            for name, checkout in (('baseline', worktree), ('current', ROOT)):
                runs[name].append(probe(checkout, args.seconds))
                print(f'round {round_index + 1}, {name}: '
                      f'{runs[name][-1]["images_per_second"]:.0f} images/s', file=sys.stderr,
                      flush=True)
    finally:
        subprocess.run(['git', '-C', ROOT, 'worktree', 'remove', '--force', worktree],
                       check=False, capture_output=True)
    baseline, current = summarise(runs['baseline']), summarise(runs['current'])
    report = dict(device=timing.device_name(), seconds=args.seconds, rounds=args.rounds,
                  current_revision=timing.git_revision(), baseline_revision=args.baseline,
                  baseline=baseline, current=current, note=args.note,
                  ratio_wall=current['images_per_second'] / baseline['images_per_second'],
                  ratio_cpu=current['images_per_cpu_second'] / baseline['images_per_cpu_second'],
                  load_average=timing.load_average())
    text = markdown(report)
    print(text)
    if args.out:
        timing.write_report(args.out, text, report)


if __name__ == '__main__':
    main()
