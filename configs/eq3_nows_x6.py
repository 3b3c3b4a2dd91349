"""Table 1 row: Eq. (3) block without weight sharing, multiplier 6, softball@ds.

  python -m qhnet.main --config=configs/eq3_nows_x6.py --workdir=DIR
  python -m qhnet.main --config=configs/eq3_nows_x6.py:fashion_mnist --workdir=DIR  # offline, small model

Paper: 84.58% top-1 on ImageNet-100 (224x224, 50 epochs).
"""

from qhnet import config


def get_config(variant=None):
    return config.row_config('eq3_nows_x6', variant)
