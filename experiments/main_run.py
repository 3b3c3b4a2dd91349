"""The README's main command, as written, on several seeds: what it reaches and how long it takes.

    python -m experiments.main_run                   # seeds 0, 1, 2
    python -m experiments.main_run --seeds 0 --runs_dir /tmp/runs

Runs `python -m qhnet.main --config=configs/eq3_softball.py:fashion_mnist` once per seed
(`--config.seed=k`; seed 0 is the command as written), one after the other, each in its own
workdir under `--runs_dir`, and times each process from start to exit. Writes
`experiments/main_run/results.md` and `.json` (per seed: test top-1 after every epoch, the
final top-1, wall minutes, training images/s; the range over seeds) and seed 0's training
curves (`curves_seed0.png`). Run it from a fresh clone, with nothing else running: the
wall times are what the README promises.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks import timing

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODULE = 'experiments.main_run'
CONFIG = 'configs/eq3_softball.py:fashion_mnist'
DEFAULT_OUT = os.path.join(HERE, 'main_run', 'results')


def run_seed(seed: int, runs_dir: str) -> dict:
    workdir = os.path.join(runs_dir, f'seed{seed}')
    command = [sys.executable, '-m', 'qhnet.main', f'--config={CONFIG}', f'--workdir={workdir}',
               f'--config.seed={seed}', '--config.progress_bar=False']
    start = time.time()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.time() - start
    if done.returncode:
        raise SystemExit(f'seed {seed} failed:\n{done.stderr[-3000:]}')
    with open(os.path.join(workdir, 'summary.json'), encoding='utf-8') as f:
        summary = json.load(f)
    with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
        rows = [json.loads(line) for line in f]
    tests = [row for row in rows if row.get('split') == 'test' and not row.get('superseded')]
    return dict(seed=seed, top1_per_epoch=[100 * row['top1'] for row in tests],
                top1=100 * summary['test_top1'], wall_minutes=wall / 60,
                train_images_per_second=summary['train_images_per_second'],
                params=summary['params'], epochs=summary['epochs'])


def markdown(report: dict) -> str:
    runs = report['runs']
    top1 = [run['top1'] for run in runs]
    minutes = [run['wall_minutes'] for run in runs]
    lines = ['# The main command on Fashion-MNIST', '', timing.provenance_line(report), '',
             f'`python -m qhnet.main --config={CONFIG} --workdir=DIR [--config.seed=k]`: Eq. (3) '
             f'softball@ds, {runs[0]["params"]:,} parameters, {runs[0]["epochs"]:g} epochs. Wall '
             'time is the whole process, from start to exit, with nothing else running.', '',
             '| seed | test top-1 after each epoch (%) | final top-1 | wall time | training '
             'images/s |', '|---:|---|---:|---:|---:|']
    for run in runs:
        per_epoch = ', '.join(f'{value:.2f}' for value in run['top1_per_epoch'])
        lines.append(f'| {run["seed"]} | {per_epoch} | **{run["top1"]:.2f}%** | '
                     f'{run["wall_minutes"]:.1f} min | {run["train_images_per_second"]:,.0f} |')
    lines += ['', f'Over the seeds: top-1 {min(top1):.2f} to {max(top1):.2f}% (mean '
                  f'{sum(top1) / len(top1):.2f}%), {min(minutes):.1f} to {max(minutes):.1f} '
                  f'minutes. Seed {runs[0]["seed"]}\'s curves: `curves_seed{runs[0]["seed"]}.png`.',
              '']
    return '\n'.join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--runs_dir', default=None, help='workdirs (default: a temporary one)')
    parser.add_argument('--out', default=DEFAULT_OUT, help='path stem of the .md and .json')
    args = parser.parse_args(argv)
    report = dict(**timing.provenance_fields(MODULE, argv), config=CONFIG, runs=[])
    runs_dir = args.runs_dir or tempfile.mkdtemp(prefix='qhnet-main-run-')
    for seed in args.seeds:
        report['runs'].append(run_seed(seed, runs_dir))
        print(f'seed {seed}: {report["runs"][-1]["top1"]:.2f}% in '
              f'{report["runs"][-1]["wall_minutes"]:.1f} min', flush=True)
    text = markdown(report)
    timing.write_report(args.out, text, report)
    curves = os.path.join(runs_dir, f'seed{args.seeds[0]}', 'curves.png')
    shutil.copy(curves, os.path.join(os.path.dirname(args.out), f'curves_seed{args.seeds[0]}.png'))
    print(text)


if __name__ == '__main__':
    main()
