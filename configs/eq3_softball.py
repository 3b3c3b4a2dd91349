"""Table 1 row: Eq. (3) block, weight-shared, softball@ds: the paper's main model.

  python -m qhnet.main --config=configs/eq3_softball.py --workdir=DIR
  python -m qhnet.main --config=configs/eq3_softball.py:fashion_mnist --workdir=DIR  # offline, small model

Paper: 83.66% top-1 on ImageNet-100 (224x224, 50 epochs). Fashion-MNIST variant: 92.50%
test top-1 after 5 epochs (seeds 1, 2: 92.37%, 92.55%), 3.3 to 3.9 minutes on 2 CPU cores;
up to about 9 minutes and a few tenths of a point apart on other machines (README).
"""

from qhnet import config


def get_config(variant=None):
    return config.row_config('eq3_softball', variant)
