"""Benchmark of the symmetry toolkit on the 224x224 Eq. (3) softball@ds model (8.6M parameters).

    python -m benchmarks.symmetry      # writes benchmarks/results/<device>/symmetry.{md,json}
    python -m benchmarks.symmetry --batch 8 --reps 5 --out /tmp/symmetry

Times each step of the pipeline, fold -> sample -> act -> verify, in float32 and
float64 (variables from `qhnet.symmetry.testing.random_variables`, so every BN is
non-trivial; random N(0, 1) images), round-robin
over `--reps` repetitions (medians).
`verify` includes one `act` and two eager forward passes of the inference form. Then
reports the invariance error (max relative change of the logits) of random admitted
elements at cond(T) = 1, 10, 100, 1000 against `verify`'s tolerance, and of a
forbidden one (GL with cond 10 on the O(n) streams) for contrast; and the same for the
model with activation='identity', whose stage streams admit GL. Last, in float64, every
Table 1 block architecture x activation x placement in a small-input network on real
scikit-learn digits: the largest change an admitted element makes, and the smallest that
an element of a group the activation does not admit makes. `--out` defaults to
benchmarks/results/<device>/symmetry (`timing.device_slug()`: cpu_2core, gpu_h200, ...),
overwritten by a rerun.
"""

import argparse
import functools

import jax
import numpy as np

from benchmarks import timing
from qhnet import config, models
from qhnet import symmetry
from qhnet.symmetry.testing import random_variables

MODULE = 'benchmarks.symmetry'
CONDITIONS = (1.0, 10.0, 100.0, 1000.0)
ACTIVATIONS = ('relu', 'hardtanh', 'hardball', 'softball', 'identity')
# A stage 1 without a carrier, a downsampling carrier alone, a last block that carries the
# activation without downsampling: the stream layout of the ResNet50 one, in miniature.
SMALL = dict(stem='small', widths=(8, 16, 32), depths=(2, 1, 2), num_classes=10)
# The group that an activation's streams do not admit, for the negative control.
FORBIDDEN = {'relu': 'O', 'hardtanh': 'O', 'hardball': 'GL', 'softball': 'GL'}


def stages(spec, variables, images, dtype) -> dict:
    """The pipeline's steps as thunks, each on the previous step's (precomputed) output."""
    form = symmetry.fold(spec, variables, dtype)
    element = symmetry.sample(spec, jax.random.key(0), cond=10.0)
    return {
        'fold': functools.partial(symmetry.fold, spec, variables, dtype),
        'sample': functools.partial(symmetry.sample, spec, jax.random.key(0), cond=10.0),
        'act': functools.partial(symmetry.act, spec, form, element),
        'apply': functools.partial(symmetry.apply, spec, form, images),
        'verify': functools.partial(symmetry.verify, spec, form, element, images),
    }


def errors(spec, variables, images, dtype) -> list[dict]:
    """verify's report for admitted elements at each cond(T), and (if the model's streams are
    not GL) for GL elements, which they do not admit."""
    form = symmetry.fold(spec, variables, dtype)
    rows = []
    for cond in CONDITIONS:
        element = symmetry.sample(spec, jax.random.key(1), cond=cond)
        rows.append(dict(symmetry.verify(spec, form, element, images),
                         element=f'admitted, cond(T) = {cond:g}'))
    if spec.streams[-1].group != 'GL':
        forbidden = {s.name: 'GL' for s in spec.streams[1:]}
        element = symmetry.sample(spec, jax.random.key(1), cond=10.0, group=forbidden, force=True,
                                  hidden=False)
        rows.append(dict(symmetry.verify(spec, form, element, images, force=True),
                         element=f'forbidden: GL, cond(T) = 10, on the {spec.streams[-1].group} '
                                 'streams'))
    return rows


def architectures() -> dict[str, dict]:
    """The distinct QHNet block architectures of Table 1 (equation, weight sharing, multiplier),
    named like 'eq3', 'eq3_nows_x6'."""
    found = {}
    for key in config.ROWS:
        model = config.row_config(key).model
        if model.name == 'qhnet':
            name = (f'eq{model.equation}' + ('' if model.weight_sharing else '_nows')
                    + (f'_x{model.multiplier}' if model.multiplier != 4 else ''))
            found[name] = dict(equation=model.equation, weight_sharing=model.weight_sharing,
                               multiplier=model.multiplier)
    return found


def matrix_errors(images: np.ndarray) -> list[dict]:
    """Float64 invariance errors of every architecture x activation x placement (module doc)."""
    rows = []
    with jax.enable_x64(True):
        for name, fields in architectures().items():
            for activation in ACTIVATIONS:
                for placement in ('ds', 'all'):
                    model_config = config.model_config()
                    model_config.update(dict(fields, activation=activation, placement=placement,
                                             **SMALL))
                    model = models.build(model_config)
                    variables = random_variables(model, images.shape)
                    spec = symmetry.group_spec(model)
                    form = symmetry.fold(spec, variables, np.float64)
                    element = symmetry.sample(spec, jax.random.key(1), cond=10.0)
                    row = dict(architecture=name, activation=activation, placement=placement,
                               admitted=symmetry.verify(spec, form, element, images)['error'])
                    if activation in FORBIDDEN:
                        asked = {s.name: FORBIDDEN[activation] for s in spec.streams[1:]}
                        element = symmetry.sample(spec, jax.random.key(1), cond=10.0, group=asked,
                                                  force=True, hidden=False)
                        row['forbidden'] = symmetry.verify(spec, form, element, images,
                                                           force=True)['error']
                    rows.append(row)
    return rows


def digits_images() -> np.ndarray:
    """16 of scikit-learn's real 8x8 digits, upsampled to 16x16 (stages at 16, 8, 4 pixels)."""
    from sklearn.datasets import load_digits  # noqa: PLC0415 (a dev dependency)
    digits = (load_digits().images[:16] / 16.0)[..., None]
    return np.asarray(jax.image.resize(digits, (16, 16, 16, 1), 'bilinear'), np.float64)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--reps', type=int, default=3)
    parser.add_argument('--out', default=None,
                        help='path stem for .md and .json outputs (default: '
                             'benchmarks/results/<device>/symmetry)')
    args = parser.parse_args(argv)
    args.out = args.out or timing.results_stem('symmetry')
    provenance = timing.provenance_fields(MODULE, argv)

    model = models.build(config.row_config('eq3_softball').model)
    images = np.random.default_rng(0).standard_normal((args.batch, 224, 224, 3)).astype(np.float32)
    variables = random_variables(model, images.shape)
    # Unclipped, 16 quadratic blocks overflow unless their updates are smaller.
    gl_variables = random_variables(model, images.shape, update=(0.05, 0.15))
    spec = symmetry.group_spec(model)
    gl_spec = symmetry.group_spec(model.clone(activation='identity'))
    results = {}
    for dtype in (np.float32, np.float64):
        with jax.enable_x64(dtype == np.float64):
            thunks = stages(spec, variables, images, dtype)
            times = timing.interleaved(thunks, args.reps)
            results[np.dtype(dtype).name] = {
                'seconds': {name: timing.median(t['wall']) for name, t in times.items()},
                'cpu_seconds': {name: timing.median(t['cpu']) for name, t in times.items()},
                'spread': {name: timing.spread(t['wall']) for name, t in times.items()},
                'errors': [dict(r, model='softball@ds')
                           for r in errors(spec, variables, images, dtype)]
                + [dict(r, model='identity@ds')
                   for r in errors(gl_spec, gl_variables, images, dtype)]}

    num_params = sum(x.size for x in jax.tree_util.tree_leaves(variables['params']))
    streams = ', '.join(f'{s.name}: {s.group}({s.width})' for s in spec.streams)
    lines = [
        '# Symmetry toolkit: fold, sample, act, verify on the 224x224 Eq. (3) softball@ds model',
        '',
        timing.provenance_line(provenance),
        '',
        f'Load average over 1, 5, 15 minutes at the end, this run included: '
        f'{timing.load_average()}.',
        '',
        f'Model: {num_params:,} parameters, {len(spec.streams)} streams ({streams}), '
        f'{len(spec.hidden)} blocks with hidden permutations and scalings. Batch of {args.batch} '
        'random '
        'images. Medians of the repetitions: wall-clock seconds (relative spread in brackets) and '
        'CPU seconds of this process (all threads; less distorted by the other processes). '
        '`verify` = one `act` + two eager forward passes (`apply`). `fold`, `sample` and `act` '
        'compute in numpy float64 whatever the form\'s dtype.',
        '',
        '| step | float32 wall | float32 CPU | float64 wall | float64 CPU |',
        '|---|---:|---:|---:|---:|',
    ]
    for name in ('fold', 'sample', 'act', 'apply', 'verify'):
        cells = [f'{results[d]["seconds"][name]:.2f} s ({results[d]["spread"][name]:.0%}) | '
                 f'{results[d]["cpu_seconds"][name]:.2f} s' for d in ('float32', 'float64')]
        lines.append(f'| {name} | {" | ".join(cells)} |')
    lines += ['', 'Invariance: max over the images of |z\' - z|_inf / |z|_inf for the logits z, '
              'against '
              '`verify`\'s tolerance 100 eps sqrt(512) kappa, kappa = `condition(element)` '
              '(the largest cond(T); 1 for scaled permutations). The same '
              'model with activation=\'identity\' (Eq. (3) identity@ds; BN_o scales of 0.05 to '
              '0.15 so that it does not overflow) has GL stage streams.', '',
              '| model | element | kappa | float32 error | float32 tolerance | float64 error | '
              'float64 tolerance |',
              '|---|---|---:|---:|---:|---:|---:|']
    for r32, r64 in zip(results['float32']['errors'], results['float64']['errors']):
        lines.append(f'| {r32["model"]} | {r32["element"]} | {r32["kappa"]:.3g} | '
                     f'{r32["error"]:.2e} | {r32["tolerance"]:.1e} | {r64["error"]:.2e} | '
                     f'{r64["tolerance"]:.1e} |')
    matrix = matrix_errors(digits_images())
    lines += ['', 'Every Table 1 block architecture x activation x placement, '
              f'small-input network (widths {SMALL["widths"]}, depths {SMALL["depths"]}) on 16 '
              'real digits at 16x16, float64, `random_variables`: the change of the logits by an '
              'admitted element (cond(T) = 10, hidden permutations and scalings included), and by '
              'an element of a group the activation does not admit (GL for the balls, O for relu '
              'and hardtanh, on every stream after the stem).', '',
              '| architecture | placement | ' + ' | '.join(ACTIVATIONS) + ' | forbidden, smallest |',
              '|---|---|' + '---:|' * (len(ACTIVATIONS) + 1)]
    for name in architectures():
        for placement in ('ds', 'all'):
            cells = {r['activation']: r for r in matrix
                     if r['architecture'] == name and r['placement'] == placement}
            forbidden = min(r['forbidden'] for r in cells.values() if 'forbidden' in r)
            lines.append(f'| {name} | {placement} | '
                         + ' | '.join(f'{cells[a]["admitted"]:.1e}' for a in ACTIVATIONS)
                         + f' | {forbidden:.2f} |')
    admitted = max(r['admitted'] for r in matrix)
    forbidden = min(r['forbidden'] for r in matrix if 'forbidden' in r)
    lines += ['', f'Largest admitted change: {admitted:.1e}; smallest forbidden change: '
              f'{forbidden:.3f}.']
    text = '\n'.join(lines) + '\n'
    print(text)
    timing.write_report(args.out, text, {
        **provenance, 'load': timing.load_average(), 'batch': args.batch,
        'reps': args.reps, 'results': results, 'matrix': matrix})


if __name__ == '__main__':
    main()
