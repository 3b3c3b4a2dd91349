"""What keeps checkpoints honest: a SHA-256 digest of every file of a checkpoint, written when
its save has finished and checked before it is restored; and orbax's background noise held
back while a save runs, so that a failed save is reported once."""

import contextlib
import errno
import hashlib
import json
import logging as std_logging
import os
import sys
import threading
import warnings
from typing import Iterator

DIGEST_DIR = 'checkpoint_digests'
ITEMS = ('variables', 'optimizer', 'config', 'dataset')


def describe(error: BaseException) -> str:
    """`error` in one short line: its type and the first line of its message."""
    return f'{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ""}'


def file_digests(step_dir: str) -> dict[str, str]:
    """{path relative to `step_dir`: SHA-256} of every file of the checkpoint's items."""
    digests = {}
    for item in ITEMS:
        for root, _, files in os.walk(os.path.join(step_dir, item)):
            for name in files:
                path = os.path.join(root, name)
                sha = hashlib.sha256()
                with open(path, 'rb') as f:
                    for chunk in iter(lambda: f.read(1 << 20), b''):
                        sha.update(chunk)
                digests[os.path.relpath(path, step_dir)] = sha.hexdigest()
    return dict(sorted(digests.items()))


def digest_path(workdir: str, step: int) -> str:
    return os.path.join(workdir, DIGEST_DIR, f'{step}.json')


def has_digests(workdir: str) -> bool:
    """Whether any checkpoint of `workdir` has a digest."""
    folder = os.path.join(workdir, DIGEST_DIR)
    return os.path.isdir(folder) and any(name.endswith('.json') for name in os.listdir(folder))


def write_digest(workdir: str, step_dir: str, step: int, kept: list[int]) -> None:
    """Writes the digest of checkpoint `step` (atomically) and removes those of checkpoints
    no longer `kept`."""
    folder = os.path.join(workdir, DIGEST_DIR)
    os.makedirs(folder, exist_ok=True)
    path = digest_path(workdir, step)
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
        json.dump({'step': step, 'sha256': file_digests(step_dir)}, f, indent=1)
    os.replace(path + '.tmp', path)
    names = {f'{s}.json' for s in kept}
    for name in os.listdir(folder):
        if name.endswith('.json') and name not in names:
            os.remove(os.path.join(folder, name))


def check_digest(workdir: str, step_dir: str, step: int) -> str | None:
    """None if the files of checkpoint `step` are the ones that were written, else what
    differs. A checkpoint without a digest must be judged by the caller (`has_digests`)."""
    path = digest_path(workdir, step)
    if not os.path.exists(path):
        return 'it has no content digest (its save did not finish)'
    try:
        with open(path, encoding='utf-8') as f:
            expected = json.load(f)['sha256']
    except (OSError, ValueError, KeyError) as error:
        return f'its digest file {path} is unreadable ({describe(error)})'
    actual = file_digests(step_dir)
    changed = sorted(name for name in expected.keys() | actual.keys()
                     if expected.get(name) != actual.get(name))
    if changed:
        more = f' and {len(changed) - 1} more' if len(changed) > 1 else ''
        return (f'content digest mismatch in {changed[0]}{more}: the files changed after '
                'they were written')
    return None


def disk_full(error: BaseException) -> bool:
    while error is not None:
        if getattr(error, 'errno', None) == errno.ENOSPC or 'No space left' in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def orbax_errors_held() -> Iterator[list[str]]:
    """Holds back, for the duration of a save, what orbax's background threads report (error
    records and uncaught exceptions, a traceback each), and the warnings of the write
    coroutines that a failed save leaves unawaited: a failed save is reported once, by
    CheckpointWriteError. Yields the list of what was held. Every hook, filter and warnings
    setting is restored on the way out, whatever ends the save (an error, Ctrl-C)."""
    held: list[str] = []

    class Records(std_logging.Filter):
        def filter(self, record: std_logging.LogRecord) -> bool:
            if record.levelno >= std_logging.ERROR and ('/orbax/' in record.pathname
                                                        or record.name == 'asyncio'):
                held.append(record.getMessage().splitlines()[0])
                return False
            return True

    def hold_exception(*args) -> None:
        error = getattr(args[0], 'exc_value', None) if len(args) == 1 else args[1]
        held.append(describe(error) if isinstance(error, BaseException) else str(args))

    records = Records()
    loggers = [std_logging.getLogger(name) for name in ('absl', 'asyncio')]
    hooks = sys.excepthook, threading.excepthook, sys.unraisablehook
    for logger in loggers:
        logger.addFilter(records)
    sys.excepthook = threading.excepthook = sys.unraisablehook = hold_exception
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message="coroutine '.*' was never awaited",
                                    category=RuntimeWarning)
            yield held
    finally:
        sys.excepthook, threading.excepthook, sys.unraisablehook = hooks
        for logger in loggers:
            logger.removeFilter(records)
