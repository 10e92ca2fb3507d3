"""Every config under experiments/configs runs its `:smoke` variant; the
FedDF CIFAR-10 config's full-size models run on mocked CIFAR-10."""

import glob
import importlib
import os
import subprocess
import sys
from unittest import mock

from absl.testing import absltest
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking as tfds_mocking

import data_test  # tests/ is on sys.path under pytest
from fedkd import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# default.py's smoke run is tested, with its output, in main_test.
CONFIGS = sorted(
    p for p in glob.glob(os.path.join(ROOT, 'experiments', 'configs', '*.py'))
    if os.path.basename(p) not in ('__init__.py', 'default.py'))


class SmokeConfigsTest(absltest.TestCase):

  def test_every_config_runs_two_rounds(self):
    self.assertLen(CONFIGS, 6)
    env = dict(os.environ, XLA_FLAGS='')
    runs = {}
    # Concurrently: most of each run is compilation, on its own process.
    for path in CONFIGS:
      workdir = self.create_tempdir().full_path
      runs[path] = workdir, subprocess.Popen(
          [sys.executable, 'experiments/main.py', f'--config={path}:smoke',
           f'--workdir={workdir}'], cwd=ROOT, env=env, text=True,
          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for path, (workdir, proc) in runs.items():
      out, err = proc.communicate(timeout=600)
      with self.subTest(os.path.basename(path)):
        self.assertEqual(proc.returncode, 0, err[-2000:])
        # Every paper config compares algorithms: a table per run.
        self.assertIn('| algorithm | accuracy of | final accuracy', out)
        self.assertTrue(os.path.exists(os.path.join(workdir, 'compare.md')))
        self.assertTrue(os.path.exists(
            os.path.join(workdir, 'accuracy_vs_bytes.png')))


class FullSizeConfigTest(absltest.TestCase):

  def test_feddf_cifar10_table2_runs_a_round_on_mocked_cifar10(self):
    experiments = os.path.join(ROOT, 'experiments')
    sys.path.insert(0, experiments)  # as under main.py
    self.addCleanup(sys.path.remove, experiments)
    config = importlib.import_module(
        'configs.feddf_cifar10_table2').get_config()
    self.assertEqual((config.dataset, config.student),
                     ('cifar10', 'resnet8_gn'))
    # The config's model, data set, algorithm and optimizers; only the scale
    # shrinks: 2 clients, 1 round, 1 epoch, 8 public examples, batches of 8
    # (padding 16 examples to batches of 64 made the round 15x slower).
    config.algorithm, config.compare = 'feddf', ''
    config.num_clients = config.clients_per_round = 2
    config.num_rounds = config.local_epochs = config.num_devices = 1
    config.public_examples = config.batch_size = config.public_batch_size = 8
    config.data_dir = self.create_tempdir().full_path
    with (
        mock.patch.object(tfds_mocking, '_getitems',
                          data_test._getitems_without_self),
        tfds.testing.mock_data(
            num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE),
    ):
      (row,) = train.run(config, self.create_tempdir().full_path,
                         progress=False)
    self.assertEqual(row['round'], 1)
    self.assertEqual(row['clients'], 2)
    # Each client uploads ResNet-8's 78,042 float32 parameters.
    self.assertEqual(row['upload_bytes'], 2 * 78_042 * 4)
    self.assertBetween(row['student_accuracy'], 0.0, 1.0)
    self.assertTrue(0 < row['server_distill_loss'] < 1e3, row)


if __name__ == '__main__':
  absltest.main()
