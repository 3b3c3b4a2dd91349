"""Table 1 row: Eq. (3) block, weight-shared, softball@ds: the paper's main model.

  python -m qhnet.main --config=configs/eq3_softball.py --workdir=DIR
  python -m qhnet.main --config=configs/eq3_softball.py:fashion_mnist --workdir=DIR  # offline, small model

Paper: 83.66% top-1 on ImageNet-100 (224x224, 50 epochs). Fashion-MNIST variant (the README's
main command): experiments/main_run/results.md (`python -m experiments.main_run`).
"""

from qhnet import config


def get_config(variant=None):
    return config.row_config('eq3_softball', variant)
