"""Table 1 row: Eq. (4) block, weight-shared. Table 1 gives no activation for this row; we use softball@ds.

  python -m qhnet.main --config=configs/eq4.py --workdir=DIR
  python -m qhnet.main --config=configs/eq4.py:fashion_mnist --workdir=DIR  # offline, small model

Paper: 81.88% top-1 on ImageNet-100 (224x224, 50 epochs).
"""

from qhnet import config


def get_config(variant=None):
    return config.row_config('eq4', variant)
