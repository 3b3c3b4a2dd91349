"""Slicing through the group: every stream rotated to its principal axes, its weakest
directions deleted (docs/design.md, 'Slicing').

A stream of n channels is read by every block that takes it as input, and the last one by
the pooled head. Over calibration images its second moment Sigma = E[u^T u] (over images,
pixels and reads, `stream_moments`) has eigenvectors Q with eigenvalues l_1 >= ... >= l_n.
Where the stream's group holds O(n) (softball and hardball: O(n); identity: GL(n)), the
group element T = Q moves the stream onto those axes without changing the function
(`action.act`). Slicing then deletes the last n - k coordinates, which carry the fraction
(l_{k+1} + ... + l_n) / trace(Sigma) of the stream's second moment: along every axis that
the stream's entries name, it keeps the first k channels (rows of C, E and the shortcut;
columns of A, the shortcut, the stem kernel; biases; rows of the head). Nothing else
changes, so `keep=1` is the same function.

Every stream keeps the same fraction `keep` of its channels, except the stem's, which keeps
all of them unless `slice_stem=True`: it admits no rotation (a ReLU stream), it holds few of
the parameters, and deleting even one of its channels costs far more accuracy than cutting
the other streams (`experiments/slicing/results.md`).

`method`:

    'rotate'     T = Q where the group holds O(n); elsewhere (the stem's ReLU stream,
                 hardtanh streams) the permutation of 'select'
    'select'     no rotation: keep the k channels with the largest variance, diag(Sigma)
    'magnitude'  no rotation: keep the k channels whose weights (every array entry of the
                 stream, that channel's rows or columns) have the largest L2 norm

The sliced form is a Flax model (`models.QHNet` with `stream_widths` and mixing maps: a
k x n map E feeds each block's n-channel product) whose ball activations keep the radius
sqrt(n) of the unsliced width. Its BatchNorms are written with the calibration statistics
of their inputs, so that training mode starts from nearly the function of evaluation mode
(`calibrate_batch_norms`). A QLNet is sliced the same way, with no maps to add: both halves
of its first 1x1 conv read the k kept channels. Eq. (3) models and QLNets only, for now; a
form of other equations is refused. The baseline without a continuous group, a ResNet50, is
cut by `prune` into a smaller inference form (every stream a scaled permutation: selection
or magnitude only).

    result = slice_variables(config, variables, calibration_images, keep=0.75)
    result.config, result.variables   # the sliced model: build, apply, train, fold again
    result.streams                    # per stream: width, kept, explained variance, MACs
    calibration = calibrate(config, variables, calibration_images)  # shared by many slices
    form, kept = prune(calibrate(resnet_config, resnet_variables, images), 0.75, 'select')

At keep=1 the sliced model has the unsliced function and more parameters: its k x n maps
E (for the Fashion-MNIST main model of widths 16, 32, 128, 256: 283,626 against 265,706).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qhnet import models
from qhnet.symmetry import groups
from qhnet.symmetry.action import act
from qhnet.symmetry.families import (check_images, fold, group_spec, tap_streams,
                                     tapped_logits, unfold)
from qhnet.symmetry.folding import HIGHEST
from qhnet.symmetry.spec import GroupSpec
from qhnet.symmetry.structure import BaselineStructure, Structure, trace

METHODS = ('rotate', 'select', 'magnitude')


@dataclasses.dataclass(frozen=True)
class SlicedStream:
    name: str
    group: str
    width: int
    kept: int
    rotated: bool
    explained_variance: float     # of the kept directions, a fraction of trace(Sigma)
    macs_before: int              # multiply-adds per image of the arrays the stream names
    macs_after: int


@dataclasses.dataclass(frozen=True)
class Sliced:
    config: ml_collections.ConfigDict
    variables: dict
    streams: tuple[SlicedStream, ...]


def _check_model(spec: GroupSpec) -> None:
    structure = spec.structure
    if not isinstance(structure, Structure) or structure.equation not in (3, 'qlnet'):
        kind = (f'Eq. ({structure.equation})' if isinstance(structure, Structure)
                else 'a baseline (ResNet50 or MobileNetV3)')
        raise ValueError(f'slicing covers QHNets of Eq. (3) and QLNets for now; this model is '
                         f'{kind}. Slice an Eq. (3) model (configs/eq3_*.py) or a QLNet')


def _check_prunable(spec: GroupSpec) -> None:
    """Calibration and `prune` cover Eq. (3) QHNets, QLNets and ResNet50s."""
    structure = spec.structure
    if isinstance(structure, BaselineStructure) and structure.model == 'ResNet50':
        return
    _check_model(spec)


def kept_width(width: int, keep: float) -> int:
    """round(keep * width), at least 1."""
    return max(1, int(round(keep * width)))


def kept_widths(spec: GroupSpec, keep: float, slice_stem: bool = False) -> dict[str, int]:
    """stream -> the channels it keeps: `kept_width(width, keep)`, except that the stem's
    stream keeps all of its channels unless `slice_stem` (module docstring)."""
    return {s.name: s.width if s.name == 'stem' and not slice_stem else kept_width(s.width, keep)
            for s in spec.streams}


# Calibration.

def _moments_fn(spec: GroupSpec):
    """A jitted (form, images) -> ({stream: sum of u^T u}, {stream: number of rows u}) over
    every place a stream is read, on a QHNet's or a ResNet50's form."""
    streams, logits = tap_streams(spec), tapped_logits(spec)

    def forward(form, images, read):
        def tap(point, x):
            if point in streams:
                read(streams[point], x)
            return x

        logits(form, images, tap)

    @jax.jit
    def moments(form, images):
        sums, counts = {}, {}

        def read(name, x):
            flat = x.reshape(-1, x.shape[-1])
            sums[name] = sums.get(name, 0.0) + jnp.dot(flat.T, flat, precision=HIGHEST)
            counts[name] = counts.get(name, 0) + flat.shape[0]

        forward(form, images, read)
        return sums, counts

    return moments


def stream_moments(spec: GroupSpec, form: dict, images: np.ndarray,
                   batch_size: int = 128) -> dict[str, np.ndarray]:
    """Each stream's second moment E[u^T u] (float64, n x n) over `images`, their pixels and
    every place the stream is read (module docstring), computed in the form's dtype."""
    _check_prunable(spec)
    moments = _moments_fn(spec)
    form = jax.tree.map(jnp.asarray, form)
    dtype = jax.tree.leaves(form)[0].dtype
    totals, counts = {}, {}
    for start in range(0, len(images), batch_size):
        sums, rows = moments(form, jnp.asarray(images[start:start + batch_size], dtype))
        for name, value in sums.items():
            totals[name] = totals.get(name, 0.0) + np.asarray(value, np.float64)
            counts[name] = counts.get(name, 0) + int(rows[name])
    return {name: totals[name] / counts[name] for name in totals}


def _resolutions(structure: Structure, image_hw: tuple[int, int]) -> tuple[tuple[int, int], list]:
    """(the stem's output resolution, [(block input, block output) resolution per block])."""
    def down(hw, stride, kernel=3, padding=1):
        return tuple((size + 2 * padding - kernel) // stride + 1 for size in hw)
    (pad_h, _), (pad_w, _) = structure.stem_padding
    kernel = dict(structure.variable_shapes)['params/stem_conv/kernel'][0]
    hw = tuple((size + 2 * pad - kernel) // stride + 1
               for size, pad, stride in zip(image_hw, (pad_h, pad_w), structure.stem_stride))
    if structure.stem_pool:
        hw = down(hw, 2)
    stem_hw, blocks = hw, []
    for block in structure.blocks:
        out = tuple(-(-size // block.stride) for size in hw)
        blocks.append((hw, out))
        hw = out
    return stem_hw, blocks


# Multiply-adds of the form's arrays.

def array_macs(spec: GroupSpec, form: dict, image_hw) -> dict[tuple[str, str], int]:
    """Multiply-adds per image of each weight array of the form (biases and K's taps are not
    counted: a stream's width does not change K's work)."""
    structure = spec.structure
    stem_hw, blocks = _resolutions(structure, tuple(image_hw))
    stem = int(np.prod(np.shape(form['stem']['kernel'])))
    macs = {('stem', 'kernel'): stem * stem_hw[0] * stem_hw[1]}
    for block, (hw_in, hw_out) in zip(structure.blocks, blocks):
        p = form[block.name]
        coef_hw = hw_in if structure.equation == 'qlnet' else hw_out  # QLNet's product: full size
        for key, hw in (('coef', coef_hw), ('factor', coef_hw), ('mix_in', hw_in),
                        ('combine', hw_out), ('shortcut', hw_out)):
            if key in p:
                macs[block.name, key] = int(np.prod(np.shape(p[key]))) * hw[0] * hw[1]
    macs['head', 'kernel'] = int(np.prod(np.shape(form['head']['kernel'])))
    return macs


# Rotations and slices.

def _permutation(order: np.ndarray) -> np.ndarray:
    """T with u T = u[order]: column i picks channel order[i]."""
    t = np.zeros((len(order), len(order)))
    t[order, np.arange(len(order))] = 1.0
    return t


def _channel_norms(stream, form) -> np.ndarray:
    """L2 norm of every weight touching each channel of the stream, over all its entries."""
    square = np.zeros(stream.width)
    for e in stream.entries:
        x = np.moveaxis(np.asarray(form[e.path[0]][e.path[1]], np.float64), e.axis, 0)
        x = x.reshape(stream.width, e.repeat, -1)
        square += np.sum(x ** 2, axis=(1, 2))
    return np.sqrt(square)


def basis(spec: GroupSpec, form: dict, moments: dict[str, np.ndarray],
          method: str = 'rotate') -> dict[str, tuple[np.ndarray, np.ndarray, bool]]:
    """stream -> (T, the second moment's diagonal in the new basis, rotated?), the new
    channels in decreasing order of importance (module docstring)."""
    if method not in METHODS:
        raise ValueError(f'unknown slicing method {method!r}; valid choices: {list(METHODS)}')
    found = {}
    for stream in spec.streams:
        sigma = moments[stream.name]
        if method == 'rotate' and groups.contains(stream.group, 'O'):
            values, vectors = np.linalg.eigh(sigma)
            order = np.argsort(values)[::-1]
            found[stream.name] = (vectors[:, order], np.clip(values[order], 0, None), True)
            continue
        score = np.diag(sigma) if method != 'magnitude' else _channel_norms(stream, form)
        order = np.argsort(-score, kind='stable')
        found[stream.name] = (_permutation(order), np.diag(sigma)[order], False)
    return found


def _slice_axis(x: np.ndarray, axis: int, width: int, repeat: int, kept: int) -> np.ndarray:
    """The first `kept` of the `width` channels (each `repeat` wide) along `axis`."""
    x = np.moveaxis(x, axis, 0)
    x = x.reshape(width, repeat, *x.shape[1:])[:kept].reshape(kept * repeat, *x.shape[1:])
    return np.moveaxis(x, 0, axis)


def slice_form(spec: GroupSpec, form: dict, kept: dict[str, int]) -> dict:
    """The form with only the first kept[s] channels of every stream s."""
    new = {name: dict(arrays) for name, arrays in form.items()}
    for stream in spec.streams:
        for e in stream.entries:
            layer, key = e.path
            new[layer][key] = _slice_axis(np.asarray(new[layer][key]), e.axis, stream.width,
                                          e.repeat, kept[stream.name])
    return new


def stage_streams(spec: GroupSpec, model_config) -> list[str]:
    """The stream of each stage's blocks (one per stage in the tied spec)."""
    output_stream = {block: s.name for s in spec.streams for block in s.blocks}
    return [output_stream[f'stage{stage + 1}_block1'] for stage in range(len(model_config.widths))]


def sliced_config(config: ml_collections.ConfigDict, stream_widths) -> ml_collections.ConfigDict:
    """`config` with the model's streams `stream_widths` wide (and a QHNet's mixing maps)."""
    config = config.copy_and_resolve_references()
    config.model.mixing = config.model.name == 'qhnet'
    config.model.stream_widths = tuple(int(k) for k in stream_widths)
    return config


# Batch norms for training mode.

def calibrate_batch_norms(model: nn.Module, variables: dict, images: np.ndarray,
                          batch_size: int = 128) -> dict:
    """`variables` with every BatchNorm rewritten to the same function in evaluation mode, but
    with the mean and variance of its input over `images` as running statistics (and scale,
    bias to match), so that training mode, which normalises by batch statistics, starts from
    about the same function."""
    model64 = model.clone(dtype=jnp.float64)

    @jax.jit
    def batch_sums(params, batch):  # {BN path: (rows, sum, sum of squares) of its input}
        sums = {}

        def record(next_fun, args, kwargs, context):
            if isinstance(context.module, nn.BatchNorm) and context.method_name == '__call__':
                x = args[0].reshape(-1, args[0].shape[-1]).astype(jnp.float64)
                sums['/'.join(context.module.scope.path)] = (x.shape[0], jnp.sum(x, 0),
                                                             jnp.sum(x * x, 0))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            model64.apply(params, batch, train=False)
        return sums

    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), variables)
        totals: dict[str, list] = {}
        for start in range(0, len(images), batch_size):
            found = batch_sums(params64, jnp.asarray(images[start:start + batch_size], jnp.float64))
            for path, values in found.items():
                values = [np.asarray(v, np.float64) for v in values]
                totals[path] = ([a + b for a, b in zip(totals[path], values)] if path in totals
                                else values)
        moments = {path: (s / count, q / count) for path, (count, s, q) in totals.items()}
    new = jax.tree.map(np.asarray, variables)
    epsilons = dict(trace(model).epsilons)
    for path, (mean, square) in moments.items():
        p, stats = _node(new['params'], path), _node(new['batch_stats'], path)
        eps = epsilons[path]
        s, t = _affine(p, stats, eps)                # BN(x) = x s + t now
        var = np.maximum(square - mean ** 2, 0.0)
        sigma = np.sqrt(var + eps)
        dtype = np.asarray(p['scale']).dtype
        stats['mean'], stats['var'] = mean.astype(dtype), var.astype(dtype)
        p['scale'], p['bias'] = (s * sigma).astype(dtype), (t + mean * s).astype(dtype)
    return new


def _node(tree: dict, path: str) -> dict:
    for key in path.split('/'):
        tree = tree[key]
    return tree


def _affine(p, stats, eps):
    s = np.asarray(p['scale'], np.float64) / np.sqrt(np.asarray(stats['var'], np.float64) + eps)
    return s, np.asarray(p['bias'], np.float64) - np.asarray(stats['mean'], np.float64) * s


# The whole slice.

@dataclasses.dataclass(frozen=True)
class Calibration:
    """What every slice of one model shares: its tied spec, its float64 form, the streams'
    second moments on the calibration images, and those images."""
    spec: GroupSpec
    form: dict
    moments: dict
    images: np.ndarray


def calibrate(config: ml_collections.ConfigDict, variables: dict,
              images: np.ndarray) -> Calibration:
    """The `Calibration` of the model of `config` with `variables` on `images` (normalised)."""
    spec = group_spec(models.build(config.model), tie_identity_shortcuts=True)
    _check_prunable(spec)
    with jax.enable_x64(True):
        form = fold(spec, variables, np.float64)
        check_images(spec, form, images)
        moments = stream_moments(spec, form, np.asarray(images, np.float64))
    return Calibration(spec, form, moments, np.asarray(images))


def slice_variables(config: ml_collections.ConfigDict, variables: dict, images: np.ndarray,
                    keep: float, method: str = 'rotate',
                    calibration: Calibration | None = None, dtype=np.float32,
                    slice_stem: bool = False) -> Sliced:
    """The model of `config` with `variables`, each stream rotated (`method`) and cut to
    `kept_widths(spec, keep, slice_stem)` channels, calibrated on `images` (normalised, NHWC;
    or on those of `calibration`, computed once for many slices): its config, its variables
    (of `dtype`) and what each stream kept (module docstring)."""
    calibration = calibration or calibrate(config, variables, images)
    _check_model(calibration.spec)
    spec, form, images = calibration.spec, calibration.form, calibration.images
    sliced_form, kept, chosen = _prune(calibration, keep, method, slice_stem)
    new_config = sliced_config(config, [kept[name] for name in stage_streams(spec, config.model)])
    new_model = models.build(new_config.model)
    new_spec = group_spec(new_model, tie_identity_shortcuts=True)
    new_variables = calibrate_batch_norms(new_model, unfold(new_spec, sliced_form, dtype),
                                          images)
    macs_before = array_macs(spec, form, images.shape[1:3])
    macs_after = array_macs(new_spec, sliced_form, images.shape[1:3])
    streams = []
    for s in spec.streams:
        _, energy, rotated = chosen[s.name]
        named = {e.path for e in s.entries if e.path in macs_before}
        streams.append(SlicedStream(
            name=s.name, group=s.group, width=s.width, kept=kept[s.name], rotated=rotated,
            explained_variance=float(energy[:kept[s.name]].sum() / max(energy.sum(), 1e-300)),
            macs_before=sum(macs_before[p] for p in named),
            macs_after=sum(macs_after[p] for p in named)))
    return Sliced(new_config, new_variables, tuple(streams))


def _prune(calibration: Calibration, keep: float, method: str, slice_stem: bool):
    if not 0 < keep <= 1:
        raise ValueError(f'keep={keep:g} is the fraction of each stream to keep; pass a number in '
                         '(0, 1]')
    spec, form = calibration.spec, calibration.form
    chosen = basis(spec, form, calibration.moments, method)
    moved = act(spec, form, {'streams': {name: t for name, (t, _, _) in chosen.items()}})
    kept = kept_widths(spec, keep, slice_stem)
    return slice_form(spec, moved, kept), kept, chosen


def prune(calibration: Calibration, keep: float, method: str = 'select',
          slice_stem: bool = False) -> tuple[dict, dict[str, int]]:
    """The calibrated model's float64 form with its streams cut to `kept_widths` by `method`:
    the smaller form and the kept width of each stream. For a ResNet50 (every stream a scaled
    permutation, so 'rotate' is 'select') this is the whole pruned model:
    `baseline_family.apply(calibration.spec, form, images)` evaluates it (no width check)."""
    form, kept, _ = _prune(calibration, keep, method, slice_stem)
    return form, kept


def count_form_params(form: dict) -> int:
    """Weights and biases of an inference form (its BatchNorms folded in)."""
    return int(sum(np.size(x) for x in jax.tree.leaves(form)))


def count_params(variables: dict) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(variables['params'])))

