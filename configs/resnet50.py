"""Table 1 row: ResNet50 baseline (torchvision layout).

  python -m qhnet.main --config=configs/resnet50.py --workdir=DIR
  python -m qhnet.main --config=configs/resnet50.py:fashion_mnist --workdir=DIR  # offline, small model

Paper: 84.52% top-1 on ImageNet-100 (224x224, 50 epochs). Fashion-MNIST variant: the
small-input ResNet50 (3x3/2 stem, bottleneck widths 16, 32, 128, 256, one block per stage;
1,849,466 parameters). Measured with the variant's earlier recipe (3x3/1 stem, 5 epochs,
base LR 0.8): 93.45% test top-1 (seed 0); not yet run with the current one.
"""

from qhnet import config


def get_config(variant=None):
    return config.row_config('resnet50', variant)
