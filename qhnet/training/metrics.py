"""Training metrics and events: TensorBoard event files, JSON lines, and a PNG of the curves.

Everything lands in the workdir:

  metrics.jsonl   one JSON object a line: {"step", "split": "train"|"test", <metric>: value}
                  or {"step", "event": <kind>, "message", ...} for rollbacks, restores, ...;
                  records of steps that a resume or a rollback redid carry
                  "superseded": true, so that every reader sees one curve
  tensorboard/    the same scalars as TensorBoard event files
  curves.png      loss and accuracy against epochs (`plot_curves`)
"""

import json
import os
import time
from typing import Any, Mapping

from absl import logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import tensorboardX

METRICS_FILE = 'metrics.jsonl'
CURVES_FILE = 'curves.png'


class MetricWriter:
    """Writes scalars and events of one process; a disabled writer (other hosts) only logs."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._workdir = workdir
        if enabled:
            self._jsonl = open(os.path.join(workdir, METRICS_FILE), 'a', encoding='utf-8')
            self._tensorboard = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))

    def _append(self, record: Mapping[str, Any]) -> None:
        self._jsonl.write(json.dumps(record) + '\n')
        self._jsonl.flush()

    def scalars(self, step: int, split: str, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        values = {name: float(value) for name, value in values.items()}
        self._append({'step': step, 'split': split, **values, 'time': time.time()})
        for name, value in values.items():
            self._tensorboard.add_scalar(f'{split}/{name}', value, step)
        self._tensorboard.flush()

    def event(self, step: int, kind: str, message: str, *, warning: bool = True,
              **details: Any) -> None:
        """Logs an event (rollback, resume, corrupt checkpoint, ...) and records it."""
        logging.log(logging.WARNING if warning else logging.INFO, '[%s] step %d: %s', kind, step,
                    message)
        if not self.enabled:
            return
        self._append({'step': step, 'event': kind, 'message': message, **details,
                      'time': time.time()})
        self._tensorboard.add_text(f'events/{kind}', message, step)
        self._tensorboard.flush()

    def has_scalars(self, step: int, split: str) -> bool:
        """Whether `metrics.jsonl` holds a record of `split` at `step` that stands (every
        process reads the same file, so all of them answer alike)."""
        if not os.path.exists(os.path.join(self._workdir, METRICS_FILE)):
            return False
        return any(record['step'] == step for record in read_metrics(self._workdir).get(split, []))

    def supersede_after(self, step: int) -> None:
        """Marks the scalar records after `step` as superseded: the run restarts from `step`
        (a resume or a rollback) and will write those steps again."""
        if not self.enabled:
            return
        self._jsonl.close()
        path = os.path.join(self._workdir, METRICS_FILE)
        with open(path, encoding='utf-8') as lines:
            records = [json.loads(line) for line in lines]
        with open(path + '.tmp', 'w', encoding='utf-8') as f:
            for record in records:
                if 'split' in record and record['step'] > step:
                    record['superseded'] = True
                f.write(json.dumps(record) + '\n')
        os.replace(path + '.tmp', path)
        self._jsonl = open(path, 'a', encoding='utf-8')

    def close(self) -> None:
        """Closes the files. Events that a full disk cannot take are dropped with a warning,
        so that the error that stopped the run is the one reported."""
        if not self.enabled:
            return
        try:
            self._jsonl.close()
        except OSError as error:
            logging.warning('%s: the last records were not written: %s', METRICS_FILE, error)
        try:
            self._tensorboard.close()
        except OSError as error:
            logging.warning('TensorBoard events not written: %s', error)
            for writer in self._tensorboard.all_writers.values():
                _drop_pending(writer)


class _Discard:
    def write(self, data) -> None:
        del data

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _drop_pending(writer) -> None:
    """Points a tensorboardX FileWriter whose file cannot be written at a sink and closes it,
    so that neither its worker thread nor its exit hook tries the file again."""
    records = writer.event_writer._ev_writer._py_recordio_writer  # tensorboardX 2.6
    stuck, records._writer = records._writer, _Discard()
    try:
        stuck.close()
    except OSError:
        pass
    writer.event_writer.close()


def read_metrics(workdir: str) -> dict[str, list[dict[str, Any]]]:
    """The scalar records of `metrics.jsonl` by split, sorted by step, without the superseded
    ones (steps that a resume or a rollback redid); of any other repeats, the last wins."""
    by_split: dict[str, dict[int, dict[str, Any]]] = {}
    with open(os.path.join(workdir, METRICS_FILE), encoding='utf-8') as lines:
        for line in lines:
            record = json.loads(line)
            if 'split' in record and not record.get('superseded'):
                by_split.setdefault(record['split'], {})[record['step']] = record
    return {split: [records[step] for step in sorted(records)]
            for split, records in by_split.items()}


def plot_curves(workdir: str, steps_per_epoch: int) -> str:
    """Draws train/test loss and top-1 accuracy against epochs into `curves.png`."""
    records = read_metrics(workdir)
    figure = Figure(figsize=(11, 4))  # not pyplot's: the process's backend stays as it was
    FigureCanvasAgg(figure)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for split, accuracy_key in (('train', 'accuracy'), ('test', 'top1')):
        rows = records.get(split, [])
        epochs = [row['step'] / steps_per_epoch for row in rows]
        marker = 'o' if split == 'test' else None
        loss_axes.plot(epochs, [row['loss'] for row in rows], marker=marker, label=split)
        accuracy_axes.plot(epochs, [100 * row[accuracy_key] for row in rows], marker=marker,
                           label=f'{split} top-1')
    loss_axes.set(xlabel='epoch', ylabel='cross-entropy (train: label-smoothed)', title='loss')
    accuracy_axes.set(xlabel='epoch', ylabel='%', title='top-1 accuracy')
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    path = os.path.join(workdir, CURVES_FILE)
    figure.savefig(path, dpi=100)
    return path
