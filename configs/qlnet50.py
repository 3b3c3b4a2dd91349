"""QLNet-50, the authors' model released after the paper (not a Table 1 row): QLNet's blocks
(a product of two halves of a 1x1 conv, then a 3x3 depthwise conv and a 1x1 conv) in the
ResNet50 layout, hardball after the downsampling blocks and before pooling.

  python -m qhnet.convert --source=qlnet50 --weights=qlnet-50-v0.pth.tar --workdir=DIR
  python -m qhnet.main --config=configs/qlnet50.py:imagenet1k --workdir=DIR --evaluate_only \
      --config.data.data_dir=/path/to/imagenet
  python -m qhnet.main --config=configs/qlnet50.py --workdir=DIR  # train it on ImageNet-100
  python -m qhnet.main --config=configs/qlnet50.py:fashion_mnist --workdir=DIR  # offline, small

Released: 78.61% top-1 on ImageNet-1k (its model card); not reproduced here (README,
'The released QLNet').
"""

from qhnet import config


def get_config(variant=None):
    return config.row_config('qlnet50', variant)
