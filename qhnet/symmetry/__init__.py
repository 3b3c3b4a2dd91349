"""The continuous symmetry of QHNet as pure functions over pytrees (docs/design.md, 'Streams and
groups').

The same functions cover the baselines (ResNet50, MobileNetV3Large): their hidden-channel
symmetries, permutations and positive scalings of relu channels, permutations of hardswish
channels and GL(n) on MobileNet's linear bottlenecks (`qhnet.symmetry.baseline_family`).

    spec = group_spec(model)                  # streams, groups, hidden symmetries: from the model
    form = fold(spec, variables)              # BN folded, mixing maps and shortcuts explicit
    logits = apply(spec, form, images)        # == model.apply(variables, images, train=False)
    g = sample(spec, jax.random.key(0), cond=10.0)
    moved = act(spec, form, g)                # same logits; act(spec, moved, inverse(g)) == form
    verify(spec, form, g, images)             # {'error', 'tolerance', 'kappa', 'verifiable',
                                              #  'invariant'}
    variables = unfold(spec, moved)           # back to the Flax model with mixing=True

Low-bit inference through the group (`qhnet.symmetry.quantize`):

    quantized = quantize.quantize(spec, form, images, bits='w4a4', transform='hadamard')
    logits = quantize.apply(spec, quantized, images)

Two models aligned through the group, and the line between them (`qhnet.symmetry.align`):

    g = align.align(spec, form_a, form_b, images)   # moves B into A's coordinates
    middle = align.interpolate(form_a, act(spec, form_b, g), 0.5)

Command line: `python -m qhnet.symmetry verify --workdir=DIR`, `python -m qhnet.symmetry
slice --workdir=DIR --keep=0.75 --output_workdir=OUT`, `python -m qhnet.symmetry quantize
--workdir=DIR --bits=w4a4 --transform=learned --output_workdir=OUT`, `python -m
qhnet.symmetry align --workdir=A --other=B --output_workdir=OUT` (see `__main__`).

The modules form a chain: each imports only modules above it, and the two families not each
other (tests/test_symmetry.py, `test_imports_form_a_chain`).

    structure.py        the structures traced from a model: QHNet's, the baselines'; `trace`
    spec.py             the spec's dataclasses: Entry, Stream, HiddenEntry, Hidden, GroupSpec
    folding.py          what both families fold with: BatchNorms, variables, dtypes
    qhnet_family.py     a QHNet's group_spec, fold, apply, unfold and form_keys
    baseline_family.py  the same for ResNet50 and MobileNetV3Large
    families.py         FAMILIES, structure type -> family; the public group_spec, fold, apply,
                        unfold and the form checks, which look the family up there
    action.py           group elements: sample, act, inverse, condition, verify
    slicing.py          streams rotated to their principal axes and cut (Eq. (3) models);
                        a ResNet50's channels pruned, for comparison
    rounding.py         integer grids for weights and activations; the quantized forward pass
    checks.py           what the command line checks before any work
    align.py            two models aligned through the group (activation matching: Procrustes,
                        least squares, assignments); interpolation, REPAIR, barriers
    quantize.py         the group elements applied before rounding (random, Hadamard, learned
                        rotations; SmoothQuant-style scalings) and `quantize`
    __init__.py         this public API
    commands.py         the command line's slice, quantize and align
    __main__.py         the command line: its flags, verify, and the subcommands

`groups.py` (the matrix groups) and `testing.py` (random variables for tests) import nothing
from the package; any module may import them.
"""

from qhnet.symmetry.action import act, condition, invariance_tolerance, inverse, sample, verify
from qhnet.symmetry.families import apply, fold, group_spec, unfold
from qhnet.symmetry.groups import ADMITTED, GROUPS
from qhnet.symmetry.spec import Entry, GroupSpec, Hidden, HiddenEntry, Stream

__all__ = ['ADMITTED', 'GROUPS', 'Entry', 'GroupSpec', 'Hidden', 'HiddenEntry', 'Stream', 'act',
           'apply', 'condition', 'fold', 'group_spec', 'invariance_tolerance', 'inverse', 'sample',
           'unfold', 'verify']
