"""Table 1 row: Eq. (7) block without weight sharing, multiplier 6. Table 1 gives no activation for this row; we use softball@ds.

  python -m qhnet.main --config=configs/eq7_nows_x6.py --workdir=DIR
  python -m qhnet.main --config=configs/eq7_nows_x6.py:fashion_mnist --workdir=DIR  # offline, small model

Paper: 84.96% top-1 on ImageNet-100 (224x224, 50 epochs).
"""

from configs import default


def get_config(variant=None):
    config = default.get_config(variant)
    config.model.equation = 7
    config.model.activation = 'softball'
    config.model.placement = 'ds'
    config.model.weight_sharing = False
    config.model.multiplier = 6
    return config
