"""Trains and evaluates one config; resumes the run already in --workdir, if any.

  python -m qhnet.main --config=configs/eq3_softball.py:fashion_mnist --workdir=/tmp/qhnet-fmnist
  python -m qhnet.main --config=configs/resnet50.py --workdir=DIR --config.batch_size=256
  python -m qhnet.main --config=configs/resnet50.py:imagenet1k --workdir=DIR --evaluate_only \
      --config.data.data_dir=/data/imagenet  # scores DIR's newest checkpoint, trains nothing

Multi-host (one process per host, e.g. a TPU pod slice or a GPU cluster): add
--multihost (or set QHNET_MULTIHOST=1) and start the same command on every host;
jax.distributed.initialize() then finds the coordinator from the cluster
environment (TPU, SLURM, Open MPI), or from --coordinator_address,
--num_processes and --process_id.
"""

import logging as std_logging
import os
import sys
import threading
import warnings

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from qhnet import allocator, data, training
from qhnet.config import ConfigError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'A config file from configs/, optionally with a dataset variant after a '
    "colon: 'imagenet100' (default), 'imagenet1k', 'fashion_mnist' or 'digits'.",
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics.jsonl, TensorBoard events, '
                    'summary.json and curves.png go.')
flags.DEFINE_bool('multihost', os.environ.get('QHNET_MULTIHOST', '0') not in ('', '0'),
                  'Call jax.distributed.initialize() before anything else (default from '
                  'QHNET_MULTIHOST).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (with --multihost).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (with --multihost).')
flags.DEFINE_integer('process_id', None, 'This process (with --multihost).')
flags.DEFINE_bool('evaluate_only', False, "Score the newest checkpoint of --workdir on the test "
                  "split of --config's dataset, once; write <workdir>/evaluation.json and exit. "
                  'Trains nothing and writes no checkpoint.')
flags.mark_flags_as_required(['config', 'workdir'])



class _OrbaxInfoFilter(std_logging.Filter):
    """Drops orbax's INFO records (several per checkpoint); its warnings still show."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


# Errors that explain themselves: shown as one line, without a traceback.
_USER_ERRORS = (ConfigError, data.DatasetNotFoundError, data.CorruptDatasetError,
                data.CorruptImageError, training.IncompatibleWorkdirError, training.WorkdirError,
                training.TrainingDivergedError, training.CheckpointWriteError,
                training.CheckpointRestoreError)


def _one_line(error: BaseException) -> str:
    """The gist of a config-loading error: its last line if it quotes a traceback, flattened."""
    text = str(error)
    if 'Traceback' in text:
        text = text.strip().splitlines()[-1]
    text = ' '.join(text.replace('\\n', ' ').replace("\\'", "'").split())
    if len(text) > 1 and text[0] == text[-1] and text[0] in '\'"':
        text = text[1:-1]
    return f'unknown key {text}' if isinstance(error, AttributeError) else text


def _config_error(argv: list[str], error: BaseException) -> str:
    config_args = ' '.join(arg for arg in argv[1:] if arg.startswith('--config'))
    return (f'error: bad --config ({config_args}): {_one_line(error)}. Pass --helpfull for the '
            'flags; the config keys are those of qhnet.config.get_config()')


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad --config (a missing or broken file, an unknown or
    mistyped override, a bad variant) reported in one line instead of a traceback."""
    try:
        remaining = FLAGS(argv)
        FLAGS.config.keys()  # a file that failed to load raises here
    except Exception as error:  # pylint: disable=broad-except; a config file can raise anything
        sys.exit(_config_error(argv, error))
    return remaining


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    if allocator.reuse_freed_memory():  # before JAX's backend starts its threads
        logging.info('Host allocator: one glibc arena, freed memory kept for reuse.')
    logging.get_absl_handler().addFilter(_OrbaxInfoFilter())
    if FLAGS.multihost:
        try:
            jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                       num_processes=FLAGS.num_processes,
                                       process_id=FLAGS.process_id)
        except (ValueError, RuntimeError) as error:
            sys.exit(f'error: --multihost could not start JAX\'s distributed runtime '
                     f'({str(error).splitlines()[0] if str(error) else type(error).__name__}); '
                     'outside a cluster that JAX detects (Cloud TPU, SLURM, Open MPI), pass '
                     '--coordinator_address=HOST:PORT --num_processes=N --process_id=I, the same '
                     'address and count on every process')
    logging.info('JAX process %d of %d; %d local and %d global %s devices.', jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(),
                 jax.default_backend())
    try:
        if FLAGS.evaluate_only:
            record = training.evaluate_checkpoint(FLAGS.config, FLAGS.workdir)
            print(f'step {record["step"]} on {record["dataset"]} ({record["images"]:,} images): '
                  f'top-1 {100 * record["top1"]:.2f}%, top-5 {100 * record["top5"]:.2f}%, '
                  f'loss {record["loss"]:.4f}')
        else:
            training.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except training.CheckpointWriteError as error:
        _quiet_until_exit()
        sys.exit(f'error: {error}')
    except _USER_ERRORS as error:
        sys.exit(f'error: {error}')


def _quiet_until_exit() -> None:
    """After a failed save, orbax's background threads keep failing, and its unawaited write
    coroutines warn when they are collected, as the process exits: the one-line error is what
    the user sees of it. (The command ends here; a library call leaves these hooks alone.)"""
    warnings.filterwarnings('ignore', message="coroutine '.*' was never awaited",
                            category=RuntimeWarning)
    threading.excepthook = sys.unraisablehook = lambda *args: None
    for name in ('absl', 'asyncio'):
        std_logging.getLogger(name).addFilter(_OrbaxErrorFilter())


class _OrbaxErrorFilter(std_logging.Filter):
    def filter(self, record: std_logging.LogRecord) -> bool:
        return '/orbax/' not in record.pathname and record.name != 'asyncio'


if __name__ == '__main__':
    app.run(main, flags_parser=parse_flags)
