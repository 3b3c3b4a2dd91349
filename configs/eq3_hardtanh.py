"""Table 1 row: Eq. (3) block, weight-shared, hardtanh@ds.

  python -m qhnet.main --config=configs/eq3_hardtanh.py --workdir=DIR
  python -m qhnet.main --config=configs/eq3_hardtanh.py:fashion_mnist --workdir=DIR  # offline, small model

Paper: 82.34% top-1 on ImageNet-100 (224x224, 50 epochs).
"""

from qhnet import config


def get_config(variant=None):
    return config.row_config('eq3_hardtanh', variant)
