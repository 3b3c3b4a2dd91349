"""The paper's recipe with qhnet's default model (Eq. (3) softball@ds) on ImageNet-100.

  python -m qhnet.main --config=configs/default.py --workdir=DIR
  python -m qhnet.main --config=configs/default.py:fashion_mnist --workdir=DIR  # offline, small model

The schema, the recipe and the Table 1 rows live in the package, `qhnet/config.py`;
every file here is a thin wrapper around it for the command line.
"""

from qhnet import config


def get_config(variant=None):
    return config.get_config(variant)
