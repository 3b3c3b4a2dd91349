"""The baselines (`qhnet.models.baselines`: ResNet50, MobileNetV3Large): their hidden-channel
symmetries as a group spec, their inference form, its forward pass and the way back.

Inference form. Every conv (or Dense) with the BatchNorm after it folded in is one affine
layer x -> conv(x, W) + b, stored under the conv's module path as {'kernel': W, 'bias': b}
in the Flax layout (HWIO; a depthwise kernel is (k, k, 1, n)). With BN(x) = x s + t
(running statistics, `folding.batch_norm`) and the layer's own bias c (0 if it has none):

    W <- W s (output axis),   b = c s + t.

`apply` then computes, in eval mode (dropout off),

    ResNet50:   x = maxpool(relu(conv(images)))   (no max pool after the small stem)
                bottleneck: h1 = relu(conv_1(x)), h2 = relu(conv_2(h1)),
                            x = relu(shortcut(x) + conv_3(h2)),  shortcut = identity or conv
                logits = mean(x) W_head + b_head
    MobileNetV3Large:
                x = hswish(conv(images))
                inverted residual, act = relu or hswish (the block's):
                    e = act(expand(x))           (e = x when the block does not expand)
                    d = act(depthwise(e))
                    d = d * hsigmoid(fc2(relu(fc1(mean(d)))))     (squeeze-excite, if any)
                    x = project(d) (+ x when the output has x's shape: stride 1, same width)
                x = hswish(last_conv(x)); z = hswish(mean(x) W_fc1 + b_fc1); logits = fc2(z)

Streams (the format of `qhnet.symmetry.spec`): the layers writing a stream take W -> W T,
b -> b T ('out'), those reading it W -> T^-1 W ('in'), and a per-channel map on it (a
depthwise kernel, the squeeze-excite gate) follows T's permutation P only ('per_channel').
Its group is the meet of what every map on it admits (`groups.ADMITTED`):

- ResNet50 (relu everywhere): 'stem' (max pooling commutes with positive scalings and
  permutations), '<block>/hidden1' and '<block>/hidden2', and one residual stream per stage,
  named after the block whose projection shortcut starts it; identity shortcuts add x
  unchanged, so the blocks after it stay on it. All 'scaled_permutation'.
- MobileNetV3Large: '<block>/expanded' is the set after the expansion and, the same channels,
  after the depthwise conv: one T on both, so 'permutation' (hswish blocks) or
  'scaled_permutation' (relu blocks). This ties the scalings on the two sides of the
  depthwise conv, which could differ (its kernel can absorb D_1^-1 K D_2): a subgroup.
  '<block>/squeeze' (the SE's relu) is 'scaled_permutation'; the gate multiplies the
  expanded channels, so it takes P only. The projections' outputs have no activation and
  are read only by 1x1 convs: each is a 'GL' stream, named after the block that starts it,
  and the blocks that add their input (identity residuals) stay on it. 'stem' (hswish) is
  'permutation', and block1, which does not expand, reads it with its depthwise conv
  and adds its output to it. 'last_conv' and 'fc1' (hswish) are 'permutation'.

The spec has no `Hidden` entries: every hidden set is a stream. The layers, widths, strides,
BatchNorms, activations, shortcuts and squeeze-excites are traced off the model
(`structure.trace_baseline`); only what each block computes (the equations above) is
restated here. `unfold` writes a form back into the same model's variables, every BN as
x -> x + b. Forms and images are checked by the public functions (`families`), not here.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qhnet.symmetry import groups
from qhnet.symmetry.folding import (HIGHEST, Tap, batch_norm, bn_point, check_variables,
                                    compute_dtype, dense, identity_bn, no_tap, read)
from qhnet.symmetry.spec import Entry, GroupSpec, Stream
from qhnet.symmetry.structure import BaselineStructure, Bottleneck, Layer


def form_keys(structure: BaselineStructure) -> dict[str, tuple[str, ...]]:
    """The layers of the inference form, the stem first, and the arrays each holds."""
    return {layer.path: ('kernel', 'bias') for layer in structure.layers()}


# The spec.

def _reads(layer: Layer) -> list[Entry]:
    """The layer's input axis: W -> T^-1 W; a depthwise kernel follows T's permutation."""
    if layer.kind == 'depthwise':
        return [Entry((layer.path, 'kernel'), 3, 'per_channel')]
    return [Entry((layer.path, 'kernel'), 0 if layer.kind == 'dense' else 2, 'in')]


def _writes(layer: Layer) -> list[Entry]:
    """The layer's output axis: W -> W T, b -> b T (a depthwise kernel: see `_reads`)."""
    bias = [Entry((layer.path, 'bias'), 0, 'out')]
    if layer.kind == 'depthwise':
        return bias
    return [Entry((layer.path, 'kernel'), 1 if layer.kind == 'dense' else 3, 'out')] + bias


def _gate(layer: Layer) -> list[Entry]:
    """The squeeze-excite fc2: its outputs multiply the channels, so they follow P only."""
    return [Entry((layer.path, 'kernel'), 3, 'per_channel'),
            Entry((layer.path, 'bias'), 0, 'per_channel')]


def group_spec(structure: BaselineStructure, tie_identity_shortcuts: bool = False) -> GroupSpec:
    """The `GroupSpec` of a ResNet50 or MobileNetV3Large (module docstring). Identity shortcuts
    have no parameter and always tie their streams: `tie_identity_shortcuts` changes nothing."""
    streams = []

    def start(name, width, group, entries, blocks=()):
        streams.append(dict(name=name, width=width, group=group, blocks=list(blocks),
                            entries=list(entries)))
        return streams[-1]

    relu, hard_swish = groups.ADMITTED['relu'], groups.ADMITTED['hard_swish']
    resnet = structure.model == 'ResNet50'
    x = start('stem', structure.stem.n_out, relu if resnet else hard_swish,
              _writes(structure.stem))
    for block in structure.blocks:
        if isinstance(block, Bottleneck):
            first, middle, last = block.convs
            x['entries'] += _reads(first) + (_reads(block.shortcut) if block.shortcut else [])
            for i, (layer, reader) in enumerate(((first, middle), (middle, last)), 1):
                start(f'{block.name}/hidden{i}', layer.n_out, relu,
                      _writes(layer) + _reads(reader), [block.name])
            if block.shortcut:
                x = start(block.name, last.n_out, relu, _writes(block.shortcut))
            output = last
        else:
            admitted = groups.ADMITTED[block.activation]
            expanded = x
            if block.expand:
                x['entries'] += _reads(block.expand)
                expanded = start(f'{block.name}/expanded', block.expand.n_out, admitted,
                                 _writes(block.expand), [block.name])
            # The depthwise conv maps channel j to channel j: one T before and after it, a
            # permutation times a diagonal (no other T keeps the conv per channel).
            expanded['group'] = groups.meet(groups.meet(expanded['group'], admitted),
                                            'scaled_permutation')
            expanded['entries'] += _reads(block.depthwise) + _writes(block.depthwise)
            if block.squeeze:
                fc1, fc2 = block.squeeze
                expanded['entries'] += _reads(fc1) + _gate(fc2)
                start(f'{block.name}/squeeze', fc1.n_out, relu, _writes(fc1) + _reads(fc2),
                      [block.name])
            expanded['entries'] += _reads(block.project)
            if not block.residual:
                x = start(block.name, block.project.n_out, groups.ADMITTED['identity'], [])
            output = block.project
        x['blocks'].append(block.name)
        x['entries'] += _writes(output)
    for layer in structure.head[:-1]:  # MobileNet's last_conv and fc1, each followed by hswish
        x['entries'] += _reads(layer)
        x = start(layer.path, layer.n_out, hard_swish, _writes(layer))
    x['entries'] += _reads(structure.head[-1])
    return GroupSpec(
        structure=structure,
        streams=tuple(Stream(s['name'], s['width'], s['group'], tuple(s['blocks']),
                             tuple(s['entries'])) for s in streams),
        hidden=())


# Folding, the forward pass, and back to the Flax model.

def fold(spec: GroupSpec, variables, dtype=np.float32) -> dict:
    """The inference form {layer path: {'kernel': W s, 'bias': c s + t}} of a baseline's
    variables (module docstring), computed in float64 and cast to `dtype` once."""
    structure = spec.structure
    check_variables(structure, variables)
    form = {}
    for layer in structure.layers():
        path = layer.path.split('/')
        kernel = read(variables, 'params', *path, 'kernel')
        bias = (read(variables, 'params', *path, 'bias') if layer.own_bias
                else np.zeros(layer.n_out))
        if layer.bn:
            s, t = batch_norm(structure, variables, *layer.bn.split('/'))
            kernel, bias = kernel * s, bias * s + t
        form[layer.path] = {'kernel': kernel, 'bias': bias}
    return jax.tree_util.tree_map(lambda x: x.astype(dtype), form)


def _affine(layer: Layer, p: dict, x: jax.Array) -> jax.Array:
    if layer.kind == 'dense':
        return dense(x, p['kernel']) + p['bias']
    return jax.lax.conv_general_dilated(
        x, p['kernel'], window_strides=layer.stride, padding=layer.padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=x.shape[-1] if layer.kind == 'depthwise' else 1,
        precision=HIGHEST) + p['bias']


def apply(spec: GroupSpec, form: dict, images: jax.Array) -> jax.Array:
    """Logits of a baseline's inference form on NHWC `images`, computed in the form's dtype."""
    dtype = compute_dtype(form)
    return _forward(spec.structure, jax.tree_util.tree_map(jnp.asarray, form),
                    jnp.asarray(images, dtype))


def forward(structure: BaselineStructure, form: dict, x: jax.Array,
            tap: Tap = no_tap) -> jax.Array:
    """The equations of the module docstring: logits of a form of JAX arrays. `tap(point, x)`
    sees and may replace every value that a layer reads after a nonlinearity: each block's
    input ('<block>/input'), a ResNet50's hidden activations ('<block>/hidden1',
    '<block>/hidden2'), a MobileNetV3's expanded and squeezed channels ('<block>/expanded',
    '<block>/squeeze') and its depthwise output after the gate ('<block>/depthwise'), the last
    block's output ('output'), MobileNet's head activations ('last_conv', 'fc1') and the
    pooled features ('pooled'); and every value a BatchNorm wrote in the trained model,
    before its activation (`bn_layers`)."""

    def affine(layer, x):
        y = _affine(layer, form[layer.path], x)
        return tap(bn_point(layer.path), y) if layer.bn else y

    if structure.model == 'ResNet50':
        x = nn.relu(affine(structure.stem, x))
        if structure.stem_pool:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for block in structure.blocks:
            first, middle, last = block.convs
            x = tap(f'{block.name}/input', x)
            hidden = tap(f'{block.name}/hidden1', nn.relu(affine(first, x)))
            hidden = tap(f'{block.name}/hidden2', nn.relu(affine(middle, hidden)))
            x = nn.relu((affine(block.shortcut, x) if block.shortcut else x) + affine(last, hidden))
        pooled = tap('pooled', jnp.mean(tap('output', x), axis=(1, 2)))
        return affine(structure.head[0], pooled)
    x = nn.hard_swish(affine(structure.stem, x))
    for block in structure.blocks:
        x = tap(f'{block.name}/input', x)
        act = getattr(jax.nn, block.activation)
        expanded = (tap(f'{block.name}/expanded', act(affine(block.expand, x))) if block.expand
                    else x)
        expanded = act(affine(block.depthwise, expanded))
        if block.squeeze:
            fc1, fc2 = block.squeeze
            squeezed = tap(f'{block.name}/squeeze', nn.relu(
                affine(fc1, jnp.mean(expanded, axis=(1, 2), keepdims=True))))
            expanded = expanded * nn.hard_sigmoid(affine(fc2, squeezed))
        y = affine(block.project, tap(f'{block.name}/depthwise', expanded))
        x = x + y if block.residual else y
    last_conv, fc1, fc2 = structure.head
    x = tap(last_conv.path, nn.hard_swish(affine(last_conv, tap('output', x))))
    x = tap('pooled', jnp.mean(x, axis=(1, 2)))
    return affine(fc2, tap(fc1.path, nn.hard_swish(affine(fc1, x))))


def bn_layers(structure: BaselineStructure) -> dict[str, tuple[list[tuple[str, str, int]],
                                                                 tuple]]:
    """{BN point: ([(layer, 'kernel', output axis)], (layer, 'bias'))}: the arrays that a
    per-channel affine correction of the value at the point rescales, for every layer that
    had a BatchNorm."""
    return {bn_point(layer.path): ([(layer.path, 'kernel', -1)], (layer.path, 'bias'))
            for layer in structure.layers() if layer.bn}


_forward = jax.jit(forward, static_argnums=0)


def _put(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split('/')
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def unfold(spec: GroupSpec, form: dict, dtype=np.float32) -> dict:
    """Variables of the same Flax model that compute the form's function: each layer's kernel
    (and own bias) from the form, its BatchNorm x -> x + b (scale 1, mean 0, var 1 - eps)."""
    structure = spec.structure
    params, stats = {}, {}
    for layer in structure.layers():
        p = form[layer.path]
        if layer.bn:
            _put(params, layer.path, {'kernel': p['kernel']})
            bn_params, bn_stats = identity_bn(structure, layer.bn, p['bias'])
            _put(params, layer.bn, bn_params)
            _put(stats, layer.bn, bn_stats)
        else:
            _put(params, layer.path, {'kernel': p['kernel'], 'bias': p['bias']})
    variables = {'params': params, 'batch_stats': stats}
    return jax.tree_util.tree_map(lambda x: np.asarray(x, dtype), variables)
