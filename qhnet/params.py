"""Parameter counts of every Table 1 row against the paper's figures.

    python -m qhnet.params            # run from the repository root

Counts come from initialising the real module (abstractly, with `jax.eval_shape`),
at the paper's 100 classes and 224x224 inputs.
"""

import importlib

import jax
import jax.numpy as jnp

from qhnet import models

# Table 1 row -> (config module under configs/, the paper's parameter count).
TABLE1 = {
    'ResNet50': ('resnet50', 23.7e6),
    'MobileNet_v3_large': ('mobilenet_v3_large', 4.33e6),
    'Eq. (3) relu@all': ('eq3_relu_all', 8.61e6),
    'Eq. (3) hardtanh@ds': ('eq3_hardtanh', 8.61e6),
    'Eq. (3) hardball@ds': ('eq3_hardball', 8.61e6),
    'Eq. (3) softball@ds': ('eq3_softball', 8.61e6),
    'Eq. (3) no ws': ('eq3_nows', 8.73e6),
    'Eq. (3) no ws, x6': ('eq3_nows_x6', 13.0e6),
    'Eq. (4)': ('eq4', 5.70e6),
    'Eq. (5)': ('eq5_softball', 4.26e6),
    'Eq. (6)': ('eq6', 5.61e6),
    'Eq. (7) no ws, x6': ('eq7_nows_x6', 13.0e6),
}


def count_params(model, image_shape=(224, 224, 3)) -> int:
    """Number of trainable parameters (BN scales and shifts included, running statistics not)."""
    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables['params']))


def row_config(row: str):
    """The config that `configs/<module>.py` returns for a Table 1 row."""
    return importlib.import_module(f'configs.{TABLE1[row][0]}').get_config()


def table() -> list[tuple[str, int, float]]:
    """(row, our count at 100 classes, the paper's count) for every Table 1 row."""
    rows = []
    for row, (_, paper) in TABLE1.items():
        model_config = row_config(row).model
        model_config.num_classes = 100
        rows.append((row, count_params(models.build(model_config)), paper))
    return rows


def main() -> None:
    print(f'| {"Table 1 row":<22} | {"qhnet":>12} | {"paper":>7} | {"difference":>10} |')
    print(f'|{"-" * 24}|{"-" * 14}|{"-" * 9}|{"-" * 12}|')
    for row, ours, paper in table():
        print(f'| {row:<22} | {ours:>12,} | {paper / 1e6:>6.2f}M | {(ours - paper) / paper:>+10.2%} |')


if __name__ == '__main__':
    main()
