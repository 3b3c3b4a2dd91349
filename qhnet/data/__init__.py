"""Input pipelines on grain: Fashion-MNIST, digits, any ImageFolder, ImageNet-100, TFDS.

`open_dataset(config.data)` checks the config, finds and lists the data once, and returns
a `Dataset`: its `info`, and `batches(split, ...)`, an iterator over
`{'image': uint8 [B, H, W, C], 'label': int32 [B]}`, plus `'mask'` on eval and `'erase'`
boxes when random erasing is on. Images stay uint8 until the device: `normalise(images,
info)` (inside the jitted step) makes the float32 the models read.

Datasets, by `config.data.name`:

* `fashion_mnist`: the four idx files in `data_dir` (default
  /usr/share/datasets/fashion-mnist, Debian package `dataset-fashion-mnist`),
  held in memory: 60,000 train and 10,000 test images, 28x28x1.
* `digits`: scikit-learn's bundled 8x8 digits (1,797 images, nothing to
  download); the first 1,500 are the train split and the last 297 the test split.
* `imagefolder`: any tree `data_dir/train/<class>/*` and `data_dir/val/<class>/*` of JPEG
  or PNG images (8- or 16-bit, RGB or grayscale). Classes are the sorted folder names of
  train/, or those of `class_list`; val/ must have the same folders. The dataset is
  grayscale when every header checked at open is (every val image, the first of each
  train class), else RGB.
* `imagenet100`: the 100 ImageNet classes of CMC (Tian, Krishnan and Isola,
  "Contrastive Multiview Coding", 2019; the list published as imagenet100.txt in
  github.com/HobbitLong/CMC, packaged here as qhnet/imagenet100.txt): an `imagefolder`
  with that class list (`train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG`; other folders are
  ignored), or a TFDS `imagenet2012` prepared as array_record. Class i is the i-th wnid
  in sorted order.
* any other name: a TFDS dataset with `image` and `label` features, prepared in
  `data_dir` as array_record (read with `tfds.data_source`, no TensorFlow).

Nothing is ever downloaded: missing data raises `DatasetNotFoundError` with setup
instructions. Fashion-MNIST's files are read and checked when the dataset is
opened (once per process while they are unchanged); a damaged one raises
`CorruptDatasetError` naming it and saying how to replace it. An image that
cannot be decoded raises `CorruptImageError` naming its file (or TFDS record)
instead of being skipped, so a stream never changes silently.

Streams are grain `MapDataset`s: decoding and augmentation run in `.map`, in
`config.data.num_workers` worker processes (`mp_prefetch`; 0 decodes in this
process), and depend only on (seed, step): epoch e is the permutation of the split
drawn from (seed, e), the global batch at step k holds positions k*G .. k*G+G-1 of
the stream (G = batch_size * process_count, remainders dropped), process p takes rows
p*batch_size onwards, and each example's augmentation is drawn from (seed, its
position). So `start_step` resumes bit for bit without saved iterator state, and the
global stream does not depend on the process count or the number of workers.

Augmentation (train split only). `augment`: ImageNet-style datasets get a
random-resized crop (scale 0.08-1, ratio 3/4-4/3) and a horizontal flip;
Fashion-MNIST and other fixed-size TFDS datasets a random crop after reflect
padding (2 pixels at 28x28; 1/8 of the side for others) and a horizontal flip;
digits none. Without it, ImageNet-style images are resized so that the shorter
side is image_size / 0.875 and centre-cropped (an image already image_size square is
used as it is). JPEGs are decoded by libjpeg-turbo (simplejpeg) and crops resized by
OpenCV's bilinear interpolation, without an antialiasing filter (as `tf.image.resize`
does; timm's PIL resize filters, at 5x the cost): 1.8x the rate of PIL's decode and
resize, and 2 of 255 from their pixels on average (benchmarks/pipeline_cpu.md).
`rand_augment` then applies timm's RandAugment and `erasing` draws timm's random-erasing
boxes, filled with N(0, 1) noise on the device (`qhnet.data.augment`).

The package, bottom up:

    core.py        DatasetInfo, the errors, the checked config.data settings, split types
    bundled.py     Fashion-MNIST (idx files) and digits, in memory
    folders.py     ImageFolder trees and ImageNet-100
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
