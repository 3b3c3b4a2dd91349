"""Table 1 row: ResNet50 baseline (torchvision layout).

  python -m qhnet.main --config=configs/resnet50.py --workdir=DIR
  python -m qhnet.main --config=configs/resnet50.py:fashion_mnist --workdir=DIR  # offline, small model

Paper: 84.52% top-1 on ImageNet-100 (224x224, 50 epochs). Fashion-MNIST variant: the
small-input ResNet50 (the variant's 3x3/2 stem, bottleneck widths and depths). Results:
experiments/table1/fashion_mnist.md (`python -m experiments.table1`).
"""

from qhnet import config


def get_config(variant=None):
    return config.row_config('resnet50', variant)
