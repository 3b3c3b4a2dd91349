"""Table 1 row: Eq. (7) block without weight sharing, multiplier 6. Table 1 gives no activation for this row; we use softball@ds.

  python -m qhnet.main --config=configs/eq7_nows_x6.py --workdir=DIR
  python -m qhnet.main --config=configs/eq7_nows_x6.py:fashion_mnist --workdir=DIR  # offline, small model

Paper: 84.96% top-1 on ImageNet-100 (224x224, 50 epochs).
"""

from qhnet import config


def get_config(variant=None):
    return config.row_config('eq7_nows_x6', variant)
