"""qhnet.metrics: a full disk at the end of a run loses the pending events with a warning,
not with a second error that hides the first."""

import errno

from absl import logging


from qhnet.training import metrics

class FullDisk:
    def write(self, data):
        del data

    def flush(self):
        raise OSError(errno.ENOSPC, 'No space left on device')

    def close(self):
        self.flush()


def test_close_on_a_full_disk_warns_and_leaves_nothing_to_retry(tmp_path, monkeypatch):
    writer = metrics.MetricWriter(str(tmp_path))
    writer.scalars(1, 'train', {'loss': 1.0})
    file_writers = list(writer._tensorboard.all_writers.values())
    for file_writer in file_writers:
        file_writer.event_writer._ev_writer._py_recordio_writer._writer = FullDisk()
    warnings = []
    monkeypatch.setattr(logging, 'warning', lambda message, *args: warnings.append(message % args))
    writer.close()
    assert any('TensorBoard events not written' in w and 'No space left' in w for w in warnings)
    for file_writer in file_writers:
        file_writer.event_writer.close()  # what tensorboardX's exit hook calls: nothing left
        file_writer.event_writer.flush()
    assert metrics.read_metrics(str(tmp_path))['train'][0]['loss'] == 1.0
