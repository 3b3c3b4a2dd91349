"""Table 1 row: Eq. (3) block, weight-shared, softball@ds: the paper's main model.

  python -m qhnet.main --config=configs/eq3_softball.py --workdir=DIR
  python -m qhnet.main --config=configs/eq3_softball.py:fashion_mnist --workdir=DIR  # offline, small model

Paper: 83.66% top-1 on ImageNet-100 (224x224, 50 epochs). Fashion-MNIST variant: 92.48%
test top-1 after 5 epochs (seeds 1, 2: 92.66%, 92.54%), 7.5 to 8.3 minutes on 2 CPU cores
of a medium machine; 5 to 14 minutes and a few tenths of a point apart on others (README).
"""

from qhnet import config


def get_config(variant=None):
    return config.row_config('eq3_softball', variant)
