"""The authors' QLNet (their timm `ResNet` of `PDEBlock`s) -> the 'qlnet' model.

    PyTorch                             qhnet ('qlnet' model)
    conv1, bn1                          stem_conv, stem_bn
    layer{s}.{i}.conv1.conv, .conv1.bn  stage{s}_block{i+1}/coef, coef_bn     C, BN_c
    layer{s}.{i}.conv2, .bn2            .../derivative, derivative_bn       K, BN_d
    layer{s}.{i}.conv3.conv, .conv3.bn  .../combine, out_bn                 A, BN_o
    layer{s}.{i}.skip.conv, .skip.bn    .../shortcut, shortcut_bn           (downsampling blocks)
    fc                                  head

PyTorch's grouped 3x3 conv (out 2w, in 1, 3, 3) with groups=w gives output channel 2j + k from
input channel j, as K's per-channel kernels (3, 3, 1, 2w) do.
"""

import ml_collections

from qhnet.convert.core import Path, batch_norm, weight


def mapping(model_config: ml_collections.ConfigDict) -> dict[str, Path]:
    """{state_dict key: variable path} of a QLNet of `model_config`'s widths and depths."""
    keys = {**weight('conv1.weight', ('stem_conv',)), **batch_norm('bn1', ('stem_bn',))}
    for stage, depth in enumerate(model_config.depths):
        for index in range(depth):
            torch_block, block = f'layer{stage + 1}.{index}', f'stage{stage + 1}_block{index + 1}'
            keys.update({
                **weight(f'{torch_block}.conv1.conv.weight', (block, 'coef')),
                **batch_norm(f'{torch_block}.conv1.bn', (block, 'coef_bn')),
                **weight(f'{torch_block}.conv2.weight', (block, 'derivative')),
                **batch_norm(f'{torch_block}.bn2', (block, 'derivative_bn')),
                **weight(f'{torch_block}.conv3.conv.weight', (block, 'combine')),
                **batch_norm(f'{torch_block}.conv3.bn', (block, 'out_bn'))})
            if stage > 0 and index == 0:
                keys.update({**weight(f'{torch_block}.skip.conv.weight', (block, 'shortcut')),
                             **batch_norm(f'{torch_block}.skip.bn', (block, 'shortcut_bn'))})
    keys.update({**weight('fc.weight', ('head',)), **weight('fc.bias', ('head',), 'bias')})
    return keys
