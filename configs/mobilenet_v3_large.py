"""Table 1 row: MobileNetV3-Large baseline (torchvision layout).

  python -m qhnet.main --config=configs/mobilenet_v3_large.py --workdir=DIR
  python -m qhnet.main --config=configs/mobilenet_v3_large.py:fashion_mnist --workdir=DIR  # offline, small model

Paper: 82.91% top-1 on ImageNet-100 (224x224, 50 epochs). Fashion-MNIST variant: torchvision's
block table behind the variant's stem (its widths and depths are not read). Results:
experiments/table1/fashion_mnist.md (`python -m experiments.table1`).
"""

from qhnet import config


def get_config(variant=None):
    return config.row_config('mobilenet_v3_large', variant)
