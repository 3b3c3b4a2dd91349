"""Table 1 row: Eq. (3) block, weight-shared, softball@ds: the paper's main model.

  python -m qhnet.main --config=configs/eq3_softball.py --workdir=DIR
  python -m qhnet.main --config=configs/eq3_softball.py:fashion_mnist --workdir=DIR  # offline, small model

Paper: 83.66% top-1 on ImageNet-100 (224x224, 50 epochs). Fashion-MNIST variant: 92.2% to
92.8% test top-1 after 5 epochs (seed 0: 92.72% on one machine, 92.16% on another), 5 to
14 minutes on 2 CPU cores, depending on the machine (README).
"""

from qhnet import config


def get_config(variant=None):
    return config.row_config('eq3_softball', variant)
