"""The public group spec, fold, forward pass and unfold, for every model family.

`FAMILIES` maps the type of a traced structure (`structure.trace`) to the module of its
family: each has `group_spec(structure, tie_identity_shortcuts)`, `fold`, `apply`, `unfold`
and `form_keys`. This is the only place that tells the families apart. The functions here
also check what every family's functions take on trust: that a form is one of the spec's
model (`check_form`) and that images fit its stem (`check_images`).
"""

import dataclasses
from typing import Callable

import jax
import numpy as np

from qhnet.symmetry import baseline_family, qhnet_family
from qhnet.symmetry.folding import short_list
from qhnet.symmetry.spec import GroupSpec
from qhnet.symmetry.structure import BaselineStructure, InvertedResidual, Structure, trace

FAMILIES = {Structure: qhnet_family, BaselineStructure: baseline_family}


def family(structure):
    """The module of `structure`'s model family (`FAMILIES`)."""
    found = FAMILIES.get(type(structure))
    if found is None:
        raise ValueError(f'a spec\'s structure is one of {[t.__name__ for t in FAMILIES]}; got '
                         f'{type(structure).__name__}: build the spec with group_spec(model)')
    return found


def group_spec(model, tie_identity_shortcuts: bool = False) -> GroupSpec:
    """The `GroupSpec` of a QHNet or baseline module (or of the config `model` section that
    builds one, or of a checkpoint that `qhnet.training.restore_variables` read: its stored
    config's model): its streams, their groups and its blocks' hidden symmetries.

    `tie_identity_shortcuts=True` merges a QHNet's streams across its identity shortcuts, so
    that elements of the spec can be written back into the Flax model (`unfold`). The
    baselines' identity shortcuts always tie their streams: for them it changes nothing.
    """
    structure = trace(model.config.model if _is_restored(model) else model)
    return family(structure).group_spec(structure, tie_identity_shortcuts)


def _is_restored(value) -> bool:
    """Whether `value` is what `restore_variables` returns: (step, config, variables)."""
    return all(hasattr(value, name) for name in ('step', 'config', 'variables'))


def structure_difference(spec: GroupSpec, stored) -> str | None:
    """How the model of a checkpoint's stored config differs from the spec's, or None."""
    if stored == spec.structure:
        return None
    if type(stored) is not type(spec.structure):
        return f'a {type(stored).__name__} against a {type(spec.structure).__name__}'
    for field in dataclasses.fields(stored):
        ours, theirs = getattr(spec.structure, field.name), getattr(stored, field.name)
        if field.name == 'blocks' and len(ours) == len(theirs):
            for block_ours, block_theirs in zip(ours, theirs):
                if block_ours != block_theirs:
                    differing = [f.name for f in dataclasses.fields(block_ours)
                                 if getattr(block_ours, f.name) != getattr(block_theirs, f.name)]
                    return (f'block {block_ours.name}: ' + ', '.join(
                        f'{name} {getattr(block_theirs, name)!r} in the checkpoint, '
                        f'{getattr(block_ours, name)!r} in the spec' for name in differing))
        elif ours != theirs:
            return f'{field.name} {theirs!r:.80} in the checkpoint, {ours!r:.80} in the spec'
    return 'their structures differ'


def form_keys(structure) -> dict[str, tuple[str, ...]]:
    """The layers of the model's inference form, the stem first, and the arrays each holds."""
    return family(structure).form_keys(structure)


def _difference(name: str, wanted, held) -> str | None:
    """'<name> lacks a, b and has c, which the spec's model has not', or None if they agree."""
    lacks, extra = [k for k in wanted if k not in held], [k for k in held if k not in wanted]
    parts = ([f'lacks {short_list(lacks)}'] if lacks else []) + (
        [f'has {short_list(extra)}, which the spec\'s model has not'] if extra else [])
    return f'{name} {" and ".join(parts)}' if parts else None


def _form_mismatch(spec: GroupSpec, form) -> str | None:
    """The first way in which `form` differs from an inference form of `spec`'s model, or None."""
    expected = form_keys(spec.structure)
    if not hasattr(form, 'keys'):
        return f'a form is a dict of layers, as `fold` returns; got {type(form).__name__}'
    problem = _difference('the form', list(expected), list(form))
    for layer, keys in expected.items():  # once the layers agree, their arrays
        problem = problem or _difference(
            layer, keys, list(form[layer]) if hasattr(form[layer], 'keys') else [])
    if problem:
        return problem
    for stream in spec.streams:
        for e in stream.entries:
            shape, size = np.shape(form[e.path[0]][e.path[1]]), stream.width * e.repeat
            if len(shape) <= e.axis or shape[e.axis] != size:
                return (f'{"/".join(e.path)} has shape {shape}, but stream {stream.name!r} needs '
                        f'{size} channels on axis {e.axis}')
    return None


def check_form(spec: GroupSpec, form) -> None:
    """That `form` is an inference form of `spec`'s model: the same layers, the arrays of each
    (`form_keys`), and on every axis a stream acts on, the stream's width. A ValueError names
    the first mismatch."""
    problem = _form_mismatch(spec, form)
    if problem:
        raise ValueError(f'the form does not match the spec: {problem}; fold the variables '
                         "with this model's spec: form = fold(spec, variables)")


def check_images(spec: GroupSpec, form, images) -> None:
    """That `images` is a batch of at least one NHWC image with the channels the form's stem
    kernel reads (any height and width)."""
    kernel = np.shape(form[next(iter(form_keys(spec.structure)))]['kernel'])
    shape, channels = tuple(np.shape(images)), kernel[2]
    if len(shape) != 4 or 0 in shape or shape[-1] != channels:
        raise ValueError(f'images must be an NHWC batch of shape (N, H, W, {channels}) with '
                         f'N, H, W >= 1 and {channels} the input channels of the stem kernel '
                         f'{kernel}; got shape {shape}')


def fold(spec: GroupSpec, variables, dtype=np.float32) -> dict:
    """The inference form (nested dicts of numpy arrays of `dtype`) of a model's variables:
    every BatchNorm folded into its neighbours (`qhnet_family`, `baseline_family`).

    `spec` = `group_spec(model)`; `variables` = {'params', 'batch_stats'} as `model.init` or
    training returns them, or what `qhnet.training.restore_variables` returns, whose stored
    config must describe the spec's model. Variables that are not exactly the model's are
    refused; so is a checkpoint of another model whose variables have the same shapes (e.g.
    another activation).
    """
    if _is_restored(variables):
        difference = structure_difference(spec, trace(variables.config.model))
        if difference:
            raise ValueError(
                f'the checkpoint (step {variables.step}) holds a model other than the spec\'s '
                f'({difference}); build the spec from the checkpoint: '
                'group_spec(restored), restored = restore_variables(workdir)')
        variables = variables.variables
    return family(spec.structure).fold(spec, variables, dtype)


def apply(spec: GroupSpec, form: dict, images: jax.Array) -> jax.Array:
    """Logits of the inference form on NHWC `images`, computed in the form's dtype.

    Equals `model.apply(variables, images, train=False)` for `form = fold(spec, variables)`.
    Refuses a form of another model (`check_form`) and images of the wrong shape
    (`check_images`).
    """
    check_form(spec, form)
    check_images(spec, form, images)
    return family(spec.structure).apply(spec, form, images)


def unfold(spec: GroupSpec, form: dict, dtype=np.float32) -> dict:
    """Variables of the Flax model that compute the form's function, every BN as x -> x + bias
    (scale 1, mean 0, var 1 - eps): for a QHNet, of the model with `mixing=True`.

    Refuses a form of another model (`check_form`) and, for a QHNet, one that changes basis
    across an identity shortcut, which the Flax model has no parameter for: sample from
    `group_spec(model, tie_identity_shortcuts=True)` to avoid them.
    """
    check_form(spec, form)
    return family(spec.structure).unfold(spec, form, dtype)


def tapped_logits(spec: GroupSpec) -> Callable:
    """(form of JAX arrays, images, tap) -> logits, through the family's tap points
    (`qhnet_family.forward`, `baseline_family.forward`)."""
    if isinstance(spec.structure, Structure):
        return lambda form, images, tap: qhnet_family.logits(spec.structure, form, images, tap)
    return lambda form, images, tap: baseline_family.forward(spec.structure, form, images, tap)


def bn_layers(structure) -> dict[str, tuple[list[tuple[str, str, int]], tuple[str, str]]]:
    """{BN point: ([(layer, key, axis)], (layer, bias key))}: the arrays that a per-channel
    affine correction of the value at each BN point rescales (the family's `bn_layers`)."""
    return family(structure).bn_layers(structure)


def tap_streams(spec: GroupSpec) -> dict[str, str]:
    """The stream that each tap point of the forward pass reads, by name: '<block>/input', a
    block's own streams ('<block>/hidden1' and '<block>/hidden2' of a ResNet50,
    '<block>/expanded' and '<block>/squeeze' of a MobileNetV3), a MobileNetV3's
    '<block>/depthwise' (on the expanded stream, or on the input's where the block does not
    expand), 'output', and a MobileNetV3's head activations ('last_conv', 'fc1'). Products,
    pooled features and BN points lie on no stream and are not listed."""
    names = [s.name for s in spec.streams]
    points, current = {}, 'stem'
    for block in spec.structure.blocks:
        points[f'{block.name}/input'] = current
        points.update({name: name for name in names if name.startswith(f'{block.name}/')})
        if isinstance(block, InvertedResidual):
            expanded = f'{block.name}/expanded'
            points[f'{block.name}/depthwise'] = expanded if expanded in names else current
        current = next(s.name for s in spec.streams
                       if block.name in s.blocks and not s.name.startswith(f'{block.name}/'))
    points['output'] = current
    if isinstance(spec.structure, BaselineStructure):
        points.update({layer.path: layer.path for layer in spec.structure.head[:-1]})
    return points
