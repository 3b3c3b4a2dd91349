"""Table 1 row: Eq. (5) block, weight-shared, softball@ds.

  python -m qhnet.main --config=configs/eq5_softball.py --workdir=DIR
  python -m qhnet.main --config=configs/eq5_softball.py:fashion_mnist --workdir=DIR  # offline, small model

Paper: 78.64% top-1 on ImageNet-100 (224x224, 50 epochs).
"""

from qhnet import config


def get_config(variant=None):
    return config.row_config('eq5_softball', variant)
