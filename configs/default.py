"""Defaults for every qhnet experiment: the paper's recipe on ImageNet-100.

Every file in `configs/` starts from `get_config()` here and changes only what
differs (the model). A config argument picks the dataset variant:

  python -m qhnet.main --config=configs/<row>.py --workdir=DIR                 # ImageNet-100
  python -m qhnet.main --config=configs/<row>.py:fashion_mnist --workdir=DIR   # offline
  python -m qhnet.main --config=configs/<row>.py:digits --workdir=DIR          # seconds

The recipe (paper section 5.2): timm's ResNeXt-50 training command
(`--lr 0.6 --warmup-epochs 5 --weight-decay 1e-4 --sched cosine -b 192`, timm's
default `--opt sgd`, i.e. momentum 0.9 with Nesterov, and label smoothing 0.1)
with the peak learning rate set to 0.3 and 50 epochs. Our reading of the batch
size: the paper trained on a single GPU with that command, so `-b 192` is the
whole batch and 0.3 is the peak LR at batch 192 (timm takes `--lr` as given, no
scaling). Here the peak LR is `base_lr * batch_size / reference_batch_size`, so
other batch sizes keep the paper's LR per sample. timm applies weight decay to
every parameter with more than one dimension (not to biases or BN). Not
reproduced here: timm's RandAugment, random erasing and cooldown epochs.
"""

import ml_collections
from ml_collections import config_dict

DATASET_VARIANTS = ('imagenet100', 'fashion_mnist', 'digits')


def model_config() -> ml_collections.ConfigDict:
    """The `model` section: what `qhnet.models.build` reads."""
    return ml_collections.ConfigDict(dict(
        # 'qhnet', 'resnet50' or 'mobilenet_v3_large'.
        name='qhnet',
        # QHNet only. Paper equation of the block: 3, 4, 5, 6 or 7.
        equation=3,
        # 'relu', 'hardtanh', 'hardball', 'softball' or 'identity'.
        activation='softball',
        # 'ds': once per stage, after its first block; 'all': after every block.
        placement='ds',
        # Derivative channels per input channel (4, or 6 for the "x6" rows).
        multiplier=4,
        # One bank of `multiplier` 3x3 kernels shared by all channels.
        weight_sharing=True,
        # Explicit channel-mixing maps (DESIGN.md section 3); identity at init.
        mixing=False,
        # 'imagenet': 7x7/2 conv + max pool; 'small': 3x3/1 conv, no pool.
        stem='imagenet',
        widths=(64, 128, 256, 512),
        depths=(3, 4, 6, 3),
        num_classes=100,
        # Compute dtype: 'float32' or 'bfloat16' (parameters stay float32).
        dtype='float32',
        # QHNet only. Recompute each block's activations in the backward pass
        # (jax.checkpoint): less activation memory for more compute.
        remat=False,
        # QHNet only. XLA program for the derivative operator K: 'grouped', 'folded'
        # or 'stencil' (qhnet.derivative); same parameters and results, different speed.
        derivative_impl='stencil',
    ))


def data_config() -> ml_collections.ConfigDict:
    """The `data` section: what `qhnet.data` reads."""
    return ml_collections.ConfigDict(dict(
        # 'imagenet100', 'fashion_mnist', 'digits', or a prepared TFDS dataset name.
        name='imagenet100',
        # None: the dataset's default location (see `qhnet.data`).
        data_dir=config_dict.placeholder(str),
        # 'auto', 'imagefolder' or 'tfds'.
        format='auto',
        image_size=224,
        # None: the dataset's own channel count; 3 converts grayscale to RGB.
        channels=config_dict.placeholder(int),
        augment=True,
        num_workers=8,
        # None: the packaged ImageNet-100 class list (qhnet/imagenet100.txt).
        class_list=config_dict.placeholder(str),
    ))


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """The paper's recipe, with the dataset `variant` applied (default 'imagenet100')."""
    config = ml_collections.ConfigDict()
    config.model = model_config()
    config.data = data_config()
    config.seed = 0

    # Global batch (all devices, all hosts); must divide evenly over the devices.
    config.batch_size = 192
    config.eval_batch_size = 200
    config.num_epochs = 50
    # > 0 overrides num_epochs (the schedule then spans exactly this many steps).
    config.num_train_steps = -1

    config.optimizer = ml_collections.ConfigDict(dict(
        # Peak LR = base_lr * batch_size / reference_batch_size.
        base_lr=0.3,
        reference_batch_size=192,
        momentum=0.9,
        nesterov=True,
        weight_decay=1e-4,
        warmup_epochs=5.0,
        # The LR at the start of warmup and at the end of the cosine decay.
        init_lr=0.0,
        end_lr=0.0,
    ))
    config.label_smoothing = 0.1

    config.checkpoint = ml_collections.ConfigDict(dict(
        # Also saved at the end of every epoch and of training.
        every_steps=1000,
        max_to_keep=3,
    ))
    # A non-finite loss or gradient rolls the run back to its last checkpoint and
    # continues with the learning rate multiplied by lr_factor, at most max_retries
    # times per process (the lowered learning rate is saved with the checkpoints).
    config.breakdown = ml_collections.ConfigDict(dict(
        lr_factor=0.5,
        max_retries=3,
    ))
    config.log_every_steps = 100
    config.progress_bar = True

    # Fault injection for tests; -1 disables.
    config.debug = ml_collections.ConfigDict(dict(
        # Replace the batch of this step with NaN images, the first `inject_nan_times` times.
        inject_nan_at_step=-1,
        inject_nan_times=1,
        # Raise SimulatedCrash after this step, as if the process were killed.
        crash_after_step=-1,
    ))
    apply_variant(config, variant or 'imagenet100')
    return config


def apply_variant(config: ml_collections.ConfigDict, variant: str) -> None:
    """Points `config` at a dataset, with the model size and schedule that suit it."""
    if variant not in DATASET_VARIANTS:
        raise ValueError(f'unknown config argument {variant!r}; valid dataset variants: '
                         f'{list(DATASET_VARIANTS)}')
    if variant == 'imagenet100':
        return
    if variant == 'fashion_mnist':
        # Chosen by experiments/fashion_mnist_sweep.py to pass 92% test accuracy
        # within 15 minutes on 2 CPU cores (README).
        config.data.name = 'fashion_mnist'
        config.data.image_size = 28
        config.data.augment = False
        config.data.num_workers = 1
        config.model.stem = 'small'
        config.model.widths = (16, 32, 128, 256)
        config.model.depths = (1, 1, 1, 1)
        config.model.num_classes = 10
        config.batch_size = 64
        config.eval_batch_size = 500
        config.num_epochs = 4
        config.optimizer.base_lr = 0.8
        config.optimizer.reference_batch_size = 64
        config.optimizer.warmup_epochs = 0.3
        config.optimizer.weight_decay = 5e-5
        config.checkpoint.every_steps = 10_000
        config.log_every_steps = 50
    elif variant == 'digits':
        # scikit-learn's 1797 8x8 digits: a smoke test that trains in seconds.
        config.data.name = 'digits'
        config.data.image_size = 8
        config.data.augment = False
        config.data.num_workers = 1
        config.model.stem = 'small'
        config.model.widths = (16, 32)
        config.model.depths = (1, 1)
        config.model.num_classes = 10
        config.batch_size = 64
        config.eval_batch_size = 128
        config.num_epochs = 10
        config.optimizer.base_lr = 0.1
        config.optimizer.reference_batch_size = 64
        config.optimizer.warmup_epochs = 1.0
        config.checkpoint.every_steps = 10_000
        config.log_every_steps = 10
