"""The static structure of a QHNet, read off the model itself.

`structure(model)` traces `model.init` abstractly (`jax.eval_shape`, no FLOPs) with a
method interceptor and records, in call order, every quasi-linear block (its name,
widths n -> n', stride, whether its shortcut is a projection, whether it carries the
activation) and every BatchNorm's epsilon, plus the stem convolution's geometry. Nothing
here restates the model's layout by hand: the trace is the model.

Which blocks carry the activation is observed on a clone of the model with
`activation='relu'`, so that it is visible even for `activation='identity'` (where
carrier and non-carrier blocks compute the same thing).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from qhnet import baselines, models
from qhnet.blocks import QuasiLinearBlock


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


@dataclasses.dataclass(frozen=True)
class Structure:
    """Everything about a QHNet that its variables do not say; hashable (a jit static)."""
    equation: int
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


def as_module(model) -> nn.Module:
    """The module of a module or of a config's `model` section: a QHNet or one of the baselines
    (ResNet50, MobileNetV3Large; see `qhnet.symmetry.baselines`); other models are refused."""
    if isinstance(model, ml_collections.ConfigDict):
        model = models.build(model)
    if not isinstance(model, (models.QHNet, baselines.ResNet50, baselines.MobileNetV3Large)):
        raise ValueError(
            f'the symmetry toolkit covers QHNet models and the baselines ResNet50 and '
            f'MobileNetV3Large; got {type(model).__name__}')
    return model


def structure(model) -> Structure:
    """The `Structure` of a QHNet module (or of the config `model` section that builds one)."""
    model = as_module(model)
    if not isinstance(model, models.QHNet):
        raise ValueError(f'structure() traces QHNet models; the structure of a '
                         f'{type(model).__name__} is qhnet.symmetry.baselines.trace_structure')
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
                    projection=not (module.stride == 1 and n_in == module.features)))
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
