"""The static structure of a model, read off the model itself: `trace(model)`.

A QHNet's `Structure` (`trace_qhnet`) records, in call order, every quasi-linear block (its
name, widths n -> n', stride, whether its shortcut is a projection, whether it carries the
activation) and every BatchNorm's epsilon, plus the stem convolution's geometry. Which
blocks carry the activation is observed on a clone of the model with `activation='relu'`,
so that it is visible even for `activation='identity'` (where carrier and non-carrier
blocks compute the same thing).

A baseline's `BaselineStructure` (`trace_baseline`; ResNet50, MobileNetV3Large) records its
layers (each conv or Dense with the BatchNorm after it), their widths, strides and
BatchNorms, and its blocks' activations, shortcuts and squeeze-excites.

Both trace `model.init` abstractly (`jax.eval_shape`, no FLOPs) with a method interceptor.
Nothing here restates a model's layout by hand: the trace is the model.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from qhnet import models
from qhnet.models import baselines
from qhnet.models.blocks import QuasiLinearBlock


# QHNet.

@dataclasses.dataclass(frozen=True)
class Block:
    """One quasi-linear block y = act(shortcut(u) + q(u)), u: n channels -> y: n' channels."""
    name: str
    n_in: int
    n_out: int
    stride: int
    carries_activation: bool  # ends with the model's activation ('ds': downsampling, or last)
    activation: str           # the model's activation if it carries it, else 'identity'
    projection: bool          # shortcut = BN(1x1 conv); otherwise the parameter-free identity
    hidden: int = 0           # channels j of the product (n_in unless sliced; QLNet: its w)
    radius: float = 0.0       # of a ball activation: sqrt(n_out) unless sliced


@dataclasses.dataclass(frozen=True)
class Structure:
    """Everything about a QHNet that its variables do not say; hashable (a jit static)."""
    equation: int | str      # 3-7, or 'qlnet'
    multiplier: int
    weight_sharing: bool
    mixing: bool
    stem_stride: tuple[int, int]
    stem_padding: tuple[tuple[int, int], tuple[int, int]]
    stem_pool: bool        # the 3x3/2 max pool of the 'imagenet' stem
    blocks: tuple[Block, ...]
    epsilons: tuple[tuple[str, float], ...]   # ('stage1_block1/out_bn', 1e-5), ...
    # ('params/stem_conv/kernel', (3, 3, None, 8)), ...: None where the data decides (channels)
    variable_shapes: tuple[tuple[str, tuple[int | None, ...]], ...]

    def epsilon(self, path: str) -> float:
        return dict(self.epsilons)[path]


def trace_qhnet(model: models.QHNet) -> Structure:
    """The `Structure` of a QHNet module."""
    blocks, epsilons, stem = [], [], {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == '__call__':
            path = '/'.join(module.scope.path)
            if isinstance(module, QuasiLinearBlock):
                n_in = args[0].shape[-1]
                blocks.append(Block(
                    name=path, n_in=n_in, n_out=module.features, stride=module.stride,
                    carries_activation=module.activation != 'identity', activation='',
                    projection=not (module.stride == 1 and n_in == module.features),
                    hidden=module.hidden_width(n_in),
                    radius=module.radius or float(module.features) ** 0.5))
            elif isinstance(module, nn.BatchNorm):
                epsilons.append((path, float(module.epsilon)))
            elif path == 'stem_conv':
                strides = module.strides
                if isinstance(strides, int):
                    strides = (strides, strides)
                stem.update(stride=tuple(strides), padding=tuple(tuple(p) for p in module.padding))
        return next_fun(*args, **kwargs)

    images = jnp.zeros((1, 64, 64, 3), jnp.float32)
    relu = model.clone(activation='relu')
    with nn.intercept_methods(record):
        variables = jax.eval_shape(lambda x: relu.init(jax.random.key(0), x), images)
    shapes = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        name = '/'.join(key.key for key in path)
        shape = leaf.shape
        if name == 'params/stem_conv/kernel':
            shape = shape[:2] + (None,) + shape[3:]
        shapes.append((name, shape))
    blocks = tuple(dataclasses.replace(b, activation=model.activation if b.carries_activation
                                       else 'identity') for b in blocks)
    return Structure(
        equation=model.equation, multiplier=model.multiplier,
        weight_sharing=model.weight_sharing, mixing=model.mixing, stem_stride=stem['stride'],
        stem_padding=stem['padding'], stem_pool=model.stem == 'imagenet', blocks=blocks,
        epsilons=tuple(epsilons), variable_shapes=tuple(shapes))


# The baselines.

@dataclasses.dataclass(frozen=True)
class Layer:
    """A conv or Dense with the BatchNorm after it (if any): x -> conv(x, W) + b once folded."""
    path: str                  # the conv's module path: its key in the form
    kind: str                  # 'conv', 'depthwise' (one kernel per channel) or 'dense'
    n_in: int
    n_out: int
    stride: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    own_bias: bool = False
    bn: str = ''               # the BatchNorm's module path, '' for none


@dataclasses.dataclass(frozen=True)
class Bottleneck:
    """ResNet: x -> relu(shortcut(x) + conv_3(relu(conv_2(relu(conv_1(x))))))."""
    name: str
    convs: tuple[Layer, Layer, Layer]
    shortcut: Layer | None     # the projection, or None for the identity


@dataclasses.dataclass(frozen=True)
class InvertedResidual:
    """MobileNetV3: expand, depthwise, squeeze-excite, project (`baseline_family`)."""
    name: str
    activation: str            # the `jax.nn` function after the expansion and the depthwise conv
    expand: Layer | None
    depthwise: Layer
    squeeze: tuple[Layer, Layer] | None   # the SE's fc1, fc2
    project: Layer
    residual: bool             # adds its input: the output has the input's shape


@dataclasses.dataclass(frozen=True)
class BaselineStructure:
    """Everything about a baseline that its variables do not say; hashable (a jit static)."""
    model: str                 # 'ResNet50' or 'MobileNetV3Large'
    stem: Layer
    blocks: tuple[Bottleneck, ...] | tuple[InvertedResidual, ...]
    head: tuple[Layer, ...]    # after the blocks: ResNet (head,); MobileNet (last_conv, fc1, fc2)
    epsilons: tuple[tuple[str, float], ...]
    variable_shapes: tuple[tuple[str, tuple[int | None, ...]], ...]
    stem_pool: bool = False    # ResNet50's ImageNet stem: a 3x3/2 max pool after it

    def epsilon(self, path: str) -> float:
        return dict(self.epsilons)[path]

    def layers(self) -> tuple[Layer, ...]:
        """Every layer, in call order."""
        found = [self.stem]
        for block in self.blocks:
            if isinstance(block, Bottleneck):
                found += [*block.convs] + ([block.shortcut] if block.shortcut else [])
            else:
                found += ([block.expand] if block.expand else []) + [block.depthwise]
                found += [*block.squeeze] if block.squeeze else []
                found.append(block.project)
        return tuple(found) + self.head


ACTIVATION_NAMES = {jax.nn.relu: 'relu', jax.nn.hard_swish: 'hard_swish'}


def _as_pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _layers(calls: list[dict]) -> list[Layer]:
    """The convs and Denses among `calls` (leaf module calls), each with the BatchNorm right
    after it."""
    found = []
    for call in calls:
        module, path, n_in = call['module'], call['path'], call['n_in']
        if isinstance(module, nn.BatchNorm):
            found[-1] = dataclasses.replace(found[-1], bn=path)
        elif isinstance(module, nn.Conv):
            if module.feature_group_count not in (1, n_in):
                raise ValueError(f'{path}: grouped convs other than depthwise are not covered')
            found.append(Layer(
                path, 'depthwise' if module.feature_group_count > 1 else 'conv', n_in,
                module.features, _as_pair(module.strides),
                tuple(_as_pair(p) for p in module.padding), module.use_bias))
        elif isinstance(module, nn.Dense):
            found.append(Layer(path, 'dense', n_in, module.features, own_bias=module.use_bias))
    return found


def _inverted_residual(call: dict) -> InvertedResidual:
    found = _layers(call['children'])
    k = next(i for i, layer in enumerate(found) if layer.kind == 'depthwise')
    squeeze = [c for c in call['children'] if c['children']]
    activation = baselines._ACTIVATIONS[call['module'].activation]
    return InvertedResidual(
        name=call['path'], activation=ACTIVATION_NAMES[activation],
        expand=found[k - 1] if k else None, depthwise=found[k],
        squeeze=tuple(_layers(squeeze[0]['children'])) if squeeze else None,
        project=found[k + 1], residual=call['in_shape'] == call['out_shape'])


def trace_baseline(model: baselines.ResNet50 | baselines.MobileNetV3Large) -> BaselineStructure:
    """The `BaselineStructure` of a ResNet50 or MobileNetV3Large module."""
    root = {'children': []}
    open_calls = [root]

    def record(next_fun, args, kwargs, context):
        if context.method_name != '__call__':
            return next_fun(*args, **kwargs)
        call = {'module': context.module, 'path': '/'.join(context.module.scope.path),
                'n_in': args[0].shape[-1], 'in_shape': args[0].shape, 'children': []}
        open_calls[-1]['children'].append(call)
        open_calls.append(call)
        try:
            output = next_fun(*args, **kwargs)
        finally:
            open_calls.pop()
        call['out_shape'] = output.shape
        return output

    images = jnp.zeros((1, 64, 64, 3), jnp.float32)
    with nn.intercept_methods(record):
        variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
    top = root['children'][0]['children']
    outer = _layers(top)
    block_calls = [call for call in top if call['children']]
    if isinstance(model, baselines.ResNet50):
        blocks = []
        for call in block_calls:
            found = _layers(call['children'])  # conv_1, conv_2, conv_3 [, projection]
            blocks.append(Bottleneck(call['path'], tuple(found[:3]),
                                     found[3] if len(found) == 4 else None))
    else:
        blocks = [_inverted_residual(call) for call in block_calls]

    def batch_norms(calls):
        for call in calls:
            if isinstance(call['module'], nn.BatchNorm):
                yield call['path'], float(call['module'].epsilon)
            yield from batch_norms(call['children'])

    stem_kernel = f'params/{outer[0].path}/kernel'
    shapes = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        name = '/'.join(key.key for key in path)
        shapes.append((name, leaf.shape[:2] + (None,) + leaf.shape[3:] if name == stem_kernel
                       else leaf.shape))
    return BaselineStructure(
        model=type(model).__name__, stem=outer[0], blocks=tuple(blocks), head=tuple(outer[1:]),
        epsilons=tuple(batch_norms(top)), variable_shapes=tuple(shapes),
        stem_pool=isinstance(model, baselines.ResNet50) and model.stem == 'imagenet')


def trace(model) -> Structure | BaselineStructure:
    """The structure of a module, or of a config's `model` section: a QHNet or one of the
    baselines (ResNet50, MobileNetV3Large); other models are refused."""
    if isinstance(model, ml_collections.ConfigDict):
        model = models.build(model)
    if isinstance(model, models.QHNet):
        return trace_qhnet(model)
    if isinstance(model, (baselines.ResNet50, baselines.MobileNetV3Large)):
        return trace_baseline(model)
    raise ValueError(
        f'the symmetry toolkit covers QHNet models and the baselines ResNet50 and '
        f'MobileNetV3Large; got {type(model).__name__}')
