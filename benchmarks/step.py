"""The README's main config: its training step now against an earlier version's, in one run.

    python -m benchmarks.step --baseline REV        # REV: the git revision to compare with
    python -m benchmarks.step --baseline HEAD~3 --seconds 20 --rounds 3

Each version (this working tree, and `--baseline` checked out in a temporary git
worktree) runs in its own subprocess with its own `qhnet`: it builds the config of
`configs/eq3_softball.py:fashion_mnist` as that version defines it (model, batch size),
compiles its jitted training step (`qhnet.training.steps.jit_train_step`), feeds it real
Fashion-MNIST batches from its own `qhnet.data`, and times `--seconds` of steps after a
warm-up, the way its training loop calls them. The current code runs twice: as
`python -m qhnet.main` runs it, with `qhnet.allocator.reuse_freed_memory()` called first,
and with glibc's default allocator, so that the report separates what the allocator
setting gives from what the code gives. The versions alternate (baseline, current with
the default allocator, current, baseline, ...) `--rounds` times so that a change in
machine load hits all of them; the report gives the medians and their ratios in images/s,
wall clock and process CPU time, and the page faults per step. Where the config's model
changed between the versions, a fourth probe runs the current code on the baseline's
model (its `config.model` fields), so that the report separates what the code gives from
what the network gives. The report names the baseline as `--baseline` gave it. Writes a
markdown report (stdout and `--out`.md) and JSON (`--out`.json); `--out` defaults to
benchmarks/results/<device>/step (`timing.device_slug()`: cpu_2core, gpu_h200, ...),
overwritten by a rerun.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile


from benchmarks import timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = 'benchmarks.step'

# Runs inside a version's checkout: prints one JSON line of step timings.
PROBE = r'''
import inspect, json, resource, sys, time
if sys.argv[2] == 'reuse':  # as qhnet.main does, before JAX's backend starts
    from qhnet import allocator
    allocator.reuse_freed_memory()
import jax, numpy as np
from qhnet import config as qhnet_config, data, models
try:
    from qhnet.training import feeding, recipe, steps
except ImportError:  # a version from before the qhnet.training package
    from qhnet import train as feeding
    recipe = steps = feeding
seconds = float(sys.argv[1])
config = qhnet_config.row_config('eq3_softball', 'fashion_mnist')
for key, value in json.loads(sys.argv[3]).items():  # another version's model fields
    if key in config.model:
        config.model[key] = tuple(value) if isinstance(value, list) else value
model = models.build(config.model)
info = data.get_info(config.data)
per_epoch = recipe.steps_per_epoch(config, info.num_train)
total = recipe.total_train_steps(config, per_epoch)
schedule = recipe.learning_rate_schedule(config, per_epoch, total)
optimizer = recipe.make_optimizer(config, schedule)
step_args = dict(model=model, optimizer=optimizer, schedule=schedule,
                 label_smoothing=config.label_smoothing)
if 'inputs' in inspect.signature(steps.train_step).parameters:
    step_args['inputs'] = steps.model_inputs(info)
step = steps.jit_train_step(feeding.make_mesh(), **step_args)
state = steps.create_train_state(model, optimizer, info.image_shape, jax.random.key(0))
batches = data.make_iterator(config.data, 'train', batch_size=config.batch_size, seed=0,
                             train=True)
host = [next(batches) for _ in range(16)]
rng = jax.random.key(1)
for batch in host[:3]:
    state, metrics = step(state, batch, rng)
jax.block_until_ready(metrics)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
count, start, start_cpu = 0, time.perf_counter(), time.process_time()
while time.perf_counter() - start < seconds:
    state, metrics = step(state, host[count % len(host)], rng)
    count += 1
jax.block_until_ready(metrics)
wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps(dict(batch_size=config.batch_size, steps=count, wall_seconds=wall,
                      model=json.loads(json.dumps(config.model.to_dict(), default=str)),
                      page_faults_per_step=faults / count,
                      cpu_seconds=cpu, images_per_second=count * config.batch_size / wall,
                      images_per_cpu_second=count * config.batch_size / cpu)))
'''


def probe(checkout: str, seconds: float, allocator: str = 'default',
          model: dict | None = None) -> dict:
    """One timing of the training step of the `qhnet` in `checkout`; `allocator` 'reuse'
    calls `qhnet.allocator.reuse_freed_memory()` first; `model` overrides fields of the
    config's model section."""
    result = subprocess.run([sys.executable, '-c', PROBE, str(seconds), allocator,
                             json.dumps(model or {})], cwd=checkout,
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
                images_per_cpu_second=timing.median([r['images_per_cpu_second'] for r in runs]),
                page_faults_per_step=timing.median([r['page_faults_per_step'] for r in runs]))


# (name, label in the report, checkout: 'baseline' or 'current', allocator)
VERSIONS = (('baseline', 'baseline {baseline}', 'baseline', 'default'),
            ('current_default_allocator', 'current, default allocator', 'current', 'default'),
            ('current', 'current, as `qhnet.main` runs it', 'current', 'reuse'))
BASELINE_MODEL = ('current_baseline_model', "current, as `qhnet.main` runs it, on the baseline's "
                  'model', 'current', 'reuse')


def model_changes(baseline: dict, current: dict) -> dict:
    """The model fields that the two versions' configs set differently, as the baseline's;
    not those that only choose how the code computes (`derivative_impl`, ...)."""
    from qhnet.training.workdirs import COMPUTE_ONLY_MODEL_FIELDS
    return {key: value for key, value in baseline.items()
            if key in current and current[key] != value and key not in COMPUTE_ONLY_MODEL_FIELDS}


def markdown(report: dict) -> str:
    base = report['versions']['baseline']
    rows = []
    for name, label, _, _ in VERSIONS + (BASELINE_MODEL,):
        if name not in report['versions']:
            continue
        version = report['versions'][name]
        rows.append(f'| {label.format(baseline=report["baseline_revision"])} | '
                    f'{version["batch_size"]} | {version["images_per_second"]:.0f} | '
                    f'{version["images_per_cpu_second"]:.0f} | '
                    f'{version["page_faults_per_step"]:,.0f} | '
                    f'{version["images_per_second"] / base["images_per_second"]:.2f}x |')
    return '\n'.join([
        "# The README's main config: training step, current code against an earlier version",
        '',
        timing.provenance_line(report),
        '',
        'Config `configs/eq3_softball.py:fashion_mnist` as each '
        f'version defines it; real Fashion-MNIST batches; {report["seconds"]:g} s of steps per '
        f'timing after a warm-up, {report["rounds"]} alternating rounds, medians. Current: '
        f'this working tree; baseline: {report["baseline_revision"]} (git worktree). '
        f'Load average at the end: {report["load_average"]}. {report["note"]}',
        '',
        'Page faults: minor faults of the process per step (fresh pages the kernel maps in and '
        'zeroes). `qhnet.main` keeps freed host memory for reuse (`qhnet.allocator`); the middle '
        'row is the same code with glibc\'s default allocator.',
        '',
        '| version | batch | images/s (wall) | images/s per CPU second | page faults per step '
        '| vs baseline (wall) |',
        '|---|---:|---:|---:|---:|---:|',
        *rows,
        '',
        f'**Current / baseline: {report["ratio_wall"]:.2f}x** on the wall clock '
        f'({report["ratio_cpu"]:.2f}x per CPU second).',
        *code_only(report),
    ]) + '\n'


def code_only(report: dict) -> list[str]:
    if not report['model_changes']:
        return ['', 'Both versions train the same model.']
    changes = ', '.join(f'`{key}` {value}' for key, value in report['model_changes'].items())
    return ['', f"The model changed between the versions; the baseline's: {changes}. The code "
            f"alone, on the baseline's model: **{report['ratio_code_wall']:.2f}x** on the wall "
            f"clock ({report['ratio_code_cpu']:.2f}x per CPU second)."]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--baseline', required=True,
                        help='the git revision to compare with (a commit, tag or branch); the '
                             'report names it as given')
    parser.add_argument('--seconds', type=float, default=20.0, help='timed steps per round')
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--note', default='')
    parser.add_argument('--out', default=None,
                        help='path stem for .md and .json outputs (default: '
                             'benchmarks/results/<device>/step)')
    args = parser.parse_args(argv)
    worktree = baseline_worktree(args.baseline)
    checkouts = {'baseline': worktree, 'current': ROOT}
    runs = {name: [] for name, *_ in VERSIONS}

    def timed(name, checkout, allocator, model=None):
        runs.setdefault(name, []).append(probe(checkout, args.seconds, allocator, model))
        print(f'round {round_index + 1}, {name}: {runs[name][-1]["images_per_second"]:.0f} '
              'images/s', file=sys.stderr, flush=True)

    try:
        for round_index in range(args.rounds):
            for name, _, checkout, allocator in VERSIONS:
                timed(name, checkouts[checkout], allocator)
            if round_index == 0:
                changes = model_changes(runs['baseline'][0]['model'], runs['current'][0]['model'])
            if changes:
                timed(BASELINE_MODEL[0], ROOT, BASELINE_MODEL[3], changes)
    finally:
        subprocess.run(['git', '-C', ROOT, 'worktree', 'remove', '--force', worktree],
                       check=False, capture_output=True)
    versions = {name: summarise(version_runs) for name, version_runs in runs.items()}
    baseline, current = versions['baseline'], versions['current']
    report = dict(**timing.provenance_fields(MODULE, argv), seconds=args.seconds,
                  rounds=args.rounds,
                  current_revision=timing.git_revision(), baseline_revision=args.baseline,
                  versions=versions, note=args.note, model_changes=changes,
                  ratio_wall=current['images_per_second'] / baseline['images_per_second'],
                  ratio_cpu=current['images_per_cpu_second'] / baseline['images_per_cpu_second'],
                  load_average=timing.load_average())
    if changes:
        same = versions[BASELINE_MODEL[0]]
        report.update(
            ratio_code_wall=same['images_per_second'] / baseline['images_per_second'],
            ratio_code_cpu=same['images_per_cpu_second'] / baseline['images_per_cpu_second'])
    text = markdown(report)
    print(text)
    # JAX starts in this process only now: the versions ran in subprocesses.
    timing.write_report(args.out or timing.results_stem('step'), text, report)


if __name__ == '__main__':
    main()
