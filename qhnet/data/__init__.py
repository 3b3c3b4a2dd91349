"""Input pipelines on grain: Fashion-MNIST, digits, any ImageFolder, ImageNet-1k and -100, TFDS.

`open_dataset(config.data)` checks the config, finds and lists the data once, and returns
a `Dataset`: its `info`, its `fingerprint`, and `batches(split, ...)`, an iterator over
`{'image': uint8 [B, H, W, C], 'label': int32 [B]}` (plus `'mask'` on evaluation and
`'erase'` boxes with random erasing). `normalise(images, info)`, inside the jitted step,
makes the float32 the models read. The datasets, streams, transforms and fingerprints are
described in docs/data.md.

The package, bottom up:

    core.py        DatasetInfo, the errors, the checked config.data settings, split types
    bundled.py     Fashion-MNIST (idx files) and digits, in memory
    folders.py     ImageFolder trees, ImageNet-1k and ImageNet-100
    tfds.py        TFDS datasets prepared as array_record
    augment.py     RandAugment and random erasing (timm's definitions)
    transforms.py  decoding, crops, resizing, flips: one image
    stream.py      which example each row holds; grain map functions and iterator
    dataset.py     open_dataset, Dataset.batches, normalise
"""

from qhnet.data.bundled import FASHION_MNIST_DIR
from qhnet.data.core import (NAMES, SPLITS, CorruptDatasetError, CorruptImageError, DatasetInfo,
                             DatasetNotFoundError)
from qhnet.data.dataset import Dataset, get_info, make_iterator, normalise, open_dataset

__all__ = ['FASHION_MNIST_DIR', 'NAMES', 'SPLITS', 'CorruptDatasetError', 'CorruptImageError',
           'Dataset', 'DatasetInfo', 'DatasetNotFoundError', 'get_info', 'make_iterator',
           'normalise', 'open_dataset']
