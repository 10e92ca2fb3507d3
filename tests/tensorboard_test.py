"""Tests for fedkd.tensorboard, read back with TensorBoard's own reader."""

import errno
import json
import math
import os
import struct
import threading
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.util import tensor_util
from tensorboardX import record_writer

from experiments import runner
from experiments.configs import default
from fedkd import tensorboard
from fedkd import workdir as workdir_lib
from fedkd.errors import FedkdError


def _read(logdir: str):
  """({tag: [(step, value)]}, [config texts in order]) as TensorBoard's
  server reads them (its plugins' accumulator)."""
  acc = plugin_event_accumulator.EventAccumulator(
      logdir, size_guidance={plugin_event_accumulator.TENSORS: 0})
  acc.Reload()
  tags = lambda plugin: (acc.PluginTagToContent(plugin)
                         if plugin in acc.ActivePlugins() else {})
  value = lambda e: tensor_util.make_ndarray(e.tensor_proto).item()
  scalars = {tag: [(e.step, value(e)) for e in acc.Tensors(tag)]
             for tag in tags('scalars')}
  texts = [e.tensor_proto.string_val[0].decode() for tag in tags('text')
           if tag.startswith('config') for e in acc.Tensors(tag)]
  return scalars, texts


def _event_files(logdir: str):
  return sorted(f for f in os.listdir(logdir) if 'tfevents' in f)


class EventWriterTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = self.create_tempdir().full_path

  def _write(self, rows, config=None, *, fresh=False, step=0):
    writer = tensorboard.EventWriter(self.dir, fresh=fresh)
    writer.write_config(config or {'seed': 0}, step)
    writer.write_rows(rows)
    writer.close()

  def test_scalars_read_back_equal_the_rows(self):
    rows = [{'round': 5, 'accuracy': 0.1, 'upload_bytes': 66_534_800_001,
             'dp_epsilon': None, 'nonfinite_metrics': ['x']},
            {'round': 10, 'accuracy': 0.5, 'upload_bytes': 7,
             'dp_epsilon': 1.5, 'nonfinite_metrics': []}]
    self._write(rows, {'seed': 3, 'algorithm': 'fedkd'})
    scalars, texts = _read(self.dir)
    # None and lists are not scalars; the others are exact (float64).
    self.assertEqual(scalars, {
        'accuracy': [(5, 0.1), (10, 0.5)],
        'upload_bytes': [(5, 66_534_800_001), (10, 7)],
        'dp_epsilon': [(10, 1.5)]})
    self.assertLen(texts, 1)
    self.assertEqual(json.loads(texts[0]), {'seed': 3, 'algorithm': 'fedkd'})

  def test_non_finite_values_are_written(self):
    self._write([{'round': 1, 'loss': math.nan, 'norm': math.inf,
                  'low': -math.inf}])
    scalars, _ = _read(self.dir)
    self.assertTrue(math.isnan(scalars['loss'][0][1]))
    self.assertEqual(scalars['norm'], [(1, math.inf)])
    self.assertEqual(scalars['low'], [(1, -math.inf)])

  def test_resume_writes_only_steps_not_yet_written(self):
    self._write([{'round': 1, 'acc': 0.1}, {'round': 2, 'acc': 0.2}])
    # A resume from round 1 recomputes round 2 (same figure up to timing).
    self._write([{'round': 1, 'acc': 0.1}, {'round': 2, 'acc': 0.25},
                 {'round': 3, 'acc': 0.3, 'new': 1.0}], step=1)
    self.assertLen(_event_files(self.dir), 2)
    scalars, texts = _read(self.dir)
    self.assertEqual(scalars['acc'], [(1, 0.1),
                                      (2, 0.2),
                                      (3, 0.3)])
    self.assertEqual(scalars['new'], [(3, 1.0)])
    self.assertLen(texts, 1)  # the same config is not written again
    self._write([], {'seed': 1}, step=3)
    _, texts = _read(self.dir)
    self.assertEqual([json.loads(t) for t in texts], [{'seed': 0},
                                                      {'seed': 1}])

  def test_fresh_removes_earlier_event_files(self):
    self._write([{'round': 1, 'acc': 0.1}, {'round': 2, 'acc': 0.2}])
    self._write([{'round': 1, 'acc': 0.5}], fresh=True)
    self.assertLen(_event_files(self.dir), 1)
    self.assertEqual(_read(self.dir)[0], {'acc': [(1, 0.5)]})

  def test_torn_last_record_is_rewritten(self):
    self._write([{'round': 1, 'acc': 0.1}, {'round': 2, 'acc': 0.2}])
    path = os.path.join(self.dir, _event_files(self.dir)[0])
    with open(path, 'r+b') as f:  # a writer killed within round 2's record
      f.truncate(os.path.getsize(path) - 3)
    self._write([{'round': 1, 'acc': 0.1}, {'round': 2, 'acc': 0.2}])
    scalars, _ = _read(self.dir)
    self.assertEqual(scalars['acc'], [(1, 0.1),
                                      (2, 0.2)])


  def _damage(self, how) -> str:
    """Damages the event file of rounds 1 and 2 after its first record (the
    file's version, before any scalar); returns its path."""
    self._write([{'round': 1, 'acc': 0.1}, {'round': 2, 'acc': 0.2}])
    path = os.path.join(self.dir, _event_files(self.dir)[0])
    with open(path, 'r+b') as f:
      first = int.from_bytes(f.read(8), 'little') + 16
      f.seek(first)
      f.write(how)
    return path

  @parameterized.named_parameters(
      ('random_bytes', os.urandom(4096)),
      # A length of 2^62 with its CRC as a writer would make it.
      ('huge_length', struct.pack('<Q', 2**62) + struct.pack(
          '<I', record_writer.masked_crc32c(struct.pack('<Q', 2**62)))),
      ('huge_length_bad_crc', struct.pack('<QI', 2**62, 0)))
  def test_damaged_records_are_skipped(self, how):
    damaged = self._damage(how)
    self._write([{'round': 1, 'acc': 0.5}, {'round': 2, 'acc': 0.6}])
    # No scalar of the damaged file reads, so the new one holds them all
    # (TensorBoard's own reader fails on the damaged file).
    os.remove(damaged)
    self.assertEqual(_read(self.dir)[0], {'acc': [(1, 0.5), (2, 0.6)]})

  def test_directory_with_an_event_file_name_is_ignored(self):
    self._write([{'round': 1, 'acc': 0.1}])
    os.mkdir(os.path.join(self.dir, 'events.out.tfevents.999.x'))
    with self.assertLogs(level='WARNING') as logs:
      self._write([{'round': 2, 'acc': 0.2}])
      self._write([{'round': 1, 'acc': 0.5}], fresh=True)
    self.assertIn('not a regular file', '\n'.join(logs.output))
    os.rmdir(os.path.join(self.dir, 'events.out.tfevents.999.x'))
    self.assertEqual(_read(self.dir)[0], {'acc': [(1, 0.5)]})


  def test_failed_close_leaves_nothing_to_fail_at_exit(self):
    writer = tensorboard.EventWriter(self.dir, fresh=False)
    writer.write_rows([{'round': 1, 'acc': 0.1}])
    full = OSError(errno.ENOSPC, 'No space left on device')
    with mock.patch.object(record_writer.RecordWriter, 'flush',
                           side_effect=full):
      with self.assertRaises(OSError):
        writer.close()
      # What tensorboardX's atexit hook calls: nothing is left to flush.
      writer._events.close()  # pylint: disable=protected-access
    self.assertNotIn('_EventLoggerThread', [
        type(t).__name__ for t in threading.enumerate()])


class WorkdirTest(absltest.TestCase):
  """The event files through `fedkd.workdir`, as runs and resumes use it."""

  def setUp(self):
    super().setUp()
    self.path = self.create_tempdir().full_path
    self.logdir = os.path.join(self.path, workdir_lib.TENSORBOARD)

  def _session(self, resumed_rows, new_rows, *, overwrite=False):
    work = workdir_lib.Workdir(self.path, {'num_rounds': 3}, data='sha',
                               overwrite=overwrite, num_rounds=3)
    try:
      work.start(resumed_rows)
      for row in new_rows:
        work.append_row(row)
    finally:
      work.close()

  def test_resume_overwrite_and_restart(self):
    one, two, three = ({'round': r, 'acc': r / 10} for r in (1, 2, 3))
    self._session([], [one, two])
    # Resumed from round 1's checkpoint: round 2 again, then round 3.
    self._session([one], [dict(two, acc=0.9), three])
    self.assertEqual(_read(self.logdir)[0]['acc'], [
        (1, 0.1), (2, 0.2), (3, 0.3)])
    # No checkpoint to resume from: the events start anew, as metrics.jsonl.
    self._session([], [dict(one, acc=0.5)])
    self.assertEqual(_read(self.logdir)[0], {'acc': [(1, 0.5)]})
    self._session([], [], overwrite=True)
    self.assertEqual(_read(self.logdir)[0], {})

  def test_tensorboard_not_a_directory_is_refused(self):
    with open(self.logdir, 'w') as f:
      f.write('x')
    with self.assertRaisesRegex(FedkdError, 'tensorboard is not a directory'):
      self._session([], [])


class RunTest(absltest.TestCase):

  def test_event_files_hold_the_metrics_rows(self):
    config = default.get_config('smoke')
    config.update(algorithm='fedavg', num_clients=10, clients_per_round=5,
                  local_epochs=1)
    workdir = self.create_tempdir().full_path
    runner.run(config, workdir, progress=False)
    with open(os.path.join(workdir, workdir_lib.METRICS)) as f:
      rows = [json.loads(line) for line in f]
    self.assertEqual([r['round'] for r in rows], [1, 2])
    expected = {}
    for row in rows:
      for tag, value in row.items():
        if isinstance(value, (int, float)) and tag != 'round':
          expected.setdefault(tag, []).append(
              (row['round'], value))
    scalars, texts = _read(os.path.join(workdir, workdir_lib.TENSORBOARD))
    self.assertEqual(scalars, expected)
    self.assertIn('student_accuracy', scalars)
    self.assertEqual(json.loads(texts[0]), config.to_dict())


if __name__ == '__main__':
  absltest.main()
