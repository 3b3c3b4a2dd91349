"""torchvision's `resnet50` and `mobilenet_v3_large` state_dicts -> qhnet's baselines
(`qhnet.models.ResNet50`, `MobileNetV3Large`, which follow torchvision's layout).

ResNet-50:
    conv1, bn1                           -> stem_conv, stem_bn
    layer{s}.{b}.conv{i}, .bn{i}         -> stage{s}_block{b+1}/Conv_{i-1}, BatchNorm_{i-1}
    layer{s}.0.downsample.0, .1          -> stage{s}_block1/shortcut_conv, shortcut_bn
    fc                                   -> head
MobileNetV3-Large (`features.{n}.0` a conv, `.1` its BatchNorm):
    features.0                           -> stem_conv, stem_bn
    features.{k}.block.{j} (k = 1..15)   -> block{k}/Conv_{c}, BatchNorm_{c}: the expand conv
                                            (absent where expanded == input channels),
                                            depthwise, project, numbered c = 0, 1, ...
    features.{k}.block.{j}.fc1, .fc2     -> block{k}/_SqueezeExcitation_0/fc1, fc2 (the SE,
                                            after the depthwise conv; 1x1 convs with bias)
    features.16                          -> last_conv, last_bn
    classifier.0, classifier.3           -> fc1, fc2
"""

import ml_collections

from qhnet.convert import core
from qhnet.models import baselines


def _conv_norm(conv_key: str, norm_prefix: str, conv: core.Path,
               norm: core.Path) -> dict[str, core.Path]:
    """A bias-free conv and the BatchNorm after it."""
    return {**core.weight(conv_key, conv), **core.batch_norm(norm_prefix, norm)}


def _with_bias(torch_prefix: str, layer: core.Path) -> dict[str, core.Path]:
    """A linear layer or conv with bias: its weight and bias."""
    return {**core.weight(f'{torch_prefix}.weight', layer),
            **core.weight(f'{torch_prefix}.bias', layer, 'bias')}


def resnet50(model_config: ml_collections.ConfigDict) -> dict[str, core.Path]:
    """torchvision `resnet50` state_dict key -> variable path of the `model_config` model."""
    mapping = _conv_norm('conv1.weight', 'bn1', ('stem_conv',), ('stem_bn',))
    for stage, depth in enumerate(model_config.depths, start=1):
        for block in range(depth):
            torch_block, flax_block = f'layer{stage}.{block}', f'stage{stage}_block{block + 1}'
            for index in range(3):
                mapping.update(_conv_norm(f'{torch_block}.conv{index + 1}.weight',
                                          f'{torch_block}.bn{index + 1}',
                                          (flax_block, f'Conv_{index}'),
                                          (flax_block, f'BatchNorm_{index}')))
            if block == 0:  # the projection shortcut: each stage's first block changes width
                mapping.update(_conv_norm(f'{torch_block}.downsample.0.weight',
                                          f'{torch_block}.downsample.1',
                                          (flax_block, 'shortcut_conv'),
                                          (flax_block, 'shortcut_bn')))
    mapping.update(_with_bias('fc', ('head',)))
    return mapping


def _conv_norm_activation(torch_prefix: str, conv: core.Path,
                          norm: core.Path) -> dict[str, core.Path]:
    """torchvision's Conv2dNormActivation at `torch_prefix`: conv `.0`, BatchNorm `.1`."""
    return _conv_norm(f'{torch_prefix}.0.weight', f'{torch_prefix}.1', conv, norm)


def mobilenet_v3_large(model_config: ml_collections.ConfigDict) -> dict[str, core.Path]:
    """torchvision `mobilenet_v3_large` state_dict key -> variable path of the model.

    The block table is torchvision's (`baselines._MOBILENET_V3_LARGE_BLOCKS`) for every
    config, as in the model."""
    del model_config  # MobileNetV3Large reads no widths or depths from its config
    blocks = baselines._MOBILENET_V3_LARGE_BLOCKS  # pylint: disable=protected-access
    mapping = _conv_norm_activation('features.0', ('stem_conv',), ('stem_bn',))
    for number, (in_features, _, expanded, _, use_se, _, _) in enumerate(blocks, start=1):
        torch_block, flax_block = f'features.{number}.block', f'block{number}'
        has_expand = expanded != in_features
        se_position = 1 + has_expand if use_se else None  # right after the depthwise conv
        conv_positions = [position for position in range(2 + has_expand + use_se)
                          if position != se_position]
        for index, position in enumerate(conv_positions):
            mapping.update(_conv_norm_activation(f'{torch_block}.{position}',
                                                 (flax_block, f'Conv_{index}'),
                                                 (flax_block, f'BatchNorm_{index}')))
        if use_se:
            for fc in ('fc1', 'fc2'):
                mapping.update(_with_bias(f'{torch_block}.{se_position}.{fc}',
                                          (flax_block, '_SqueezeExcitation_0', fc)))
    mapping.update(_conv_norm_activation(f'features.{len(blocks) + 1}', ('last_conv',),
                                         ('last_bn',)))
    mapping.update(_with_bias('classifier.0', ('fc1',)))
    mapping.update(_with_bias('classifier.3', ('fc2',)))
    return mapping
