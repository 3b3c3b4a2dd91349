"""Table 1 row: Eq. (6) block (conservation form), weight-shared. Table 1 gives no activation for this row; we use softball@ds.

  python -m qhnet.main --config=configs/eq6.py --workdir=DIR
  python -m qhnet.main --config=configs/eq6.py:fashion_mnist --workdir=DIR  # offline, small model

Paper: 82.52% top-1 on ImageNet-100 (224x224, 50 epochs).
"""

from qhnet import config


def get_config(variant=None):
    return config.row_config('eq6', variant)
