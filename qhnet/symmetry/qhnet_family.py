"""QHNet: its group spec, its inference form, the form's forward pass and the way back to the
Flax model (docs/design.md, 'Streams and groups' and 'The fold').

Streams. The stem's ReLU starts stream 'stem'; at @ds it holds all of stage 1, which
carries no activation. Every block that carries the activation (and any block whose shortcut
is a projection) starts a new stream, named after it; other blocks read and write the stream
they are on. A stream's group is the one its starting activation admits (`groups.ADMITTED`).
The last block carries the activation (at @ds too), so the last stream starts there and ends
at the head: global average pooling commutes with T and the head, a linear map, absorbs T^-1.
With weight sharing, Eq. (4) has no E, and K(u T) = K(u) (T (x) I_m) moves T through K onto
the rows of A and the derivative bias d: entries with `repeat` m.

Where a block reads one stream and writes another, its shortcut S becomes T_in^-1 S T_out:
the inference form keeps S explicit, so this is exact. The Flax model has no parameter
for an identity shortcut, so `tie_identity_shortcuts=True` merges the two streams across
every such block instead (one T for both, their groups' intersection); elements sampled
from that spec can be written back into the Flax model (`unfold`).

Hidden channels (per block, `Hidden`): the channels of the elementwise product can be
permuted and rescaled, by a permutation `perm` of the `size` channels that the
product is built from (with weight sharing a permutation must keep each derivative index
k: it moves channel (j, k) to (perm(j), k)) and nonzero scales `scale` of the
`scale_size` product channels, one factor up (power +1) and the next map down (power -1).

Inference form: every BatchNorm folded into its neighbours, with BN(x) = x s + t
(`folding.batch_norm`). Channels are row vectors (NHWC), so a 1x1 conv or Dense is
u -> u W with W: (in, out). `sub(u)` is u[:, ::stride, ::stride] (a strided 1x1 conv), K_s
the depthwise 3x3 conv with the block's stride. After folding, the blocks read

    Eq. (3): q(u) = [ (sub(u) C) * (K_s(u E) + d) ] A + a
    Eq. (4): q(u) = [ (sub(u) C) * ((K_s(u E) + d) A) ] E_out + a    (E: only without sharing)
    Eq. (5): q(u) = sum_groups[ (sub(u) C) * (K_s(u E) + d) ] E_out + a
    Eq. (6): q(u) = K_s((u E) * (u C)) A + a
    Eq. (7): q(u) = K_s((u C + c) * repeat_m(u E)) A + a
    QLNet:   q(u) = K_s((u C + c) * (u D + e)) A + a
    y = act(sub(u) S + b + q(u))

with keys coef = C, coef_bias = c, factor = D, factor_bias = e, derivative = K,
derivative_bias = d, mix_in = E, combine = A, mix_out = E_out, out_bias = a, shortcut = S,
shortcut_bias = b. QLNet's C and D are the two halves of its first 1x1 conv, whose product
channel j is (u C + c)_j (u D + e)_j; its hidden scale multiplies C's column j (and c_j) and
divides D's. The folds:

- BN_d followed by a product (Eqs. 3, 5):
  (sub(u) C) * (K u s_d + t_d) = (sub(u) C s_d) * (K u + t_d / s_d),
  so C <- C diag(s_d), d = t_d / s_d (this needs s_d != 0; a zero scale is refused).
- BN_d followed by A (Eq. 4): (K u s_d + t_d) A = (K u + t_d / s_d) diag(s_d) A,
  so A <- diag(s_d) A, d = t_d / s_d.
  (Eqs. 6, 7, QLNet): A <- diag(s_d) A diag(s_o), a = t_d A diag(s_o) + t_o, no division.
- BN_c into the coefficient map (Eq. 7): C <- C diag(s_c), c = t_c; (QLNet) the same for
  each half of the first 1x1 conv and of BN_c: C, c from the first w channels, D, e from the rest.
- BN_o into the last linear map: A <- A diag(s_o) (Eqs. 3, 6, 7), E_out <- E_out diag(s_o)
  (Eqs. 4, 5), a = t_o.
- A projection shortcut BN(sub(u) W): S = W diag(s), b = t; the identity shortcut: S = I, b = 0.
- The stem BN into the stem conv: kernel <- kernel * s (output axis), bias = t.
- Mixing maps E, E_out are explicit always: the Flax model's `mix_in`/`mix_out`, or the identity.
  In Eqs. (3)-(6) the coefficient factor needs no bias: no BN follows C there.

Folding runs in float64 in numpy (exact enough to match the Flax model to 1e-10 in
float64) and casts the result to `dtype` once. `apply` is the pure forward pass of a form;
`unfold` writes a form back as variables of the Flax model with `mixing=True`. Forms and
images are checked by the public functions (`families`), not here.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qhnet.models import activations
from qhnet.models.derivative import depthwise_conv, per_channel_kernel
from qhnet.symmetry import groups
from qhnet.symmetry.folding import (HIGHEST, Tap, batch_norm, bn_point, check_variables,
                                    compute_dtype, dense, identity_bn, no_tap, read)
from qhnet.symmetry.spec import Entry, GroupSpec, Hidden, HiddenEntry, Stream
from qhnet.symmetry.structure import Block, Structure


def uses_mix_in(structure: Structure) -> bool:
    """Eq. (4) with weight sharing needs no E: K commutes with channel mixing (docs/design.md)."""
    return structure.equation != 'qlnet' and not (structure.equation == 4
                                                  and structure.weight_sharing)


def block_keys(structure: Structure) -> tuple[str, ...]:
    """The arrays of one block's inference form."""
    keys = {3: ('coef', 'derivative', 'derivative_bias', 'mix_in', 'combine', 'out_bias'),
            4: ('coef', 'derivative', 'derivative_bias', 'mix_in', 'combine', 'mix_out',
                'out_bias'),
            5: ('coef', 'derivative', 'derivative_bias', 'mix_in', 'mix_out', 'out_bias'),
            6: ('coef', 'mix_in', 'derivative', 'combine', 'out_bias'),
            7: ('coef', 'coef_bias', 'mix_in', 'derivative', 'combine', 'out_bias'),
            'qlnet': ('coef', 'coef_bias', 'factor', 'factor_bias', 'derivative', 'combine',
                      'out_bias')}[structure.equation]
    if not uses_mix_in(structure):
        keys = tuple(k for k in keys if k != 'mix_in')
    return keys + ('shortcut', 'shortcut_bias')


def form_keys(structure: Structure) -> dict[str, tuple[str, ...]]:
    """The layers of the inference form, the stem first, and the arrays each holds."""
    return {'stem': ('kernel', 'bias'), **{b.name: block_keys(structure) for b in structure.blocks},
            'head': ('kernel', 'bias')}


# The spec.

def _stream_entries(structure: Structure, block: Block) -> tuple[list[Entry], list[Entry]]:
    """(entries on the block's input stream, entries on its output stream), from its equation."""
    name, eq = block.name, structure.equation
    reads = [Entry((name, 'coef'), 0, 'in'), Entry((name, 'shortcut'), 0, 'in')]
    if eq == 'qlnet':
        reads.append(Entry((name, 'factor'), 0, 'in'))
    elif uses_mix_in(structure):
        reads.append(Entry((name, 'mix_in'), 0, 'in'))
    else:  # Eq. (4) with weight sharing: K(u T) = K(u) (T (x) I_m)
        m = structure.multiplier
        reads += [Entry((name, 'combine'), 0, 'in', m),
                  Entry((name, 'derivative_bias'), 0, 'out', m)]
    last = 'mix_out' if eq in (4, 5) else 'combine'
    writes = [Entry((name, last), 1, 'out'), Entry((name, 'out_bias'), 0, 'out'),
              Entry((name, 'shortcut'), 1, 'out'), Entry((name, 'shortcut_bias'), 0, 'out')]
    return reads, writes


def _hidden(structure: Structure, block: Block) -> Hidden:
    """The permutations and scalings of one block's product channels (module docstring)."""
    name, eq, n, m = block.name, structure.equation, block.hidden, structure.multiplier
    if eq == 4:  # q = [ (C u) * ((K u + d) A) ] E_out: product channel i is column i of C and A
        return Hidden(name, block.n_out, block.n_out, (
            HiddenEntry((name, 'coef'), 1, 1), HiddenEntry((name, 'combine'), 1, -1),
            HiddenEntry((name, 'mix_out'), 0, 0)))
    if eq == 'qlnet':  # product channel j = (u C + c)_j (u D + e)_j: C up, D down
        return Hidden(name, n, n, (
            HiddenEntry((name, 'coef'), 1, 1), HiddenEntry((name, 'coef_bias'), 0, 1),
            HiddenEntry((name, 'factor'), 1, -1), HiddenEntry((name, 'factor_bias'), 0, -1),
            HiddenEntry((name, 'derivative'), 3, 0), HiddenEntry((name, 'combine'), 0, 0)))
    # Eqs. 3, 5, 6, 7: perm acts on the n channels j fed to the product with the derivative.
    entries = [HiddenEntry((name, 'mix_in'), 1, 0), HiddenEntry((name, 'coef'), 1, 1)]
    if not structure.weight_sharing:
        entries.append(HiddenEntry((name, 'derivative'), 3, 0))
    if eq in (3, 5):
        entries.append(HiddenEntry((name, 'derivative_bias'), 0, 0))
    if eq == 7:
        entries.append(HiddenEntry((name, 'coef_bias'), 0, 1))
    entries.append(HiddenEntry((name, 'mix_out' if eq == 5 else 'combine'), 0, -1))
    scale_size = {3: m * n, 5: block.n_out, 6: n, 7: m * n}[eq]
    return Hidden(name, n, scale_size, tuple(entries))


def group_spec(structure: Structure, tie_identity_shortcuts: bool = False) -> GroupSpec:
    """The `GroupSpec` of a QHNet: its streams and its blocks' hidden symmetries (module
    docstring)."""
    width = structure.blocks[0].n_in
    streams = [dict(name='stem', width=width, group=groups.ADMITTED['relu'], blocks=[], entries=[
        Entry(('stem', 'kernel'), 3, 'out'), Entry(('stem', 'bias'), 0, 'out')])]
    for block in structure.blocks:
        reads, writes = _stream_entries(structure, block)
        streams[-1]['entries'] += reads
        if block.carries_activation or block.projection:
            admitted = groups.ADMITTED[block.activation]
            if tie_identity_shortcuts and not block.projection:
                streams[-1]['group'] = groups.meet(streams[-1]['group'], admitted)
            else:
                streams.append(dict(name=block.name, width=block.n_out, group=admitted, blocks=[],
                                    entries=[]))
        streams[-1]['blocks'].append(block.name)
        streams[-1]['entries'] += writes
    streams[-1]['entries'].append(Entry(('head', 'kernel'), 0, 'in'))
    return GroupSpec(
        structure=structure,
        streams=tuple(Stream(s['name'], s['width'], s['group'], tuple(s['blocks']),
                             tuple(s['entries'])) for s in streams),
        hidden=tuple(_hidden(structure, block) for block in structure.blocks))


# Folding.

def _derivative_bias(block: Block, s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """d = t / s, for the fold (C u) * (K u s + t) = (C u s) * (K u + t / s)."""
    zero = np.flatnonzero(s == 0)
    if zero.size:
        raise ValueError(
            f'{block.name}/derivative_bn has scale 0 in channels {zero.tolist()}: folding BN_d '
            'into the product, (Cu) * (s Ku + t) = (s Cu) * (Ku + t/s), needs s != 0. Set those '
            'BN scales to a tiny nonzero value (the function changes by at most that much) and '
            'fold again')
    return t / s


def _fold_block(structure: Structure, variables, block: Block) -> dict[str, np.ndarray]:
    name, eq, n, n_out = block.name, structure.equation, block.n_in, block.n_out

    def matrix(key):  # a 1x1 conv or Dense kernel as an (in, out) matrix
        kernel = read(variables, 'params', name, key, 'kernel')
        return kernel.reshape(kernel.shape[-2:])

    def mixing(key, size):  # the Flax model's mixing map, or the identity when it has none
        return matrix(key) if structure.mixing else np.eye(size)

    s_d, t_d = batch_norm(structure, variables, name, 'derivative_bn')
    s_o, t_o = batch_norm(structure, variables, name, 'out_bn')
    form = {'coef': matrix('coef'),
            'derivative': read(variables, 'params', name, 'derivative', 'kernel')}
    if uses_mix_in(structure):
        form['mix_in'] = mixing('mix_in', n)
    if eq in (3, 5):
        form['coef'] = form['coef'] * s_d
        form['derivative_bias'] = _derivative_bias(block, s_d, t_d)
    if eq == 3:
        form['combine'] = matrix('combine') * s_o
    if eq == 4:
        form['derivative_bias'] = _derivative_bias(block, s_d, t_d)
        form['combine'] = s_d[:, None] * matrix('combine')
    if eq in (4, 5):
        form['mix_out'] = mixing('mix_out', n_out) * s_o
    if eq in (7, 'qlnet'):
        s_c, t_c = batch_norm(structure, variables, name, 'coef_bn')
        form['coef'], form['coef_bias'] = form['coef'] * s_c, t_c
    if eq == 'qlnet':  # the two halves of the first 1x1 conv and of BN_c
        w = block.hidden
        form['coef'], form['factor'] = form['coef'][:, :w], form['coef'][:, w:]
        form['coef_bias'], form['factor_bias'] = form['coef_bias'][:w], form['coef_bias'][w:]
    if eq in (6, 7, 'qlnet'):
        combine = matrix('combine')
        form['combine'] = s_d[:, None] * combine * s_o
        form['out_bias'] = (t_d @ combine) * s_o + t_o
    else:
        form['out_bias'] = t_o
    if block.projection:
        s, t = batch_norm(structure, variables, name, 'shortcut_bn')
        form['shortcut'], form['shortcut_bias'] = matrix('shortcut') * s, t
    else:
        form['shortcut'], form['shortcut_bias'] = np.eye(n), np.zeros(n)
    return {key: form[key] for key in block_keys(structure)}


def fold(spec: GroupSpec, variables, dtype=np.float32) -> dict:
    """The inference form (nested dicts of numpy arrays of `dtype`) of a QHNet's variables."""
    structure = spec.structure
    check_variables(structure, variables)
    s, t = batch_norm(structure, variables, 'stem_bn')
    form = {'stem': {'kernel': read(variables, 'params', 'stem_conv', 'kernel') * s, 'bias': t}}
    for block in structure.blocks:
        form[block.name] = _fold_block(structure, variables, block)
    form['head'] = {'kernel': read(variables, 'params', 'head', 'kernel'),
                    'bias': read(variables, 'params', 'head', 'bias')}
    return jax.tree_util.tree_map(lambda x: x.astype(dtype), form)


# The pure forward pass.

def _block_update(structure: Structure, block: Block, p: dict, u: jax.Array,
                  tap: Tap = no_tap) -> jax.Array:
    """q(u) from the block's inference form (module docstring); `tap` sees the elementwise
    product as '<block>/product'."""
    m, stride, eq = structure.multiplier, block.stride, structure.equation
    sub = u[:, ::stride, ::stride]

    def derivative(x):  # K_s: expand n -> nm channels, or (Eq. 7) one kernel per channel
        outputs = x.shape[-1] * (1 if eq == 7 else m)
        return depthwise_conv(x, per_channel_kernel(p['derivative'], outputs), stride,
                              impl='grouped')

    if eq == 4:
        stream = dense(u, p['mix_in']) if 'mix_in' in p else u
        factor = dense(derivative(stream) + p['derivative_bias'], p['combine'])
        product = tap(f'{block.name}/product', dense(sub, p['coef']) * factor)
        return dense(product, p['mix_out']) + p['out_bias']
    if eq in (3, 5):
        derivatives = derivative(dense(u, p['mix_in'])) + p['derivative_bias']
        product = tap(f'{block.name}/product', dense(sub, p['coef']) * derivatives)
        if eq == 3:
            return dense(product, p['combine']) + p['out_bias']
        sums, pixels = block.n_out // block.n_in, product.shape[:-1]  # per input channel
        summed = product.reshape(*pixels, block.n_in, sums, m // sums).sum(axis=-1)
        return dense(summed.reshape(*pixels, block.n_out), p['mix_out']) + p['out_bias']
    if eq == 6:
        product = dense(u, p['mix_in']) * dense(u, p['coef'])
    elif eq == 'qlnet':
        product = (dense(u, p['coef']) + p['coef_bias']) * (dense(u, p['factor'])
                                                            + p['factor_bias'])
    else:
        product = (dense(u, p['coef']) + p['coef_bias']) * jnp.repeat(dense(u, p['mix_in']), m,
                                                                      axis=-1)
    product = tap(f'{block.name}/product', product)
    return dense(derivative(product), p['combine']) + p['out_bias']


def forward(structure: Structure, form: dict, images: jax.Array, tap: Tap = no_tap) -> jax.Array:
    """The last block's output (before pooling) of a form of JAX arrays on `images` (in the
    dtype to compute in). `tap(point, x)` sees, and may replace, every value that a linear map
    reads after a nonlinearity: the input of each block ('<block>/input'), its product
    ('<block>/product') and the last block's output ('output'). A stream is read as the inputs
    of its blocks and, for the last one, the output. It also sees the values a BatchNorm wrote
    in the trained model (`bn_layers`): the stem's, each block's update and projection."""
    x = jax.lax.conv_general_dilated(
        images, form['stem']['kernel'], window_strides=structure.stem_stride,
        padding=structure.stem_padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        precision=HIGHEST)
    x = nn.relu(tap(bn_point('stem'), x + form['stem']['bias']))
    if structure.stem_pool:
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for block in structure.blocks:
        x = tap(f'{block.name}/input', x)
        p = form[block.name]
        shortcut = dense(x[:, ::block.stride, ::block.stride], p['shortcut']) + p['shortcut_bias']
        if block.projection:
            shortcut = tap(bn_point(f'{block.name}/shortcut'), shortcut)
        update = tap(bn_point(f'{block.name}/update'), _block_update(structure, block, p, x, tap))
        x = activations.get(block.activation, block.radius)(shortcut + update)
    return tap('output', x)


def bn_layers(structure: Structure) -> dict[str, tuple[list[tuple[str, str, int]], tuple]]:
    """{BN point: ([(layer, key, axis) of the maps that write it], (layer, bias key))}: the
    arrays that a per-channel affine correction x -> x s + t of the value at the point
    rescales (`folding.bn_point`): the stem, each block's update q(u) and projection."""
    last = 'mix_out' if structure.equation in (4, 5) else 'combine'
    layers = {bn_point('stem'): ([('stem', 'kernel', 3)], ('stem', 'bias'))}
    for block in structure.blocks:
        if block.projection:
            layers[bn_point(f'{block.name}/shortcut')] = (
                [(block.name, 'shortcut', 1)], (block.name, 'shortcut_bias'))
        layers[bn_point(f'{block.name}/update')] = ([(block.name, last, 1)],
                                                    (block.name, 'out_bias'))
    return layers


def logits(structure: Structure, form: dict, images: jax.Array, tap: Tap = no_tap) -> jax.Array:
    """The head on the pooled last output (`forward`); `tap` also sees the pooled features
    ('pooled')."""
    pooled = tap('pooled', jnp.mean(forward(structure, form, images, tap), axis=(1, 2)))
    return dense(pooled, form['head']['kernel']) + form['head']['bias']


def apply(spec: GroupSpec, form: dict, images: jax.Array) -> jax.Array:
    """Logits of a QHNet's inference form on NHWC `images`, computed in the form's dtype."""
    dtype = compute_dtype(form)
    form = jax.tree_util.tree_map(jnp.asarray, form)
    return logits(spec.structure, form, jnp.asarray(images, dtype))


# Back to the Flax model.

def unfold(spec: GroupSpec, form: dict, dtype=np.float32) -> dict:
    """Variables of the Flax model with `mixing=True` that compute the form's function.

    Every BN becomes x -> x + bias (scale 1, mean 0, var 1 - eps). The Flax model has no
    parameter for an identity shortcut, so a form whose identity-shortcut blocks hold a
    map other than the identity (an element that changes basis across such a block) is
    refused; sample from `group_spec(model, tie_identity_shortcuts=True)` to avoid them.
    """
    structure = spec.structure

    def conv(w):
        return w.reshape(1, 1, *w.shape)

    params, stats = {}, {}
    params['stem_conv'] = {'kernel': form['stem']['kernel']}
    params['stem_bn'], stats['stem_bn'] = identity_bn(structure, 'stem_bn', form['stem']['bias'])
    for block in structure.blocks:
        p, name = form[block.name], block.name
        bn_d = p['derivative_bias'] if 'derivative_bias' in p else np.zeros(p['combine'].shape[0])
        bp, bs = {}, {}
        coef, coef_bias = p['coef'], p.get('coef_bias')
        if 'factor' in p:  # QLNet: both halves in one 1x1 conv and one BN_c
            coef = np.concatenate([coef, p['factor']], axis=1)
            coef_bias = np.concatenate([coef_bias, p['factor_bias']])
        bp['coef'] = {'kernel': conv(coef)}
        if coef_bias is not None:
            bp['coef_bn'], bs['coef_bn'] = identity_bn(structure, f'{name}/coef_bn', coef_bias)
        bp['derivative'] = {'kernel': p['derivative']}
        bp['derivative_bn'], bs['derivative_bn'] = identity_bn(
            structure, f'{name}/derivative_bn', bn_d)
        for key in ('mix_in', 'mix_out'):
            if key in p:
                bp[key] = {'kernel': p[key]}
        if 'combine' in p:
            bp['combine'] = {'kernel': conv(p['combine'])}
        bp['out_bn'], bs['out_bn'] = identity_bn(structure, f'{name}/out_bn', p['out_bias'])
        if block.projection:
            bp['shortcut'] = {'kernel': conv(p['shortcut'])}
            bp['shortcut_bn'], bs['shortcut_bn'] = identity_bn(
                structure, f'{name}/shortcut_bn', p['shortcut_bias'])
        else:
            deviation = max(np.abs(p['shortcut'] - np.eye(block.n_in)).max(),
                            np.abs(p['shortcut_bias']).max())
            if deviation > 1e-6:
                raise ValueError(
                    f'{name} has a parameter-free identity shortcut in the Flax model, but the '
                    f'form holds a different map there (max deviation {deviation:.2e}): the group '
                    'element changes basis across this block. Sample from group_spec(model, '
                    'tie_identity_shortcuts=True) to keep such shortcuts the identity')
        params[name], stats[name] = bp, bs
    params['head'] = dict(form['head'])
    variables = {'params': params, 'batch_stats': stats}
    return jax.tree_util.tree_map(lambda x: np.asarray(x, dtype), variables)
