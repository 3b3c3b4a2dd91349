"""The continuous symmetry of QHNet as pure functions over pytrees (docs/design.md, 'Streams and
groups').

The same functions cover the baselines (ResNet50, MobileNetV3Large): their hidden-channel
symmetries, permutations and positive scalings of relu channels, permutations of hardswish
channels and GL(n) on MobileNet's linear bottlenecks (`qhnet.symmetry.baselines`).

    spec = group_spec(model)                  # streams, groups, hidden symmetries: from the model
    form = fold(spec, variables)              # BN folded, mixing maps and shortcuts explicit
    logits = apply(spec, form, images)        # == model.apply(variables, images, train=False)
    g = sample(spec, jax.random.key(0), cond=10.0)
    moved = act(spec, form, g)                # same logits; act(spec, moved, inverse(g)) == form
    verify(spec, form, g, images)             # {'error', 'tolerance', 'kappa', 'verifiable',
                                              #  'invariant'}
    variables = unfold(spec, moved)           # back to the Flax model with mixing=True

Command line: `python -m qhnet.symmetry verify --workdir=DIR` (see `__main__`).
"""

from qhnet.symmetry.action import act, condition, invariance_tolerance, inverse, sample, verify
from qhnet.symmetry.groups import ADMITTED, GROUPS
from qhnet.symmetry.inference import apply, fold, unfold
from qhnet.symmetry.spec import Entry, GroupSpec, Hidden, HiddenEntry, Stream, group_spec

__all__ = ['ADMITTED', 'GROUPS', 'Entry', 'GroupSpec', 'Hidden', 'HiddenEntry', 'Stream', 'act',
           'apply', 'condition', 'fold', 'group_spec', 'invariance_tolerance', 'inverse', 'sample',
           'unfold', 'verify']
