"""The one config schema of qhnet: every key with its type and range, the paper's recipe, the
dataset variants and the Table 1 rows.

Every experiment is a `ml_collections.ConfigDict` made here. `SCHEMA` declares each key once:
its default, what it may hold and what it means. `validate(config)` checks a config against
it (keys, types, ranges, choices, the rules that tie keys together) and raises `ConfigError`
naming the key and the fix; `models.build` and `data.open_dataset` check their sections so.

    from qhnet import config, models
    cfg = config.row_config('eq3_softball', 'fashion_mnist')   # a Table 1 row, offline data
    model = models.build(cfg.model)

The files in `configs/` wrap it for the command line (`python -m qhnet.main --config=...`).

The recipe is the paper's reading of timm's ResNeXt-50 command (SGD with Nesterov momentum,
5 warmup epochs then cosine decay, peak LR 0.3 at batch 192 scaled with the batch size, weight
decay 1e-4 on tensors of more than one dimension, label smoothing 0.1, RandAugment and random
erasing, 50 epochs); docs/fidelity.md sets each choice beside the paper and timm.
"""

import dataclasses
import functools
import json
import math
import numbers
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict
import numpy as np

DATASET_VARIANTS = ('imagenet100', 'imagenet1k', 'fashion_mnist', 'digits')
MODEL_NAMES = ('qhnet', 'qlnet', 'resnet50', 'mobilenet_v3_large')
EQUATIONS = (3, 4, 5, 6, 7)
ACTIVATIONS = ('relu', 'hardtanh', 'hardball', 'softball', 'identity')
PLACEMENTS = ('ds', 'all')
STEMS = ('imagenet', 'small', 'small_stride2')
DTYPES = ('float32', 'bfloat16')
DERIVATIVE_IMPLS = ('grouped', 'folded', 'stencil')
BLOCK_IMPLS = ('auto', 'xla', 'pallas')
DATA_FORMATS = ('auto', 'imagefolder', 'tfds')
MAX_SEED = 2**32 - 1


class ConfigError(ValueError):
    """A config key or value is invalid; raised before anything is compiled or written."""


@dataclasses.dataclass(frozen=True)
class Field:
    """One config key: its default, what it may hold, and what it means.

    `kind` is 'int', 'float' (an int is accepted), 'bool', 'str' or 'ints' (a non-empty tuple
    of positive ints). Numbers must be finite and lie in [low, high] (open ends where
    `low_open` / `high_open`); `choices`, if given, lists every valid value; `optional` admits
    None.
    """
    default: Any
    help: str
    kind: str
    choices: tuple = ()
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    optional: bool = False

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` for this key, or None."""
        if value is None:
            return None if self.optional else 'must be set'
        if self.choices:
            ok = value in self.choices and _is_kind(value, self.kind)
            return None if ok else f'must be one of {[None] * self.optional + list(self.choices)}'
        if self.kind == 'ints':
            ok = (isinstance(value, (tuple, list)) and len(value) > 0
                  and all(_is_kind(v, 'int') and v >= 1 for v in value))
            return None if ok else 'must be a non-empty sequence of positive integers'
        if not _is_kind(value, self.kind):
            return f'must be {_KINDS[self.kind][1]}'
        if self.kind in ('int', 'float'):
            below = value <= self.low if self.low_open else value < self.low
            above = value >= self.high if self.high_open else value > self.high
            if below or above or not -math.inf < value < math.inf:
                return f'must be {_KINDS[self.kind][1]} in {self.bounds}'
        if self.kind == 'str' and not value:
            return 'must be a non-empty string'
        return None

    @property
    def bounds(self) -> str:
        def end(x):
            return 'inf' if x == math.inf else f'{x:d}' if float(x).is_integer() else f'{x:g}'
        return (f'{"(" if self.low_open else "["}{end(self.low)}, {end(self.high)}'
                f'{")" if self.high_open or self.high == math.inf else "]"}')


_KINDS = {'int': (numbers.Integral, 'an integer'), 'float': (numbers.Real, 'a finite number'),
          'bool': ((bool, np.bool_), 'True or False'), 'str': (str, 'a string')}


def _is_kind(value: Any, kind: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return kind == 'bool'
    return kind == 'ints' or isinstance(value, _KINDS[kind][0])


_count = functools.partial(Field, kind='int', low=1)  # a positive integer unless told
_fraction = functools.partial(Field, kind='float', low=0, high=1)
_rate = functools.partial(Field, kind='float', low=0)  # a non-negative number


MODEL = dict(
    name=Field('qhnet', "The network: QHNet, 'qlnet' (the authors' released ImageNet-1k "
               'model, `RELEASED`) or a baseline.', 'str', MODEL_NAMES),
    equation=Field(3, 'QHNet only. Paper equation of the block.', 'int', EQUATIONS),
    activation=Field('softball', 'QHNet, QLNet. The activation of the blocks that carry one.',
                     'str', ACTIVATIONS),
    placement=Field('ds', "QHNet, QLNet. 'ds': after every downsampling block and after the last "
                    "block; 'all': after every block.", 'str', PLACEMENTS),
    multiplier=_count(4, 'QHNet only. Derivative channels per input channel (4, or 6 for the '
                      '"x6" rows).', high=64),
    weight_sharing=Field(True, 'QHNet only. One bank of `multiplier` 3x3 kernels shared by all '
                         'channels.', 'bool'),
    mixing=Field(False, "QHNet only. Explicit channel-mixing maps (docs/design.md, 'Streams "
                 "and groups'); identity at init.", 'bool'),
    stem=Field('imagenet', "'imagenet': 7x7/2 conv + max pool; 'small': 3x3/1 conv, no pool "
               "(MobileNetV3: a stride-1 stem conv); 'small_stride2': 3x3/2 conv, no pool "
               '(MobileNetV3: its ImageNet stem). Every model reads it.', 'str', STEMS),
    widths=Field((64, 128, 256, 512), "Per stage, the width (ResNet50: the bottleneck's, "
                 'expansion 4). QHNet and ResNet50 read it; MobileNetV3 keeps its own table.',
                 'ints'),
    depths=Field((3, 4, 6, 3), 'Per stage, the number of blocks (QHNet, ResNet50).', 'ints'),
    num_classes=_count(100, 'Classes of the head; must be the dataset\'s.'),
    dtype=Field('float32', 'Compute dtype (parameters stay float32).', 'str', DTYPES),
    remat=Field(False, "QHNet, QLNet. Recompute each block's activations in the backward pass "
                '(jax.checkpoint): less activation memory for more compute.', 'bool'),
    derivative_impl=Field('stencil', 'QHNet, QLNet. XLA program for the derivative operator K '
                          '(qhnet.models.derivative); same parameters and results, different '
                          'speed.', 'str', DERIVATIVE_IMPLS),
    block_impl=Field('auto', "QHNet. 'pallas': Eq. (3)'s product as fused kernels "
                     "(qhnet.models.fused; blocks without mixing maps); 'xla': as layers; 'auto': "
                     'per platform. Same parameters and results.', 'str', BLOCK_IMPLS),
    stream_widths=Field(None, "QLNet, or QHNet of Eq. (3) with mixing: each stage's residual-"
                        'stream width, narrower than `widths` (a model sliced by `python -m '
                        'qhnet.symmetry slice`).', 'ints', optional=True),
)

DATA = dict(
    name=Field('imagenet100', "'imagenet100', 'imagenet1k', 'imagefolder', 'fashion_mnist', "
               "'digits', or a TFDS dataset prepared as array_record.", 'str'),
    data_dir=Field(None, "Where the dataset is; None: the dataset's default location "
                   '(qhnet.data).', 'str', optional=True),
    format=Field('auto', 'imagenet100 only: how data_dir holds it.', 'str', DATA_FORMATS),
    image_size=_count(224, 'Side of the square images the model reads.', high=8192, optional=True),
    channels=Field(None, "None: the dataset's own channel count; 3 converts grayscale to RGB.",
                   'int', (1, 3), optional=True),
    augment=Field(True, 'Training split only: random crop and horizontal flip.', 'bool'),
    rand_augment=Field(True, "Training split only: timm's RandAugment "
                       'rand-m{magnitude}-mstd{std}-inc1 (2 ops).', 'bool'),
    rand_augment_magnitude=Field(7.0, 'RandAugment magnitude.', 'float', low=0, high=10),
    rand_augment_std=Field(0.5, 'RandAugment magnitude noise.', 'float', low=0, high=10),
    erasing=_fraction(0.4, 'Training split only: random erasing with this probability (0: '
                      'off), per-pixel N(0, 1) noise in up to `erasing_count` regions.'),
    erasing_count=_count(3, 'Most regions one image gets erased.', high=100),
    num_workers=_count(8, 'Decoding worker processes (grain); 0 decodes in the training '
                       'process.', low=0, high=1024),
    class_list=Field(None, 'A file of class folder names, one a line. imagenet100: None is the '
                     'packaged list (qhnet/imagenet100.txt); imagefolder: None takes every '
                     'folder of train/.', 'str', optional=True),
    eval_resize=Field(None, "Central crops (evaluation; training without augment). None: OpenCV's "
                      "bilinear resize of the central box (no antialiasing); 'pil': timm's, the "
                      "shorter side resized to image_size / 0.875 by PIL's bilinear (antialiased), "
                      'then the central square.', 'str', ('pil',), optional=True),
)

OPTIMIZER = dict(
    base_lr=_rate(0.3, 'Peak LR = base_lr * batch_size / reference_batch_size.', low_open=True),
    reference_batch_size=_count(192, 'The batch size at which base_lr is the peak LR.'),
    momentum=_fraction(0.9, 'SGD momentum.', high_open=True),
    nesterov=Field(True, 'Nesterov momentum.', 'bool'),
    weight_decay=_rate(1e-4, 'Added to the gradient of every tensor of more than one dimension.'),
    warmup_epochs=_rate(5.0, 'Linear warmup from init_lr to the peak.'),
    init_lr=_rate(0.0, 'The LR at the start of warmup.'),
    end_lr=_rate(0.0, 'The LR at the end of the cosine decay.'),
)

SCHEMA = dict(
    model=MODEL,
    data=DATA,
    seed=_count(0, 'Seeds the initialisation, data order and augmentation.', low=0, high=MAX_SEED),
    init_from=Field(None, "A workdir whose newest checkpoint's variables start this run (a "
                    'fresh optimizer at step 0; e.g. a sliced model\'s, to fine-tune it); only '
                    'read when --workdir holds no checkpoint yet.', 'str', optional=True),
    batch_size=_count(192, 'Global batch (all devices and hosts); a multiple of the device count.'),
    eval_batch_size=_count(200, 'Global evaluation batch; a multiple of the device count.'),
    num_epochs=_rate(50.0, 'Epochs of training.', low_open=True),
    num_train_steps=_count(-1, '> 0: the schedule spans this many steps, not num_epochs.', low=-1),
    optimizer=OPTIMIZER,
    label_smoothing=_fraction(0.1, 'Label smoothing of the training loss.', high_open=True),
    checkpoint=dict(
        every_steps=_count(1000, 'Also saved at the end of every epoch and of training.'),
        max_to_keep=_count(3, 'Newest checkpoints kept.'),
        trust_unverified=Field(False, 'Resume from checkpoints without any content digest '
                               '(checkpoint_digests/ deleted): they cannot be verified.', 'bool'),
    ),
    breakdown=dict(
        lr_factor=_fraction(0.5, 'A non-finite loss or gradient rolls the run back to its last '
                            'checkpoint, with the LR times this.', low_open=True, high_open=True),
        max_retries=_count(3, 'Rollbacks allowed per process before the run gives up.', low=0),
    ),
    log_every_steps=_count(100, 'Training metrics are logged every this many steps.'),
    progress_bar=Field(True, 'A tqdm progress bar over the images trained.', 'bool'),
)
_RETIRED_KEYS = ('debug',)  # keys of older stored configs that the schema no longer has


def _section(schema: Mapping[str, Any]) -> ml_collections.ConfigDict:
    values = {}
    for key, field in schema.items():
        if isinstance(field, Mapping):
            values[key] = _section(field)
        elif field.default is None:
            values[key] = config_dict.placeholder({'ints': tuple, 'int': int,
                                                   'str': str}[field.kind])
        else:
            values[key] = field.default
    return ml_collections.ConfigDict(values)


def model_config() -> ml_collections.ConfigDict:
    """The `model` section at its defaults: what `qhnet.models.build` reads."""
    return _section(MODEL)


def data_config() -> ml_collections.ConfigDict:
    """The `data` section at its defaults: what `qhnet.data.open_dataset` reads."""
    return _section(DATA)


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """The paper's recipe, with the dataset `variant` applied (default 'imagenet100')."""
    config = _section(SCHEMA)
    apply_variant(config, variant or 'imagenet100')
    return config


def apply_variant(config: ml_collections.ConfigDict, variant: str) -> None:
    """Points `config` at a dataset, with the model size and schedule that suit it."""
    if variant not in DATASET_VARIANTS:
        raise ValueError(f'unknown config argument {variant!r}; valid dataset variants: '
                         f'{list(DATASET_VARIANTS)}')
    if variant == 'imagenet1k':  # every class folder, evaluated with timm's transform
        config.data.update(name='imagenet1k', eval_resize='pil')
        config.model.num_classes = 1000
    if variant in ('imagenet100', 'imagenet1k'):  # the paper's recipe
        return
    small_data = dict(augment=False, rand_augment=False, erasing=0.0, num_workers=0)
    config.checkpoint.every_steps = 10_000
    if variant == 'fashion_mnist':
        # A stride-2 stem puts stage 1 at 14x14; one block per stage, 5 epochs.
        config.data.update(name='fashion_mnist', image_size=28, **small_data)
        config.model.update(stem='small_stride2', widths=(32, 64, 128, 256), depths=(1, 1, 1, 1),
                            num_classes=10)
        config.update(batch_size=64, eval_batch_size=500, num_epochs=5, log_every_steps=50)
        config.optimizer.update(base_lr=1.2, reference_batch_size=64, warmup_epochs=0.3,
                                weight_decay=5e-5)
    elif variant == 'digits':
        # scikit-learn's 1797 8x8 digits: a smoke test that trains in seconds.
        config.data.update(name='digits', image_size=8, **small_data)
        config.model.update(stem='small', widths=(16, 32), depths=(1, 1), num_classes=10)
        config.update(batch_size=64, eval_batch_size=128, num_epochs=10, log_every_steps=10)
        config.optimizer.update(base_lr=0.1, reference_batch_size=64, warmup_epochs=1.0)


# Table 1.

@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the paper's Table 1: its model fields and the paper's figures."""
    title: str
    model: dict
    paper_params: float
    paper_top1: float


def _qhnet(equation: int, activation: str = 'softball', **fields) -> dict:
    return dict(name='qhnet', equation=equation, activation=activation, placement='ds', **fields)


# Table 1 gives no activation for Eq. (4), (6) and (7); those rows use softball@ds.
_NO_WS_X6 = dict(weight_sharing=False, multiplier=6)
ROWS = {
    'resnet50': Row('ResNet50', dict(name='resnet50'), 23.7e6, 84.52),
    'mobilenet_v3_large': Row('MobileNet_v3_large', dict(name='mobilenet_v3_large'), 4.33e6, 82.91),
    'eq3_relu_all': Row('Eq. (3) relu@all', {**_qhnet(3, 'relu'), 'placement': 'all'}, 8.61e6,
                        82.06),
    'eq3_hardtanh': Row('Eq. (3) hardtanh@ds', _qhnet(3, 'hardtanh'), 8.61e6, 82.34),
    'eq3_hardball': Row('Eq. (3) hardball@ds', _qhnet(3, 'hardball'), 8.61e6, 83.50),
    'eq3_softball': Row('Eq. (3) softball@ds', _qhnet(3), 8.61e6, 83.66),
    'eq3_nows': Row('Eq. (3) no ws', _qhnet(3, weight_sharing=False), 8.73e6, 84.24),
    'eq3_nows_x6': Row('Eq. (3) no ws, x6', _qhnet(3, **_NO_WS_X6), 13.0e6, 84.58),
    'eq4': Row('Eq. (4)', _qhnet(4), 5.70e6, 81.88),
    'eq5_softball': Row('Eq. (5)', _qhnet(5), 4.26e6, 78.64),
    'eq6': Row('Eq. (6)', _qhnet(6), 5.61e6, 82.52),
    'eq7_nows_x6': Row('Eq. (7) no ws, x6', _qhnet(7, **_NO_WS_X6), 13.0e6, 84.96),
}


# The authors' model released after the paper (QLNet, liuyao/QLNet on Hugging Face): its
# figures are its model card's, ImageNet-1k at 1000 classes. 'qlnet' reads the QHNet fields
# activation, placement, stem, widths, depths and remat; its block is fixed (models.blocks).
RELEASED = {'qlnet50': Row('QLNet-50 (released)', dict(name='qlnet', activation='hardball'),
                           9_993_640, 78.61)}


def row_config(row: str, variant: str | None = None) -> ml_collections.ConfigDict:
    """The config of Table 1 row `row` (a key of `ROWS`, or of `RELEASED`) on `variant`."""
    rows = {**ROWS, **RELEASED}
    if row not in rows:
        raise ValueError(f'unknown row {row!r}; valid rows: {list(rows)}')
    config = get_config(variant)
    config.model.update(rows[row].model)
    return config


# Validation.

def validate(config: ml_collections.ConfigDict) -> None:
    """Checks a whole experiment config against `SCHEMA`; raises ConfigError naming the first
    problem and the fix. Checks that need the dataset or the devices are the trainer's."""
    _check(config, SCHEMA, 'config')
    _check_model_rules(config.model)


def validate_section(section: ml_collections.ConfigDict, name: str) -> None:
    """Checks one section ('model' or 'data') of a config, as `validate` does."""
    _check(section, SCHEMA[name], f'config.{name}')
    if name == 'model':
        _check_model_rules(section)


def _check(section: Any, schema: Mapping[str, Any], where: str) -> None:
    if not isinstance(section, (ml_collections.ConfigDict, Mapping)):
        raise ConfigError(f'{where} must be a section with keys {list(schema)}, got {section!r}')
    keys = set(section.keys())
    unknown, missing = sorted(keys - set(schema)), sorted(set(schema) - keys)
    if unknown:
        raise ConfigError(f'unknown key(s) {unknown} in {where}; valid keys: {list(schema)}')
    if missing:
        raise ConfigError(f'{where} lacks {missing}; start from qhnet.config.get_config() (or a '
                          'file in configs/), which has every key')
    for key, field in schema.items():
        if isinstance(field, Mapping):
            _check(section[key], field, f'{where}.{key}')
        elif problem := field.problem(section[key]):
            raise ConfigError(f'{where}.{key} {problem}, got {_short(section[key])}')


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f'{text[:60]}... ({len(text)} characters)'


def _check_model_rules(model: ml_collections.ConfigDict) -> None:
    """The rules that tie model keys together."""
    widths, depths = tuple(model.widths), tuple(model.depths)
    if len(widths) != len(depths):
        raise ConfigError(f'config.model.widths {widths} and config.model.depths {depths} must '
                          'have one entry per stage, the same number')
    if model.name not in ('qhnet', 'qlnet'):
        return
    if model.stream_widths is not None:
        streams = tuple(model.stream_widths)
        if len(streams) != len(widths) or any(k > n for k, n in zip(streams, widths)):
            raise ConfigError(f'config.model.stream_widths {streams} must give each of the '
                              f'{len(widths)} stages a width between 1 and its model.widths '
                              f'{widths}, or be None')
        if model.name == 'qhnet' and (model.equation != 3 or not model.mixing):
            raise ConfigError('config.model.stream_widths (a sliced model) needs a QLNet, or '
                              'model.equation=3 and model.mixing=True; got equation '
                              f'{model.equation}, mixing {model.mixing}')
    if model.name == 'qhnet' and model.equation == 5:
        for n, n_out in zip(widths, widths[1:]):
            if n_out % n or model.multiplier % (n_out // n):
                raise ConfigError(
                    f"Eq. (5) sums the {model.multiplier} products of each channel into n'/n "
                    f'groups, so each width ratio must divide config.model.multiplier; widths '
                    f'{widths} have {n} -> {n_out}')


# Configs as JSON (what checkpoints store).

def to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`config` as plain JSON data (tuples become lists, unset placeholders None)."""
    return json.loads(config.to_json_best_effort())


def from_json(data: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The inverse of `to_json`. Keys the schema gained since get None where that is their
    default (they leave an older run's function as it was); retired keys are dropped."""
    def tuples(value):
        if isinstance(value, Mapping):
            return {key: tuples(item) for key, item in value.items()}
        return tuple(map(tuples, value)) if isinstance(value, list) else value

    def with_new_keys(stored: dict, schema: Mapping[str, Any]) -> dict:
        for key, field in schema.items():
            if isinstance(field, Mapping):
                if isinstance(stored.get(key), dict):
                    with_new_keys(stored[key], field)
            elif key not in stored and field.default is None:
                stored[key] = None
        return stored

    stored = {key: value for key, value in tuples(data).items() if key not in _RETIRED_KEYS}
    return ml_collections.ConfigDict(with_new_keys(stored, SCHEMA))
