"""`python -m qhnet.main --evaluate_only`: the newest checkpoint of a workdir (a training run's,
or a converted model's) scored once on the test split of the command's dataset, and the scores
written to `<workdir>/evaluation.json`. Nothing is trained, and no checkpoint is written."""

import json
import os
from typing import Any

from absl import logging
import jax
import ml_collections

from qhnet import config as qhnet_config
from qhnet import data
from qhnet.config import ConfigError
from qhnet.training import checkpoints, evaluation, workdirs

EVALUATION_FILE = 'evaluation.json'


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Top-1, top-5 and mean loss of the newest checkpoint in `workdir` on the test split of
    `config.data`, with the step, the dataset and its number of images; also written to
    `<workdir>/evaluation.json` (by process 0).

    Raises CheckpointRestoreError if `workdir` has no checkpoint that reads back,
    IncompatibleWorkdirError if its model is not `config.model` (settings that change only how
    the model computes may differ), ConfigError if the dataset's class count is not the model's.
    """
    qhnet_config.validate(config)
    if config.eval_batch_size % jax.device_count():
        raise ConfigError(f'config.eval_batch_size={config.eval_batch_size} must be a multiple '
                          f'of the {jax.device_count()} devices (one equal shard each)')
    step, stored, variables = checkpoints.restore_variables(
        workdir, trust_unverified=config.checkpoint.trust_unverified)
    # The model fields of the experiment's identity: those that fix what the variables mean.
    ours, theirs = ({name: value for name, value in workdirs.identity(c).items()
                     if name.startswith('model.')} for c in (config, stored))
    differences = [f'{name}: checkpoint has {theirs.get(name)!r}, --config has '
                   f'{ours.get(name)!r}' for name in workdirs.differing(ours, theirs)]
    if differences:
        raise workdirs.IncompatibleWorkdirError(
            f'the checkpoint of step {step} in {workdir} is another model than --config '
            f'describes ({"; ".join(differences)}); pass the config it was written with')
    dataset = data.open_dataset(config.data)
    info = dataset.info
    if info.num_classes != config.model.num_classes:
        raise ConfigError(f'the model has {config.model.num_classes} classes but {info.name} '
                          f'has {info.num_classes}; pass the dataset it classifies '
                          '(--config.data.name, --config.data.data_dir)')
    scores = evaluation.evaluate(config, variables, dataset=dataset)
    record = {'dataset': config.data.name, 'data_dir': config.data.data_dir, 'step': step,
              'images': info.num_test, **scores}
    logging.info('Step %d of %s on %s (%s test images): top-1 %.2f%%, top-5 %.2f%%, loss %.4f',
                 step, workdir, info.name, f'{info.num_test:,}', 100 * scores['top1'],
                 100 * scores['top5'], scores['loss'])
    if jax.process_index() == 0:
        path = os.path.join(workdir, EVALUATION_FILE)
        try:
            with open(path, 'w', encoding='utf-8') as f:
                json.dump(record, f, indent=2)
        except OSError as error:
            logging.warning('Could not write %s (%s).', path, error.strerror or error)
    return record
