"""Parameter counts of every Table 1 row against the paper's figures, and of the authors'
released QLNet against their PyTorch model's.

    python -m qhnet.params

Counts come from initialising the real module (abstractly, with `jax.eval_shape`) of each
row of `qhnet.config.ROWS`, at the paper's 100 classes and 224x224 inputs, and of
`qhnet.config.RELEASED` at 100 and 1000 classes.
"""

import jax
import jax.numpy as jnp

from qhnet import config, models


def count_params(model, image_shape=(224, 224, 3)) -> int:
    """Number of trainable parameters (BN scales and shifts included, running statistics not)."""
    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables['params']))


def table() -> list[tuple[str, int, float]]:
    """(row title, our count at 100 classes, the paper's count) for every Table 1 row."""
    rows = []
    for key, row in config.ROWS.items():
        model_config = config.row_config(key).model
        model_config.num_classes = 100
        rows.append((row.title, count_params(models.build(model_config)), row.paper_params))
    return rows


# sum(p.numel() for p in model.parameters()) of the authors' resnet50(num_classes=classes)
# (their resnet.py, the QLNet architecture); tests/test_convert.py recounts it where torch is.
PYTORCH_PARAMS = {('qlnet50', 100): 9_531_940, ('qlnet50', 1000): 9_993_640}


def released_table() -> list[tuple[str, int, int, int]]:
    """(title, classes, our count, PyTorch's count) of every released model."""
    rows = []
    for (key, classes), theirs in PYTORCH_PARAMS.items():
        model_config = config.row_config(key).model
        model_config.num_classes = classes
        rows.append((config.RELEASED[key].title, classes, count_params(models.build(model_config)),
                     theirs))
    return rows


def main() -> None:
    print(f'| {"Table 1 row":<22} | {"qhnet":>12} | {"paper":>7} | {"difference":>10} |')
    print(f'|{"-" * 24}|{"-" * 14}|{"-" * 9}|{"-" * 12}|')
    for row, ours, paper in table():
        print(f'| {row:<22} | {ours:>12,} | {paper / 1e6:>6.2f}M | {(ours - paper) / paper:>+10.2%} |')
    print(f'\n| {"released model":<22} | {"classes":>7} | {"qhnet":>12} | {"PyTorch":>12} |')
    print(f'|{"-" * 24}|{"-" * 9}|{"-" * 14}|{"-" * 14}|')
    for title, classes, ours, theirs in released_table():
        print(f'| {title:<22} | {classes:>7} | {ours:>12,} | {theirs:>12,} |')


if __name__ == '__main__':
    main()
