"""The host loop: chunked evaluation, metrics fetched in batches, exact totals.

Signals and running out of memory are tested end to end, on the command
line, in main_test.py.
"""

import contextlib
import io
import json
import os
import tempfile
from unittest import mock

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from experiments import runner
from experiments.configs import default
from fedkd import data
from fedkd import metrics
from fedkd import models
from fedkd import sharding
from fedkd import train
from fedkd import workdir as workdir_lib

# 4 rounds, evaluated after rounds 2 and 4, checkpointed after the last only.
_RUN = dict(num_rounds=4, eval_every=2, checkpoint_every=0)
_EVAL_KEYS = ('student_accuracy', 'student_loss', 'teacher_accuracy')
# local_kd on digits: every one of the 100 clients uploads and downloads the
# 2,410-parameter float32 student each round.
_ROUND_BYTES = 100 * 2410 * 4


def _run(workdir, **overrides):
  config = default.get_config('smoke')
  config.update(_RUN, **overrides)
  runner.run(config, workdir, progress=False)
  with open(os.path.join(workdir, workdir_lib.METRICS)) as f:
    return [json.loads(l) for l in f]


class LoopTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    fetches = []
    device_get = jax.device_get

    def recording_device_get(x):
      if isinstance(x, list):  # the loop's batch of per-round metrics
        fetches.append(len(x))
      return device_get(x)

    with mock.patch.object(jax, 'device_get', recording_device_get):
      cls.rows = _run(tempfile.mkdtemp())
    cls.fetches = fetches

  def test_metrics_are_fetched_only_at_evaluated_rounds(self):
    self.assertEqual(self.fetches, [2, 2])

  def test_totals_count_every_round(self):
    self.assertEqual([r['round'] for r in self.rows], [2, 4])
    for row in self.rows:
      self.assertEqual(row['upload_bytes'], _ROUND_BYTES)
      self.assertEqual(row['cumulative_upload_bytes'],
                       row['round'] * _ROUND_BYTES)
      self.assertEqual(row['cumulative_bytes'],
                       2 * row['round'] * _ROUND_BYTES)
      self.assertGreater(row['round_seconds'], 0)

  def test_tiny_memory_budget_gives_the_same_figures(self):
    # Budget for 25 teacher examples, batches of at most 7 of the 360 test
    # examples: batches of 7 with the last one overlapping, chunks of 3 of
    # the 100 teachers with the last one clamped.
    teacher = models.get_model('seed_teacher', 10)
    params = jax.eval_shape(teacher.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 8, 8, 1)))
    per_example = metrics.activation_bytes(
        teacher, params, jax.ShapeDtypeStruct((8, 8, 1), jnp.float32))
    self.assertEqual(metrics.plan_chunks(
        per_example, num_models=100, num_examples=360, max_batch_size=7,
        budget_bytes=25 * per_example), (7, 3))
    with mock.patch.object(metrics, 'eval_budget_bytes',
                           lambda device: 25 * per_example):
      rows = _run(self.create_tempdir().full_path, eval_batch_size=7)
    self.assertLen(rows, len(self.rows))
    for chunked, whole in zip(rows, self.rows):
      for key in _EVAL_KEYS:
        self.assertAlmostEqual(chunked[key], whole[key], delta=1e-6, msg=key)

  def test_unset_chunk_counts_the_activations_of_a_local_step(self):
    # A client trains 35,920 bytes of seed models (student and teacher) and
    # computes 38,240 of activations a step (batch 10): a device that may
    # hold twice the models holds one client, 8 a chunk on the 8 devices.
    out = io.StringIO()
    with mock.patch.object(sharding, '_CHUNK_BYTES_PER_DEVICE', 2 * 35_920):
      with contextlib.redirect_stdout(out):
        _run(self.create_tempdir().full_path, num_rounds=1)
    self.assertIn('compiling the round (8 clients a chunk, chosen from the '
                  'model sizes)', out.getvalue())

  def test_divergence_found_at_a_later_round_names_its_round(self):
    workdir = self.create_tempdir().full_path
    with self.assertRaisesRegex(train.Diverged,
                                'NaN/inf in round 1;.*no checkpoint'):
      _run(workdir, client_lr=30.0, server_lr=3e38)
    checkpoints = os.listdir(os.path.join(workdir, workdir_lib.CHECKPOINTS))
    self.assertEmpty([c for c in checkpoints if c.isdigit()])


class PublicDataTest(absltest.TestCase):

  def test_public_labels_are_kept_only_where_read(self):
    config = default.get_config('smoke')
    config.update(algorithm='fedmd', public_examples=30)
    full = data.load_dataset('digits')
    _, _, public_x, public_y = runner.load_data(config)
    self.assertEqual(public_y.shape, (30,))
    # Each label is one that the held-out features carry in the full set.
    for x, y in zip(public_x, public_y):
      same = np.all(full.x_train == x, axis=tuple(range(1, x.ndim + 1)))
      self.assertIn(y, full.y_train[same])
    # feddf validates on its labelled split only while it has one.
    config.algorithm = 'feddf'
    np.testing.assert_array_equal(runner.load_data(config)[3], public_y)
    config.distill_val_fraction = 0.0
    self.assertEmpty(runner.load_data(config)[3])
    config.algorithm = 'fedavg'
    self.assertEmpty(runner.load_data(config)[3])


if __name__ == '__main__':
  absltest.main()
