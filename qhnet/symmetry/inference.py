"""The inference form of a QHNet: every BatchNorm folded into its neighbours (docs/design.md,
'The fold').

A BatchNorm with running statistics is the affine map BN(x) = x s + t, per channel, with

    s = gamma / sqrt(var + eps),   t = beta - mean * s        (RepVGG's fold).

Channels are row vectors (NHWC), so a 1x1 conv or Dense is u -> u W with W: (in, out).
`sub(u)` is u[:, ::stride, ::stride] (a strided 1x1 conv), K_s the depthwise 3x3 conv with
the block's stride. After folding, the blocks read

    Eq. (3): q(u) = [ (sub(u) C) * (K_s(u E) + d) ] A + a
    Eq. (4): q(u) = [ (sub(u) C) * ((K_s(u E) + d) A) ] E_out + a    (E: only without sharing)
    Eq. (5): q(u) = sum_groups[ (sub(u) C) * (K_s(u E) + d) ] E_out + a
    Eq. (6): q(u) = K_s((u E) * (u C)) A + a
    Eq. (7): q(u) = K_s((u C + c) * repeat_m(u E)) A + a
    y = act(sub(u) S + b + q(u))

with keys coef = C, coef_bias = c, derivative = K, derivative_bias = d, mix_in = E, combine = A,
mix_out = E_out, out_bias = a, shortcut = S, shortcut_bias = b. The folds:

- BN_d followed by a product (Eqs. 3, 5):
  (sub(u) C) * (K u s_d + t_d) = (sub(u) C s_d) * (K u + t_d / s_d),
  so C <- C diag(s_d), d = t_d / s_d (this needs s_d != 0; a zero scale is refused).
- BN_d followed by A (Eq. 4): (K u s_d + t_d) A = (K u + t_d / s_d) diag(s_d) A,
  so A <- diag(s_d) A, d = t_d / s_d.
  (Eqs. 6, 7): A <- diag(s_d) A diag(s_o), a = t_d A diag(s_o) + t_o, no division.
- BN_c into the coefficient map (Eq. 7): C <- C diag(s_c), c = t_c.
- BN_o into the last linear map: A <- A diag(s_o) (Eqs. 3, 6, 7), E_out <- E_out diag(s_o)
  (Eqs. 4, 5), a = t_o.
- A projection shortcut BN(sub(u) W): S = W diag(s), b = t; the identity shortcut: S = I, b = 0.
- The stem BN into the stem conv: kernel <- kernel * s (output axis), bias = t.
- Mixing maps E, E_out are explicit always: the Flax model's `mix_in`/`mix_out`, or the identity.
  In Eqs. (3)-(6) the coefficient factor needs no bias: no BN follows C there.

Folding runs in float64 in numpy (exact enough to match the Flax model to 1e-10 in
float64) and casts the result to `dtype` once. `apply` is the pure forward pass of a form;
`unfold` writes a form back as variables of the Flax model with `mixing=True`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qhnet import activations
from qhnet.derivative import depthwise_conv, per_channel_kernel
from qhnet.symmetry.structure import Block, Structure

HIGHEST = jax.lax.Precision.HIGHEST


def uses_mix_in(structure: Structure) -> bool:
    """Eq. (4) with weight sharing needs no E: K commutes with channel mixing (docs/design.md)."""
    return not (structure.equation == 4 and structure.weight_sharing)


def block_keys(structure: Structure) -> tuple[str, ...]:
    """The arrays of one block's inference form."""
    keys = {3: ('coef', 'derivative', 'derivative_bias', 'mix_in', 'combine', 'out_bias'),
            4: ('coef', 'derivative', 'derivative_bias', 'mix_in', 'combine', 'mix_out',
                'out_bias'),
            5: ('coef', 'derivative', 'derivative_bias', 'mix_in', 'mix_out', 'out_bias'),
            6: ('coef', 'mix_in', 'derivative', 'combine', 'out_bias'),
            7: ('coef', 'coef_bias', 'mix_in', 'derivative', 'combine', 'out_bias')}[
                structure.equation]
    if not uses_mix_in(structure):
        keys = tuple(k for k in keys if k != 'mix_in')
    return keys + ('shortcut', 'shortcut_bias')


# Folding.

def read(tree, *path: str) -> np.ndarray:
    for key in path:
        tree = tree[key]
    return np.asarray(tree, dtype=np.float64)


def batch_norm(structure: Structure, variables, *path: str) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) with BN(x) = x s + t in eval mode."""
    gamma = read(variables, 'params', *path, 'scale')
    beta = read(variables, 'params', *path, 'bias')
    mean = read(variables, 'batch_stats', *path, 'mean')
    var = read(variables, 'batch_stats', *path, 'var')
    s = gamma / np.sqrt(var + structure.epsilon('/'.join(path)))
    return s, beta - mean * s


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
    if eq == 7:
        s_c, t_c = batch_norm(structure, variables, name, 'coef_bn')
        form['coef'], form['coef_bias'] = form['coef'] * s_c, t_c
    if eq in (6, 7):
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


def _names(items: list[str], limit: int = 6) -> str:
    more = f' and {len(items) - limit} more' if len(items) > limit else ''
    return ', '.join(items[:limit]) + more


def leaves(tree) -> list[tuple[str, object]]:
    """[('params/stem_conv/kernel', leaf), ...] for every leaf of a nested dict of arrays."""
    return [('/'.join(str(getattr(key, 'key', key)) for key in path), leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _brief(paths: set[str], other: set[str]) -> list[str]:
    """`paths`, a layer that `other` has nothing of by the layer's name ('params/stage1_block2'),
    any other path in full."""
    other_layers = {'/'.join(path.split('/')[:2]) for path in other}
    names = []
    for path in sorted(paths):
        layer = '/'.join(path.split('/')[:2])
        name = path if layer in other_layers else layer
        if name not in names:
            names.append(name)
    return names


def check_variables(structure, variables) -> None:
    """Exactly the variables the model has (`structure.variable_shapes`), with its shapes: a
    ValueError names the arrays or layers (blocks) that are missing, extra or misshapen."""
    expected = dict(structure.variable_shapes)
    got = {name: tuple(np.shape(leaf)) for name, leaf in leaves(variables)}
    problems = []
    missing, extra = set(expected) - set(got), set(got) - set(expected)
    if missing:
        problems.append(f'missing {_names(_brief(missing, set(got)))}')
    if extra:
        problems.append(f'extra {_names(_brief(extra, set(expected)))}, which the model has not')
    for path in sorted(set(expected) & set(got)):
        shape, need = got[path], expected[path]
        if len(shape) != len(need) or any(n is not None and n != s for n, s in zip(need, shape)):
            problems.append(f'{path} has shape {shape}, the model needs {need}')
    if problems:
        raise ValueError(f'the variables do not match the model: {"; ".join(problems[:3])}; '
                         'fold them with the spec of the model they were initialised or trained '
                         'with, group_spec(that model)')


def form_keys(structure) -> dict[str, tuple[str, ...]]:
    """The layers of the model's inference form, the stem first, and the arrays each holds."""
    if not isinstance(structure, Structure):
        from qhnet.symmetry import baselines  # it builds on this module
        return {layer.path: ('kernel', 'bias') for layer in baselines.layers(structure)}
    return {'stem': ('kernel', 'bias'), **{b.name: block_keys(structure) for b in structure.blocks},
            'head': ('kernel', 'bias')}


def _difference(name: str, wanted, held) -> str | None:
    """'<name> lacks a, b and has c, which the spec's model has not', or None if they agree."""
    lacks, extra = [k for k in wanted if k not in held], [k for k in held if k not in wanted]
    parts = ([f'lacks {_names(lacks)}'] if lacks else []) + (
        [f'has {_names(extra)}, which the spec\'s model has not'] if extra else [])
    return f'{name} {" and ".join(parts)}' if parts else None


def _form_mismatch(spec, form) -> str | None:
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


def check_form(spec, form) -> None:
    """That `form` is an inference form of `spec`'s model: the same layers, the arrays of each
    (`form_keys`), and on every axis a stream acts on, the stream's width. A ValueError names
    the first mismatch."""
    problem = _form_mismatch(spec, form)
    if problem:
        raise ValueError(f'the form does not match the spec: {problem}; fold the variables '
                         "with this model's spec: form = fold(spec, variables)")


def check_images(spec, form, images) -> None:
    """That `images` is a batch of at least one NHWC image with the channels the form's stem
    kernel reads (any height and width)."""
    kernel = np.shape(form[next(iter(form_keys(spec.structure)))]['kernel'])
    shape, channels = tuple(np.shape(images)), kernel[2]
    if len(shape) != 4 or 0 in shape or shape[-1] != channels:
        raise ValueError(f'images must be an NHWC batch of shape (N, H, W, {channels}) with '
                         f'N, H, W >= 1 and {channels} the input channels of the stem kernel '
                         f'{kernel}; got shape {shape}')


def fold(spec, variables, dtype=np.float32) -> dict:
    """The inference form (nested dicts of numpy arrays of `dtype`) of a QHNet's variables.

    `spec` = `group_spec(model)`; `variables` = {'params', 'batch_stats'} as `model.init` or
    training returns them. A baseline's spec folds by `qhnet.symmetry.baselines.fold`.
    """
    structure = spec.structure
    if not isinstance(structure, Structure):
        from qhnet.symmetry import baselines  # it builds on this module
        return baselines.fold(spec, variables, dtype)
    check_variables(structure, variables)
    s, t = batch_norm(structure, variables, 'stem_bn')
    form = {'stem': {'kernel': read(variables, 'params', 'stem_conv', 'kernel') * s, 'bias': t}}
    for block in structure.blocks:
        form[block.name] = _fold_block(structure, variables, block)
    form['head'] = {'kernel': read(variables, 'params', 'head', 'kernel'),
                    'bias': read(variables, 'params', 'head', 'bias')}
    return jax.tree_util.tree_map(lambda x: x.astype(dtype), form)


# The pure forward pass.

def form_dtype(form) -> np.dtype:
    """The floating dtype of a form (all its arrays share it)."""
    dtypes = {np.dtype(x.dtype) for x in jax.tree_util.tree_leaves(form)}
    if len(dtypes) != 1:
        raise ValueError(f'a form holds arrays of one dtype; got {sorted(map(str, dtypes))}')
    return dtypes.pop()


def compute_dtype(form) -> np.dtype:
    """The dtype `apply` computes a form in: its own (float64 needs 64-bit JAX)."""
    dtype = form_dtype(form)
    if dtype == np.float64 and not jax.config.jax_enable_x64:
        raise ValueError('a float64 form needs 64-bit JAX: run inside `with jax.enable_x64(True):` '
                         "or set jax.config.update('jax_enable_x64', True)")
    return dtype


def _dense(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.dot(x, w, precision=HIGHEST)


def _block_update(structure: Structure, block: Block, p: dict, u: jax.Array) -> jax.Array:
    """q(u) from the block's inference form (module docstring)."""
    m, stride, eq = structure.multiplier, block.stride, structure.equation
    sub = u[:, ::stride, ::stride]

    def derivative(x):  # K_s: expand n -> nm channels, or (Eq. 7) one kernel per channel
        outputs = x.shape[-1] * (1 if eq == 7 else m)
        return depthwise_conv(x, per_channel_kernel(p['derivative'], outputs), stride, impl='grouped')

    if eq == 4:
        stream = _dense(u, p['mix_in']) if 'mix_in' in p else u
        factor = _dense(derivative(stream) + p['derivative_bias'], p['combine'])
        return _dense(_dense(sub, p['coef']) * factor, p['mix_out']) + p['out_bias']
    if eq in (3, 5):
        derivatives = derivative(_dense(u, p['mix_in'])) + p['derivative_bias']
        product = _dense(sub, p['coef']) * derivatives
        if eq == 3:
            return _dense(product, p['combine']) + p['out_bias']
        groups, pixels = block.n_out // block.n_in, product.shape[:-1]
        summed = product.reshape(*pixels, block.n_in, groups, m // groups).sum(axis=-1)
        return _dense(summed.reshape(*pixels, block.n_out), p['mix_out']) + p['out_bias']
    if eq == 6:
        product = _dense(u, p['mix_in']) * _dense(u, p['coef'])
    else:
        product = (_dense(u, p['coef']) + p['coef_bias']) * jnp.repeat(_dense(u, p['mix_in']), m,
                                                                      axis=-1)
    return _dense(derivative(product), p['combine']) + p['out_bias']


def apply(spec, form: dict, images: jax.Array) -> jax.Array:
    """Logits of the inference form on NHWC `images`, computed in the form's dtype.

    Equals `model.apply(variables, images, train=False)` for `form = fold(spec, variables)`.
    Refuses a form of another model (`check_form`) and images of the wrong shape
    (`check_images`). A baseline's spec applies by `qhnet.symmetry.baselines.apply`.
    """
    structure = spec.structure
    check_form(spec, form)
    check_images(spec, form, images)
    if not isinstance(structure, Structure):
        from qhnet.symmetry import baselines  # it builds on this module
        return baselines.apply(spec, form, images)
    dtype = compute_dtype(form)
    form = jax.tree_util.tree_map(jnp.asarray, form)
    x = jax.lax.conv_general_dilated(
        jnp.asarray(images, dtype), form['stem']['kernel'], window_strides=structure.stem_stride,
        padding=structure.stem_padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        precision=HIGHEST)
    x = nn.relu(x + form['stem']['bias'])
    if structure.stem_pool:
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for block in structure.blocks:
        p = form[block.name]
        shortcut = _dense(x[:, ::block.stride, ::block.stride], p['shortcut']) + p['shortcut_bias']
        x = activations.get(block.activation)(shortcut + _block_update(structure, block, p, x))
    pooled = jnp.mean(x, axis=(1, 2))
    return _dense(pooled, form['head']['kernel']) + form['head']['bias']


# Back to the Flax model.

def identity_bn(structure: Structure, path: str, bias: np.ndarray):
    """BN params and statistics with BN(x) = x + bias: scale 1, mean 0, var = 1 - eps."""
    n = bias.shape[0]
    return ({'scale': np.ones(n), 'bias': bias},
            {'mean': np.zeros(n), 'var': np.full(n, 1.0 - structure.epsilon(path))})


def unfold(spec, form: dict, dtype=np.float32) -> dict:
    """Variables of the Flax model with `mixing=True` that compute the form's function.

    Every BN becomes x -> x + bias (scale 1, mean 0, var 1 - eps). The Flax model has no
    parameter for an identity shortcut, so a form whose identity-shortcut blocks hold a
    map other than the identity (an element that changes basis across such a block) is
    refused; sample from `group_spec(model, tie_identity_shortcuts=True)` to avoid them, and
    so is a form of another model (`check_form`). A baseline's spec unfolds by
    `qhnet.symmetry.baselines.unfold`.
    """
    structure = spec.structure
    check_form(spec, form)
    if not isinstance(structure, Structure):
        from qhnet.symmetry import baselines  # it builds on this module
        return baselines.unfold(spec, form, dtype)

    def conv(w):
        return w.reshape(1, 1, *w.shape)

    params, stats = {}, {}
    params['stem_conv'] = {'kernel': form['stem']['kernel']}
    params['stem_bn'], stats['stem_bn'] = identity_bn(structure, 'stem_bn', form['stem']['bias'])
    for block in structure.blocks:
        p, name = form[block.name], block.name
        bn_d = p['derivative_bias'] if 'derivative_bias' in p else np.zeros(p['combine'].shape[0])
        bp, bs = {}, {}
        bp['coef'] = {'kernel': conv(p['coef'])}
        if 'coef_bias' in p:
            bp['coef_bn'], bs['coef_bn'] = identity_bn(structure, f'{name}/coef_bn', p['coef_bias'])
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
