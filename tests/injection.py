"""Faults injected into the training loop from outside it, by wrapping the batches a run reads
(`loop.TrainingRun.host_batches`): a batch of NaN images, or a crash between two steps.

In a test, with pytest's monkeypatch:

    injection.nan_batches(monkeypatch, at_step=6, times=2)
    injection.crash_after(monkeypatch, step=7)        # raises SimulatedCrash

As a command, `python -m tests.injection --crash_after=N <qhnet.main flags>` runs
`python -m qhnet.main` and stops it with SimulatedCrash after step N, as a kill would.
"""

import sys

import numpy as np

from qhnet.training import loop


class SimulatedCrash(RuntimeError):
    """Stops a run between two steps, as if the process were killed."""


def _wrap(monkeypatch, wrapper) -> None:
    original = loop.TrainingRun.host_batches

    def host_batches(run, start_step):
        return wrapper(enumerate(original(run, start_step), start=start_step + 1))

    monkeypatch.setattr(loop.TrainingRun, 'host_batches', host_batches)


def nan_batches(monkeypatch, at_step: int, times: int = 1) -> None:
    """The batch of step `at_step` is all NaN, the first `times` times the run reaches it."""
    left = [times]

    def wrapper(numbered):
        for step, batch in numbered:
            if step == at_step and left[0] > 0:
                left[0] -= 1
                batch = dict(batch, image=np.full(batch['image'].shape, np.nan, np.float32))
            yield batch

    _wrap(monkeypatch, wrapper)


def crash_after(monkeypatch, step: int) -> None:
    """The run raises SimulatedCrash where it would read the batch of step `step + 1`: after
    step `step` and whatever it logged and saved."""
    def wrapper(numbered):
        for number, batch in numbered:
            if number > step:
                raise SimulatedCrash(f'stopping after step {step}')
            yield batch

    _wrap(monkeypatch, wrapper)


class _Patch:
    """What pytest's monkeypatch offers, for use outside pytest."""

    @staticmethod
    def setattr(target, name, value) -> None:
        setattr(target, name, value)


if __name__ == '__main__':
    from absl import app

    from qhnet import main

    flag, rest = sys.argv[1], sys.argv[2:]
    if not flag.startswith('--crash_after='):
        sys.exit('usage: python -m tests.injection --crash_after=N <qhnet.main flags>')
    crash_after(_Patch, int(flag.partition('=')[2]))
    app.run(main.main, argv=[sys.argv[0], *rest], flags_parser=main.parse_flags)
