"""The one config schema of qhnet: the paper's recipe, the dataset variants and the Table 1 rows.

Every experiment is a `ml_collections.ConfigDict` made here; its keys and their
defaults are the schema that `train.validate_config`, `models.validate` and `data`
check against, so a key exists in one place only.

    from qhnet import config, models
    cfg = config.row_config('eq3_softball', 'fashion_mnist')   # a Table 1 row, offline data
    model = models.build(cfg.model)

The files in the repository's `configs/` are thin wrappers for the command line
(`python -m qhnet.main --config=configs/<row>.py[:variant]`).

The recipe (paper section 5.2): timm's ResNeXt-50 training command (`--lr 0.6
--warmup-epochs 5 --epochs 240 --weight-decay 1e-4 --sched cosine --reprob 0.4
--recount 3 --remode pixel --aa rand-m7-mstd0.5-inc1 -b 192 --amp`, timm's default
`--opt sgd`, i.e. momentum 0.9 with Nesterov, and label smoothing 0.1) with the peak
learning rate set to 0.3 and 50 epochs, on one GPU. Our reading of the batch size:
`-b 192` is the whole batch and 0.3 the peak LR at batch 192 (timm takes `--lr` as
given). Here the peak LR is `base_lr * batch_size / reference_batch_size`, so other
batch sizes keep the paper's LR per sample. timm applies weight decay to every
parameter with more than one dimension (not to biases or BN). RandAugment and random
erasing follow timm's definitions (`qhnet.augment`); on for ImageNet-100, off for the
small datasets. Not reproduced: timm's cooldown epochs (docs/fidelity.md).
"""

import dataclasses

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
        # 'ds': after every downsampling block and after the last block; 'all': after every block.
        placement='ds',
        # Derivative channels per input channel (4, or 6 for the "x6" rows).
        multiplier=4,
        # One bank of `multiplier` 3x3 kernels shared by all channels.
        weight_sharing=True,
        # Explicit channel-mixing maps (docs/design.md, 'Streams and groups'); identity at init.
        mixing=False,
        # 'imagenet': 7x7/2 conv + max pool; 'small': 3x3/1 conv, no pool (MobileNetV3:
        # a stride-1 stem conv); 'small_stride2': 3x3/2 conv, no pool (MobileNetV3: its
        # ImageNet stem). Every model reads it.
        stem='imagenet',
        # Per stage: the width (ResNet50: the bottleneck's, expansion 4) and the number of
        # blocks. QHNet and ResNet50 read them; MobileNetV3 keeps torchvision's table.
        widths=(64, 128, 256, 512),
        depths=(3, 4, 6, 3),
        num_classes=100,
        # Compute dtype: 'float32' or 'bfloat16' (parameters stay float32).
        dtype='float32',
        # QHNet only. Recompute each block's activations in the backward pass
        # (jax.checkpoint): less activation memory for more compute.
        remat=False,
        # QHNet only. XLA program for the derivative operator K: 'grouped', 'folded'
        # or 'stencil' (qhnet.derivative); same parameters and results, different speed
        # ('stencil' is the fastest on the CPU and on an H200).
        derivative_impl='stencil',
        # QHNet, Eq. (3) with mixing only: each stage's residual-stream width, when it is
        # narrower than `widths` (a model sliced by `python -m qhnet.symmetry slice`).
        stream_widths=config_dict.placeholder(tuple),
    ))


def data_config() -> ml_collections.ConfigDict:
    """The `data` section: what `qhnet.data` reads."""
    return ml_collections.ConfigDict(dict(
        # 'imagenet100', 'imagefolder', 'fashion_mnist', 'digits', or a prepared TFDS dataset.
        name='imagenet100',
        # None: the dataset's default location (see `qhnet.data`).
        data_dir=config_dict.placeholder(str),
        # imagenet100 only: 'auto', 'imagefolder' or 'tfds'.
        format='auto',
        image_size=224,
        # None: the dataset's own channel count; 3 converts grayscale to RGB.
        channels=config_dict.placeholder(int),
        # Training split only: random crop and horizontal flip.
        augment=True,
        # Training split only: timm's RandAugment rand-m{magnitude}-mstd{std}-inc1 (2 ops).
        rand_augment=True,
        rand_augment_magnitude=7.0,
        rand_augment_std=0.5,
        # Training split only: random erasing with this probability (0: off), per-pixel
        # N(0, 1) noise in up to `erasing_count` regions.
        erasing=0.4,
        erasing_count=3,
        # Decoding worker processes (grain); 0 decodes in the training process.
        num_workers=8,
        # imagenet100: None is the packaged class list (qhnet/imagenet100.txt).
        # imagefolder: None takes every folder of train/.
        class_list=config_dict.placeholder(str),
    ))


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """The paper's recipe, with the dataset `variant` applied (default 'imagenet100')."""
    config = ml_collections.ConfigDict()
    config.model = model_config()
    config.data = data_config()
    config.seed = 0
    # A workdir whose newest checkpoint's variables start this run (a fresh optimizer at
    # step 0; e.g. a sliced model's, to fine-tune it); None: a random initialisation. Only
    # read when --workdir holds no checkpoint yet.
    config.init_from = config_dict.placeholder(str)

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
        # The depths and the recipe from experiments/fashion_mnist_sweep.py (with the
        # earlier activation placement), then base_lr 0.8 -> 1.2 (about +0.3 on each of
        # seeds 0-2 with the paper's placement), then a stride-2 stem with stages 1 and 2
        # twice as wide: the same accuracy at about 1.8x the images/s (README;
        # experiments/fashion_mnist_run/README.md).
        config.data.name = 'fashion_mnist'
        config.data.image_size = 28
        config.data.augment = False
        config.data.rand_augment = False
        config.data.erasing = 0.0
        config.data.num_workers = 0
        config.model.stem = 'small_stride2'
        config.model.widths = (32, 64, 128, 256)
        config.model.depths = (1, 1, 1, 1)
        config.model.num_classes = 10
        config.batch_size = 64
        config.eval_batch_size = 500
        config.num_epochs = 5
        config.optimizer.base_lr = 1.2
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
        config.data.rand_augment = False
        config.data.erasing = 0.0
        config.data.num_workers = 0
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


# Table 1.

@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the paper's Table 1: its model fields and the paper's figures."""
    title: str
    model: dict
    paper_params: float
    paper_top1: float


_DS = dict(name='qhnet', placement='ds')
# Table 1 gives no activation for Eq. (4), (6) and (7); those rows use softball@ds.
ROWS = {
    'resnet50': Row('ResNet50', dict(name='resnet50'), 23.7e6, 84.52),
    'mobilenet_v3_large': Row('MobileNet_v3_large', dict(name='mobilenet_v3_large'), 4.33e6, 82.91),
    'eq3_relu_all': Row('Eq. (3) relu@all', dict(_DS, equation=3, activation='relu',
                                                 placement='all'), 8.61e6, 82.06),
    'eq3_hardtanh': Row('Eq. (3) hardtanh@ds', dict(_DS, equation=3, activation='hardtanh'),
                        8.61e6, 82.34),
    'eq3_hardball': Row('Eq. (3) hardball@ds', dict(_DS, equation=3, activation='hardball'),
                        8.61e6, 83.50),
    'eq3_softball': Row('Eq. (3) softball@ds', dict(_DS, equation=3, activation='softball'),
                        8.61e6, 83.66),
    'eq3_nows': Row('Eq. (3) no ws', dict(_DS, equation=3, activation='softball',
                                          weight_sharing=False), 8.73e6, 84.24),
    'eq3_nows_x6': Row('Eq. (3) no ws, x6', dict(_DS, equation=3, activation='softball',
                                                 weight_sharing=False, multiplier=6),
                       13.0e6, 84.58),
    'eq4': Row('Eq. (4)', dict(_DS, equation=4, activation='softball'), 5.70e6, 81.88),
    'eq5_softball': Row('Eq. (5)', dict(_DS, equation=5, activation='softball'), 4.26e6, 78.64),
    'eq6': Row('Eq. (6)', dict(_DS, equation=6, activation='softball'), 5.61e6, 82.52),
    'eq7_nows_x6': Row('Eq. (7) no ws, x6', dict(_DS, equation=7, activation='softball',
                                                 weight_sharing=False, multiplier=6),
                       13.0e6, 84.96),
}


def row_config(row: str, variant: str | None = None) -> ml_collections.ConfigDict:
    """The config of Table 1 row `row` (a key of `ROWS`) on dataset `variant`."""
    if row not in ROWS:
        raise ValueError(f'unknown Table 1 row {row!r}; valid rows: {list(ROWS)}')
    config = get_config(variant)
    config.model.update(ROWS[row].model)
    return config


# Checking a config against the schema.

def check_section(section, schema: ml_collections.ConfigDict, where: str) -> None:
    """Raises ValueError if `section` lacks a key of `schema` or has one it does not, naming
    them, the valid keys and the fix; then checks nested sections the same way."""
    expected = {key: schema[key] for key in schema.keys()}
    keys = set(section.keys())
    unknown = sorted(keys - set(expected))
    missing = sorted(set(expected) - keys)
    if unknown:
        raise ValueError(f'unknown key(s) {unknown} in {where}; valid keys: {list(expected)}')
    if missing:
        raise ValueError(f'{where} lacks {missing}; start from qhnet.config.get_config() '
                         '(or a file in configs/), which has every key')
    for key, value in expected.items():
        if isinstance(value, ml_collections.ConfigDict):
            child = section[key]
            if not isinstance(child, (ml_collections.ConfigDict, dict)):
                raise ValueError(f'{where}.{key} must be a section with keys {list(value.keys())}, '
                                 f'got {child!r}')
            check_section(child, value, f'{where}.{key}')


def check_keys(config: ml_collections.ConfigDict) -> None:
    """Every key of a whole experiment config, against `get_config()`."""
    check_section(config, get_config(), 'config')
