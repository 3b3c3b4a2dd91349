"""Table 1 of the paper, every row and seed trained through the command line, and the breakdown
study.

    python -m experiments.table1 --variant=fashion_mnist          # the reduced protocol
    python -m experiments.table1 --variant=imagenet100 --runs_dir=DIR \
        --set data.data_dir=/data/imagenet100                      # the paper's protocol
    python -m experiments.table1 --study=breakdown --variant=fashion_mnist
    ... [--rows eq3_softball resnet50] [--seeds 0 1 2] [--num_epochs N] [--dry-run]

Each (row, seed) runs `python -m qhnet.main --config=configs/<row>.py:<variant>` in its own
workdir, `<runs_dir>/<run>/seed<k>`, with its output in `harness.log` there. A run whose
workdir holds a `summary.json` is finished and skipped, and so is one that gave up (the
breakdown study's outcome: every allowed rollback hit a non-finite loss again); any other
run is started again, and the training loop resumes it from its newest checkpoint (a killed
run continues, it does not restart). A failed run does not stop the others; the command
exits non-zero at the end, naming them. After the runs (`--aggregate_only`: none), finished
or not, the results go to `experiments/table1/<variant>.md` and `.json` (the study:
`breakdown.md`, `.json`; with another variant, `breakdown_<variant>`; `--out` another path
stem). The markdown opens with the command, the device and the date; the JSON holds them too:

    {"command", "device", "date",
     "rows": [{"row", "config", "params", "paper_top1", "top1_seeds", "top1_mean", "top1_std",
               "train_images_per_second", "rollbacks", "wall_seconds"}, ...]}

`top1_seeds` holds the finished seeds only (`seeds` names them); `rollbacks` and `wall_seconds`
are summed over the row's seeds and over every process of a run (a resumed run counts the
time of each attempt); `train_images_per_second` is the mean over seeds.
The table (not the study) also sets every row against REFERENCE_ROW, the paper's main model
(`comparisons`: the difference of mean top-1 here and in the paper, and whether it exceeds
the spread across seeds, `against`).

The reduced protocol (`--variant=fashion_mnist`): the Fashion-MNIST variant of each row (the
main command's stem, widths and depths, with the row's block, weight sharing, multiplier and
activation; ResNet50 and MobileNetV3 with the same small-input stem), for
REDUCED_EPOCHS epochs instead of the main command's 5: an epoch of an Eq. (3) row takes about
1.5 minutes on 2 CPU cores (the breakdown study's wall times), so 5 epochs of the 27 Eq. (3)-(7)
runs alone would take over 3 hours (the results table gives the measured total).

The breakdown study (paper, section 3: "once we remove all the activation functions, or use only
ReLU, the training is prone to break down"): Eq. (3) with no activation, relu@all, hardtanh@ds
and softball@ds, at the recipe's peak learning rate and at 2x and 4x it; each run records its
rollbacks (a non-finite loss or gradient rolls back to the last checkpoint and halves the
learning rate) and its final top-1, or that it gave up.
"""

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import time

import tqdm

from qhnet import config as qhnet_config

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = 'experiments.table1'
ROOT = os.path.dirname(HERE)
HARNESS_FILE, LOG_FILE, SUMMARY_FILE, METRICS_FILE = (
    'harness.json', 'harness.log', 'summary.json', 'metrics.jsonl')
REDUCED_EPOCHS = 1
REFERENCE_ROW = 'eq3_softball'  # the paper's main model: the table's differences are against it
# (label, row, model overrides) of the breakdown study, each at every LR factor.
BREAKDOWN = (('Eq. (3) no activation', 'eq3_softball', {'model.activation': 'identity'}),
             ('Eq. (3) relu@all', 'eq3_relu_all', {}),
             ('Eq. (3) hardtanh@ds', 'eq3_hardtanh', {}),
             ('Eq. (3) softball@ds', 'eq3_softball', {}))
LR_FACTORS = (1, 2, 4)


@dataclasses.dataclass(frozen=True)
class Run:
    name: str                 # the table row this run belongs to
    row: str                  # its config, configs/<row>.py
    seed: int
    overrides: tuple[tuple[str, str], ...]
    workdir: str


def config_argument(row: str, variant: str) -> str:
    return f'--config={os.path.join(ROOT, "configs", row + ".py")}:{variant}'


def command(run: Run, variant: str) -> list[str]:
    """The `python -m qhnet.main` command line of `run`."""
    return [sys.executable, '-m', 'qhnet.main', config_argument(run.row, variant),
            f'--workdir={run.workdir}', f'--config.seed={run.seed}',
            '--config.progress_bar=False'] + [f'--config.{key}={value}'
                                              for key, value in run.overrides]


def parse_sets(pairs: list[str]) -> tuple[tuple[str, str], ...]:
    found = []
    for pair in pairs:
        key, sep, value = pair.partition('=')
        if not sep or not key:
            raise SystemExit(f'--set takes KEY=VALUE (a config key, e.g. data.data_dir=/data), got '
                             f'{pair!r}')
        found.append((key, value))
    return tuple(found)


def plan(args) -> list[Run]:
    """Every run of the table (or the study), in order: rows, then seeds."""
    common = parse_sets(args.set)
    epochs = args.num_epochs
    if epochs is None and args.variant == 'fashion_mnist':
        epochs = REDUCED_EPOCHS
    common = ((('num_epochs', str(epochs)),) if epochs is not None else ()) + common
    entries = []
    if args.study == 'breakdown':
        for label, row, model in BREAKDOWN:
            base_lr = qhnet_config.row_config(row, args.variant).optimizer.base_lr
            for factor in args.lr_factors:
                name = f'{label}, lr x{factor:g}'
                entries.append((name, row, tuple(model.items()) + (
                    ('optimizer.base_lr', repr(base_lr * factor)),)))
    else:
        rows = args.rows or list(qhnet_config.ROWS)
        unknown = [row for row in rows if row not in qhnet_config.ROWS]
        if unknown:
            raise SystemExit(f'unknown row(s) {unknown}; valid rows: {list(qhnet_config.ROWS)}')
        entries = [(row, row, ()) for row in rows]
    runs = []
    for name, row, overrides in entries:
        slug = re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_')
        for seed in args.seeds:
            runs.append(Run(name, row, seed, overrides + common,
                            os.path.join(args.runs_dir, slug, f'seed{seed}')))
    return runs


def read_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def finished(run: Run):
    """The run's summary.json, or None while it is not finished."""
    return read_json(os.path.join(run.workdir, SUMMARY_FILE))


def gave_up(run: Run) -> bool:
    """Whether the run's last attempt stopped on a non-finite loss that every allowed rollback
    hit again (a result of the breakdown study: it is not run again)."""
    state = read_json(os.path.join(run.workdir, HARNESS_FILE))
    return bool(state and state['attempts'][-1]['returncode'] != 0 and events(run, 'breakdown'))


def events(run: Run, kind: str) -> int:
    """How many `kind` events ('rollback', 'resume', 'breakdown') the run's metrics record."""
    path = os.path.join(run.workdir, METRICS_FILE)
    if not os.path.exists(path):
        return 0
    with open(path, encoding='utf-8') as lines:
        return sum(json.loads(line).get('event') == kind for line in lines if line.strip())


def execute(run: Run, variant: str) -> int:
    """Runs (or resumes) `run`, appending its output to harness.log; its exit status."""
    os.makedirs(run.workdir, exist_ok=True)
    state_path = os.path.join(run.workdir, HARNESS_FILE)
    state = read_json(state_path) or {'attempts': []}
    start = time.time()
    with open(os.path.join(run.workdir, LOG_FILE), 'a', encoding='utf-8') as log:
        log.write(f'$ {" ".join(command(run, variant))}\n')
        log.flush()
        status = subprocess.run(command(run, variant), cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, check=False).returncode
    state['attempts'].append({'returncode': status, 'wall_seconds': time.time() - start})
    with open(state_path, 'w', encoding='utf-8') as f:
        json.dump(state, f, indent=2)
    return status


def wall_seconds(run: Run) -> float:
    state = read_json(os.path.join(run.workdir, HARNESS_FILE))
    return sum(a['wall_seconds'] for a in state['attempts']) if state else 0.0


def aggregate(runs: list[Run], variant: str) -> list[dict]:
    """One record per table row, from the runs' workdirs (module docstring)."""
    rows = []
    for name in dict.fromkeys(run.name for run in runs):
        mine = [run for run in runs if run.name == name]
        done = [(run, summary) for run, summary in ((run, finished(run)) for run in mine)
                if summary]
        top1 = [summary['test_top1'] for _, summary in done]
        # The paper's figures belong to a row as the table has it, not to a study's variation.
        paper = qhnet_config.ROWS[mine[0].row] if name == mine[0].row else None
        rows.append(dict(
            row=name, config=f'configs/{mine[0].row}.py:{variant}',
            overrides={key: value for key, value in mine[0].overrides},
            params=done[0][1].get('params') if done else None,
            paper_params=paper and paper.paper_params, paper_top1=paper and paper.paper_top1,
            seeds=[run.seed for run, _ in done], top1_seeds=top1,
            top1_mean=statistics.mean(top1) if top1 else None,
            top1_std=statistics.stdev(top1) if len(top1) > 1 else None,
            train_images_per_second=(statistics.mean(s['train_images_per_second']
                                                     for _, s in done) if done else None),
            rollbacks=sum(events(run, 'rollback') for run in mine),
            gave_up=[run.seed for run in mine if gave_up(run)],
            wall_seconds=sum(wall_seconds(run) for run in mine),
            runs=len(mine)))
    return rows


def against(rows: list[dict], reference: str) -> list[dict]:
    """Each row's difference from `reference` here and in the paper, in top-1 points, and
    whether it exceeds the spread across seeds: the two rows' seed ranges do not overlap (every
    seed of one above every seed of the other). Rows with fewer than 2 finished seeds, like
    the reference, are left out."""
    base = next((r for r in rows if r['row'] == reference), None)
    if base is None or len(base['top1_seeds']) < 2:
        return []
    found = []
    for r in rows:
        if r is base or len(r['top1_seeds']) < 2:
            continue
        seeds, others = r['top1_seeds'], base['top1_seeds']
        found.append(dict(
            row=r['row'], reference=reference,
            difference=100 * (r['top1_mean'] - base['top1_mean']),
            paper_difference=(None if r['paper_top1'] is None or base['paper_top1'] is None
                              else r['paper_top1'] - base['paper_top1']),
            beyond_spread=min(seeds) > max(others) or max(seeds) < min(others)))
    return found


def _percent(value) -> str:
    return '-' if value is None else f'{100 * value:.2f}'


def _millions(value) -> str:
    return '-' if value is None else f'{value / 1e6:.2f} M'


def _number(value) -> str:
    return '-' if value is None else f'{value:.2f}'


def markdown(rows: list[dict], variant: str, study: str | None, provenance: dict,
             note: str = '', comparisons: list[dict] = ()) -> str:
    """The results table; `provenance`: the run's command, device and date
    (`benchmarks.timing.provenance_fields`)."""
    from benchmarks import timing  # noqa: PLC0415 (imports JAX)
    title = ('Breakdown study' if study == 'breakdown'
             else f'Table 1, {"reduced protocol" if variant == "fashion_mnist" else variant}')
    epochs = {r['overrides'].get('num_epochs') for r in rows} - {None}
    lines = [f'# {title}', '', timing.provenance_line(provenance), '',
             f'{"Epochs: " + ", ".join(sorted(epochs)) if epochs else "The config epochs"}. '
             'Test top-1 (%) of each finished seed; mean and sample standard deviation over '
             f'them; rollbacks and wall time summed over the seeds. {note}'.rstrip(), '',
             '| row | params | paper params | paper top-1 | top-1 per seed | mean | std | '
             'train img/s | rollbacks | gave up (seeds) | wall min | runs finished |',
             '|---|---:|---:|---:|---|---:|---:|---:|---:|---|---:|---:|']
    for r in rows:
        seeds = ', '.join(f'{100 * t:.2f} (s{s})' for s, t in zip(r['seeds'], r['top1_seeds']))
        lines.append(
            f'| {r["row"]} | {"-" if r["params"] is None else format(r["params"], ",")} | '
            f'{_millions(r["paper_params"])} | {_number(r["paper_top1"])} | {seeds or "-"} | '
            f'{_percent(r["top1_mean"])} | {_percent(r["top1_std"])} | '
            f'{r["train_images_per_second"] or 0:.0f} | {r["rollbacks"]} | '
            f'{", ".join(map(str, r["gave_up"])) or "-"} | {r["wall_seconds"] / 60:.1f} | '
            f'{len(r["seeds"])}/{r["runs"]} |')
    total = sum(r['wall_seconds'] for r in rows)
    lines += ['', f'Wall time of every run together: {total / 3600:.2f} h '
              f'({sum(len(r["seeds"]) for r in rows)} runs finished of {sum(r["runs"] for r in rows)}).']
    if comparisons:
        reference = comparisons[0]['reference']
        lines += ['', f'Against {reference}: mean top-1 difference (points), here and in the paper; '
                  'beyond the spread when no seed of one row reaches any seed of the other.', '',
                  f'| row | here, vs {reference} | paper, vs {reference} | beyond the spread |',
                  '|---|---:|---:|---|']
        for c in comparisons:
            paper = '-' if c['paper_difference'] is None else f'{c["paper_difference"]:+.2f}'
            lines.append(f'| {c["row"]} | {c["difference"]:+.2f} | {paper} | '
                         f'{"yes" if c["beyond_spread"] else "no"} |')
    return '\n'.join(lines) + '\n'


def output_path(args) -> str:
    if args.out:
        return args.out
    name = args.variant if args.study != 'breakdown' else (
        'breakdown' if args.variant == 'fashion_mnist' else f'breakdown_{args.variant}')
    return os.path.join(HERE, 'table1', name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--variant', default='fashion_mnist',
                        choices=qhnet_config.DATASET_VARIANTS)
    parser.add_argument('--study', choices=['breakdown'], default=None)
    parser.add_argument('--rows', nargs='+', default=None,
                        help=f'Table 1 rows (default: all {len(qhnet_config.ROWS)})')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--lr_factors', type=float, nargs='+', default=list(LR_FACTORS),
                        help='breakdown study: multiples of the recipe\'s peak learning rate')
    parser.add_argument('--num_epochs', type=int, default=None,
                        help=f'default: {REDUCED_EPOCHS} for fashion_mnist, else the config\'s')
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help='a config override for every run, e.g. data.data_dir=/data')
    parser.add_argument('--runs_dir', default=None,
                        help='default: experiments/table1/runs/<variant>[_<study>]')
    parser.add_argument('--out', default=None, help='results path without extension')
    parser.add_argument('--note', default='', help='a sentence for the results table')
    parser.add_argument('--aggregate_only', action='store_true',
                        help='write the results of the runs finished so far, run nothing')
    parser.add_argument('--dry-run', dest='dry_run', action='store_true',
                        help='print the commands of the runs left, run nothing')
    args = parser.parse_args(argv)
    args.runs_dir = args.runs_dir or os.path.join(
        HERE, 'table1', 'runs', args.variant + (f'_{args.study}' if args.study else ''))
    runs = plan(args)
    left = [run for run in runs if not finished(run) and not gave_up(run)]
    print(f'{len(runs)} runs, {len(runs) - len(left)} done, {len(left)} to run '
          f'(in {args.runs_dir}).', flush=True)
    if args.dry_run:
        for run in left:
            print(' '.join(command(run, args.variant)))
        return 0
    failed = []
    with tqdm.tqdm([] if args.aggregate_only else left, unit='run', desc='table1',
                   dynamic_ncols=True) as bar:
        for run in bar:
            bar.set_postfix_str(f'{run.name}, seed {run.seed}')
            if execute(run, args.variant) != 0 and not gave_up(run):
                failed.append(run)
                tqdm.tqdm.write(f'{run.name}, seed {run.seed} failed: see '
                                f'{os.path.join(run.workdir, LOG_FILE)}')
    from benchmarks import timing  # imports JAX: only once the runs are done
    rows = aggregate(runs, args.variant)
    comparisons = [] if args.study else against(rows, REFERENCE_ROW)
    report = dict(**timing.provenance_fields(MODULE, argv), variant=args.variant,
                  study=args.study, note=args.note, rows=rows, comparisons=comparisons)
    text = markdown(rows, args.variant, args.study, report, args.note, comparisons)
    print(text)
    timing.write_report(output_path(args), text, report)
    if failed:
        print(f'{len(failed)} run(s) failed: ' + '; '.join(
            f'{run.name} seed {run.seed} ({os.path.join(run.workdir, LOG_FILE)})'
            for run in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
