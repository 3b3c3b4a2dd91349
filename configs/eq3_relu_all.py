"""Table 1 row: Eq. (3) block, weight-shared, relu after every block (relu@all).

  python -m qhnet.main --config=configs/eq3_relu_all.py --workdir=DIR
  python -m qhnet.main --config=configs/eq3_relu_all.py:fashion_mnist --workdir=DIR  # offline, small model

Paper: 82.06% top-1 on ImageNet-100 (224x224, 50 epochs).
"""

from qhnet import config


def get_config(variant=None):
    return config.row_config('eq3_relu_all', variant)
