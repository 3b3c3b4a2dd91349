"""Table 1 row: Eq. (3) block without weight sharing, softball@ds.

  python -m qhnet.main --config=configs/eq3_nows.py --workdir=DIR
  python -m qhnet.main --config=configs/eq3_nows.py:fashion_mnist --workdir=DIR  # offline, small model

Paper: 84.24% top-1 on ImageNet-100 (224x224, 50 epochs).
"""

from qhnet import config


def get_config(variant=None):
    return config.row_config('eq3_nows', variant)
