"""Table 1 row: Eq. (5) block, weight-shared, softball@ds.

  python -m qhnet.main --config=configs/eq5_softball.py --workdir=DIR
  python -m qhnet.main --config=configs/eq5_softball.py:fashion_mnist --workdir=DIR  # offline, small model

Paper: 78.64% top-1 on ImageNet-100 (224x224, 50 epochs).
"""

from configs import default


def get_config(variant=None):
    config = default.get_config(variant)
    config.model.equation = 5
    config.model.activation = 'softball'
    config.model.placement = 'ds'
    return config
