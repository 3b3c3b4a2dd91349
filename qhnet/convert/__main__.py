"""Converts a PyTorch state_dict file into a qhnet workdir.

  python -m qhnet.convert --source=qlnet50 --weights=qlnet-50-v0.pth.tar --workdir=DIR
  python -m qhnet.convert --source=resnet50 --weights=resnet50-11ad3fa6.pth --workdir=DIR

--source is 'qlnet50' (the authors' QLNet), 'resnet50' or 'mobilenet_v3_large' (torchvision).
--weights is a PyTorch checkpoint (a bare state_dict or one under 'state_dict'; reading it
needs torch: pip install 'qhnet[torch]') or a .npz of the state_dict's tensors. The model is
the source's config on ImageNet-1k (`qhnet.config.row_config(source, 'imagenet1k')`), or
--config's (e.g. --config=configs/qlnet50.py:imagenet1k --config.data.data_dir=...).

It writes a checkpoint at step 0 (variables and config, no optimizer state) that every
command reading a workdir takes: `python -m qhnet.main ... --workdir=DIR --evaluate_only`,
`python -m qhnet.symmetry verify --workdir=DIR`, `--config.init_from=DIR` to fine-tune;
and DIR/convert.json (source, file, tensors, parameters). Before anything is written it
refuses, with one line and exit status 1: an unknown --source, a config of another model or
of a small-input stem, a missing, truncated or non-state_dict file, and a state_dict that
does not fit the model exactly (tensors missing, extra or of other shapes).
"""

import json
import os
import sys

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from qhnet import config as qhnet_config
from qhnet import convert
from qhnet.training import checkpoints

FLAGS = flags.FLAGS
flags.DEFINE_string('source', None, f'What the file holds: one of {list(convert.SOURCES)}.')
flags.DEFINE_string('weights', None, 'The PyTorch checkpoint (or .npz of its tensors).')
flags.DEFINE_string('workdir', None, 'The workdir to write; it must hold no checkpoints.')
config_flags.DEFINE_config_file('config', None, "The model's config file (default: the "
                                "source's row on 'imagenet1k').", lock_config=True)
flags.mark_flags_as_required(['source', 'weights', 'workdir'])


def run(source: str, weights: str, workdir: str, config=None) -> dict:
    """Converts `weights` of `source` into a checkpoint in `workdir` (module docstring)."""
    if source not in convert.SOURCES:
        raise convert.ConversionError(f'unknown --source={source!r}; valid sources: '
                                      f'{list(convert.SOURCES)}')
    if checkpoints.has_checkpoints(workdir):
        raise convert.ConversionError(f'--workdir={workdir} already holds checkpoints; pass a '
                                      'new --workdir')
    config = config or qhnet_config.row_config(source, 'imagenet1k')
    qhnet_config.validate(config)
    convert.check_source(source, config.model)
    state_dict = convert.load_state_dict(weights)
    variables = convert.to_variables(source, state_dict, config.model)
    checkpoints.save_variables(os.path.abspath(workdir), 0, variables, config)
    summary = {'source': source, 'weights': os.path.abspath(weights), 'workdir': workdir,
               'model': qhnet_config.to_json(config.model), 'tensors': len(state_dict),
               'parameters': int(sum(np.size(x) for x in jax.tree.leaves(variables['params'])))}
    with open(os.path.join(workdir, 'convert.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    try:
        summary = run(FLAGS.source, FLAGS.weights, FLAGS.workdir, FLAGS.config)
    except (convert.ConversionError, qhnet_config.ConfigError,
            checkpoints.CheckpointWriteError) as error:
        sys.exit(f'error: {error}')
    print(f'{summary["source"]}: {summary["tensors"]} tensors -> {summary["parameters"]:,} '
          f'parameters of a {summary["model"]["name"]} model, written to {summary["workdir"]} '
          '(step 0)')


if __name__ == '__main__':
    app.run(main)
