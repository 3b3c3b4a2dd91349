"""Which Fashion-MNIST recipe for the Eq. (3) softball@ds model reaches 92% soonest.

    python -m experiments.fashion_mnist_sweep --grid main --workers 12
    python -m experiments.fashion_mnist_sweep --grid deep --workers 12
    # -> experiments/fashion_mnist_sweep/results.{md,json}, one section per grid

Trains `configs/eq3_softball.py:fashion_mnist` with each override set of a grid (`GRIDS`) through
`qhnet.training.train_and_evaluate` (the real loop, one process per run, `--workers` at a
time) and tabulates the test top-1 after every epoch. Matmuls and convolutions run at
full float32 precision (`jax_default_matmul_precision=highest`; no TF32), so a GPU
computes what the CPU computes, up to rounding. An earlier run of this sweep (an earlier
recipe and activation placement; its results are no longer kept) is what
`configs/default.py`'s fashion_mnist variant was chosen from (w16-32-128-256, 4 epochs,
base LR 0.8, weight decay 5e-5, label smoothing 0.1; the variant now runs 5 epochs at
base LR 1.2, with a stride-2 stem and widths 32, 64, 128, 256); its accuracy and time on
2 CPU cores are in the README.

The results go to `--out`.md and .json (default experiments/fashion_mnist_sweep/results),
rewritten after every run; other grids' results already there are kept. The markdown opens
with the command, the device and the date, and the JSON holds them too.
"""

import argparse
import concurrent.futures
import itertools
import json
import os
import subprocess
import sys
import tempfile

from benchmarks import timing

MODULE = 'experiments.fashion_mnist_sweep'
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fashion_mnist_sweep',
                           'results')
ARCHITECTURES = {
    'w16-64-256': dict(widths=(16, 64, 256), depths=(1, 1, 1)),
    'w8-64-256': dict(widths=(8, 64, 256), depths=(1, 1, 1)),
    'w16-64-128': dict(widths=(16, 64, 128), depths=(1, 1, 1)),
    'w16-32-128-256': dict(widths=(16, 32, 128, 256), depths=(1, 1, 1, 1)),
    'w16-128-256': dict(widths=(16, 128, 256), depths=(1, 1, 1)),
    'w16-32-128-512': dict(widths=(16, 32, 128, 512), depths=(1, 1, 1, 1)),
    'w16-64-128-256': dict(widths=(16, 64, 128, 256), depths=(1, 1, 1, 1)),
    'w16-32-128-256-d1121': dict(widths=(16, 32, 128, 256), depths=(1, 1, 2, 1)),
    'w16-32-64-128-256': dict(widths=(16, 32, 64, 128, 256), depths=(1, 1, 1, 1, 1)),
}
GRID = [
    dict(arch=arch, num_epochs=epochs, base_lr=lr, weight_decay=wd, label_smoothing=ls,
         augment=augment)
    for arch, epochs, lr, (wd, ls), augment in itertools.product(
        list(ARCHITECTURES)[:5], (3, 4), (0.2, 0.4, 0.8), ((0.0, 0.0), (5e-5, 0.1)), (False,))
]
# The four-stage networks, which did best in GRID.
GRID_DEEP = [
    dict(arch=arch, num_epochs=epochs, base_lr=lr, weight_decay=wd, label_smoothing=ls,
         augment=augment)
    for arch, epochs, lr, (wd, ls), augment in [
        ('w16-32-128-256', 4, 0.2, (0.0, 0.0), False),
        ('w16-32-128-256', 4, 0.4, (0.0, 0.0), False),
        ('w16-32-128-256', 4, 0.4, (5e-5, 0.1), False),
        ('w16-32-128-256', 4, 0.8, (5e-5, 0.1), False),
        ('w16-32-128-256', 3, 0.4, (0.0, 0.0), True),
        ('w16-32-128-256', 4, 0.4, (0.0, 0.0), True),
        ('w16-32-64-128-256', 3, 0.4, (0.0, 0.0), False),
        ('w16-32-64-128-256', 4, 0.4, (0.0, 0.0), False),
        ('w16-32-128-512', 3, 0.4, (0.0, 0.0), False),
        ('w16-64-128-256', 3, 0.4, (0.0, 0.0), False),
        ('w16-64-128-256', 4, 0.4, (0.0, 0.0), False),
        ('w16-32-128-256-d1121', 3, 0.4, (0.0, 0.0), False),
    ]
]
GRIDS = {'main': GRID, 'deep': GRID_DEEP}


def overrides(run: dict) -> list[str]:
    arch = ARCHITECTURES[run['arch']]
    return [f'--config.model.widths={arch["widths"]}', f'--config.model.depths={arch["depths"]}',
            f'--config.num_epochs={run["num_epochs"]}',
            f'--config.optimizer.base_lr={run["base_lr"]}',
            f'--config.optimizer.weight_decay={run["weight_decay"]}',
            f'--config.label_smoothing={run["label_smoothing"]}',
            f'--config.data.augment={run["augment"]}', '--config.progress_bar=False']


def train_one(run: dict, data_dir: str | None, root: str) -> dict:
    workdir = os.path.join(root, '_'.join(f'{k}{v}' for k, v in run.items()))
    command = [sys.executable, '-m', 'qhnet.main', '--config=configs/eq3_softball.py:fashion_mnist',
               f'--workdir={workdir}', *overrides(run)]
    if data_dir:
        command.append(f'--config.data.data_dir={data_dir}')
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE='false',
               JAX_DEFAULT_MATMUL_PRECISION='highest')
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        return dict(run, error=done.stderr[-2000:])
    with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
        rows = [json.loads(line) for line in f]
    tests = [row for row in rows if row['split'] == 'test']
    return dict(run, top1_per_epoch=[round(100 * row['top1'], 2) for row in tests])


def markdown(report: dict) -> str:
    lines = ['# Fashion-MNIST recipes for Eq. (3) softball@ds', '',
             timing.provenance_line(report), '',
             'Float32, full-precision matmuls. Batch 64, SGD with '
             'Nesterov momentum, 0.3 warmup epochs, cosine decay; test top-1 (%) after each epoch, '
             'one seed each. Architectures: widths of the stages, one block each unless `d` says '
             'otherwise (`d1121`: two blocks in stage 3).', '']
    for grid in GRIDS:
        results = [r for r in report['results'] if r['grid'] == grid]
        if not results:
            continue
        lines += [f'## Grid `{grid}`: {len(results)} of {len(GRIDS[grid])} runs', '',
                  '| architecture | epochs | base LR | weight decay | label smoothing | augment | top-1 per epoch | final |',
                  '|---|---:|---:|---:|---:|---|---|---:|']
        for r in sorted(results, key=lambda r: -(r.get('top1_per_epoch') or [0])[-1]):
            per_epoch = ' / '.join(f'{a:.2f}' for a in r.get('top1_per_epoch', [])) or 'failed'
            final = (r.get('top1_per_epoch') or [float('nan')])[-1]
            lines.append(f'| {r["arch"]} | {r["num_epochs"]} | {r["base_lr"]} | {r["weight_decay"]} | '
                         f'{r["label_smoothing"]} | {r["augment"]} | {per_epoch} | {final:.2f} |')
        lines.append('')
    return '\n'.join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--grid', choices=sorted(GRIDS), default='main')
    parser.add_argument('--workers', type=int, default=1)
    parser.add_argument('--data-dir', default=None, help='Fashion-MNIST idx files (default: Debian path)')
    parser.add_argument('--out', default=DEFAULT_OUT,
                        help='path stem of the .json and .md results (default: '
                             'experiments/fashion_mnist_sweep/results); other grids\' results '
                             'already there are kept')
    parser.add_argument('--limit', type=int, default=None, help='only the first N runs of the grid')
    args = parser.parse_args(argv)
    report = dict(**timing.provenance_fields(MODULE, argv), results=[])
    if os.path.exists(args.out + '.json'):
        with open(args.out + '.json', encoding='utf-8') as f:
            report['results'] = [r for r in json.load(f)['results'] if r['grid'] != args.grid]
    with tempfile.TemporaryDirectory() as root, \
            concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        futures = [pool.submit(train_one, run, args.data_dir, root)
                   for run in GRIDS[args.grid][:args.limit]]
        for future in concurrent.futures.as_completed(futures):
            result = dict(future.result(), grid=args.grid)
            print(json.dumps(result), flush=True)
            report['results'].append(result)
            timing.write_report(args.out, markdown(report), report)


if __name__ == '__main__':
    main()
