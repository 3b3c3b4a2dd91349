"""Everything about a run that can be checked before anything is compiled or written: the
config against the schema, the devices, the dataset, the schedule the two give, the memory
a step needs at least, and the variables `config.init_from` would start from."""

import os

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from qhnet import config as qhnet_config
from qhnet import data, models
from qhnet.config import ConfigError
from qhnet.training import checkpoints, recipe, workdirs

# The stride of the stem's first convolution, by `model.stem`.
_STEM_STRIDE = {'imagenet': 2, 'small': 1, 'small_stride2': 2}


def validate(config: ml_collections.ConfigDict) -> data.Dataset:
    """Checks every key and value of `config` and that its dataset is present; returns the
    opened dataset.

    Raises ConfigError (a ValueError) naming the bad field and the valid choices,
    data.DatasetNotFoundError with setup instructions, or data.CorruptDatasetError /
    data.CorruptImageError naming a damaged file.
    """
    qhnet_config.validate(config)
    if config.init_from is not None and not checkpoints.has_checkpoints(config.init_from):
        raise ConfigError(f'config.init_from={config.init_from} holds no checkpoints; point it '
                          'at a workdir of qhnet.main or of `python -m qhnet.symmetry slice`, or '
                          'leave it unset')
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    if config.data.num_workers > (cpus or 1):
        logging.warning('config.data.num_workers=%d decoding processes for %d CPUs: more '
                        'workers than CPUs only add memory and switching; set at most %d.',
                        config.data.num_workers, cpus, cpus)
    devices = jax.device_count()
    for path in ('batch_size', 'eval_batch_size'):
        if config[path] % devices:
            raise ConfigError(f'config.{path}={config[path]} must be a multiple of the {devices} '
                              'devices (one equal shard each)')
    dataset = data.open_dataset(config.data)
    info = dataset.info
    if config.model.num_classes != info.num_classes:
        where = (f' ({info.num_classes} class folders under {config.data.data_dir}/train)'
                 if config.data.name == 'imagefolder' else '')
        raise ConfigError(f'config.model.num_classes={config.model.num_classes} but {info.name} '
                          f'has {info.num_classes} classes{where}; set '
                          f'--config.model.num_classes={info.num_classes}')
    per_epoch = recipe.steps_per_epoch(config, info.num_train)
    if per_epoch < 1:
        raise ConfigError(f'config.batch_size={config.batch_size} exceeds the {info.num_train} '
                          f'training images of {info.name}')
    if recipe.warmup_steps(config, per_epoch) >= recipe.total_train_steps(config, per_epoch):
        raise ConfigError(f'config.optimizer.warmup_epochs={config.optimizer.warmup_epochs} '
                          'leaves no steps for the cosine decay')
    _check_memory(config, info)
    if config.init_from is not None:
        _check_init_from(config, info)
    return dataset


def _available_memory() -> int | None:
    """Bytes one device can still allocate: a GPU's or TPU's limit, or the host's available
    memory for the CPU. None where it cannot be told."""
    device = jax.local_devices()[0]
    if device.platform != 'cpu':
        stats = device.memory_stats() or {}
        return stats.get('bytes_limit')
    try:
        with open('/proc/meminfo', encoding='ascii') as f:
            fields = dict(line.split(':', 1) for line in f)
        return int(fields['MemAvailable'].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _check_memory(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> None:
    """Refuses a config whose training step cannot fit on a device: a lower bound of what it
    holds at once (one device's share of the batch as uint8 and float32 images, and the stem
    convolution's output), against what the device has free."""
    available = _available_memory()
    per_device = config.batch_size // jax.device_count()
    height, width, channels = info.image_shape
    stride = _STEM_STRIDE[config.model.stem]
    stem_width = {'resnet50': 64, 'mobilenet_v3_large': 16}.get(
        config.model.name, (config.model.stream_widths or config.model.widths)[0])
    compute_bytes = jnp.dtype(models.DTYPES[config.model.dtype]).itemsize
    needed = per_device * (height * width * channels * (1 + 4) + -(-height // stride)
                           * -(-width // stride) * stem_width * compute_bytes)
    if available is not None and needed > available:
        raise ConfigError(
            f'a training step needs at least {needed / 2**30:,.1f} GiB on each device (a batch '
            f'of {per_device} images of {height}x{width}x{channels} and its stem activations), '
            f'more than the {available / 2**30:,.1f} GiB free; lower config.data.image_size or '
            'config.batch_size')


def _check_init_from(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> None:
    """Refuses a `config.init_from` whose newest checkpoint holds variables of another model
    (by shape and dtype), before the run writes anything."""
    model = models.build(config.model)
    ours = workdirs.leaf_shapes(jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, *info.image_shape)), train=False)))
    store = checkpoints.CheckpointStore(config.init_from, read_only=True)
    try:
        step = store.steps()[0] if store.steps() else None
        theirs = ({} if step is None else
                  workdirs.leaf_shapes(store.variables_metadata(step)))
    finally:
        store.close()
    if step is None:
        raise ConfigError(f'config.init_from={config.init_from} holds no checkpoints; point it '
                          'at a workdir of qhnet.main or of `python -m qhnet.symmetry slice`')
    if ours != theirs:
        differences = [f'{name}: {theirs.get(name)}' for name in workdirs.differing(ours, theirs)][:3]
        raise ConfigError(
            f'config.init_from={config.init_from} (step {step}) holds variables of another '
            f'model (differing: {differences}); pass the config that model was written with '
            "(a sliced model's is <output_workdir>/config.py)")
