"""Every config under experiments/configs runs its `:smoke` variant; the
FedDF CIFAR-10 config's full-size models run on mocked CIFAR-10."""

import glob
import importlib
import json
import os
import subprocess
import sys
from unittest import mock

from absl.testing import absltest
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking as tfds_mocking

import data_test  # tests/ is on sys.path under pytest
from experiments import runner
import toys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# default.py's smoke run is tested, with its output, in main_test.
CONFIGS = sorted(
    p for p in glob.glob(os.path.join(ROOT, 'experiments', 'configs', '*.py'))
    if os.path.basename(p) not in ('__init__.py', 'default.py'))


class SmokeConfigsTest(absltest.TestCase):

  def test_every_config_runs_two_rounds(self):
    self.assertLen(CONFIGS, 7)
    workdirs = [self.create_tempdir().full_path for _ in CONFIGS]
    # Forked from one process that imported fedkd once, two at a time (the
    # cores); most of each run is compilation.
    proc = subprocess.run(
        [sys.executable, 'tests/cli_forkserver.py', '2'], cwd=ROOT,
        env=toys.subprocess_env(), capture_output=True, text=True,
        timeout=900, check=True, input=json.dumps([
            [f'--config={path}:smoke', f'--workdir={workdir}']
            for path, workdir in zip(CONFIGS, workdirs)]))
    results = json.loads(proc.stdout)
    for path, workdir, (code, err) in zip(CONFIGS, workdirs, results):
      with self.subTest(os.path.basename(path)):
        self.assertEqual(code, 0, err[-2000:])
        # Every paper config compares algorithms: a table per run.
        with open(os.path.join(workdir, 'compare.md')) as f:
          self.assertIn('| algorithm | accuracy of | final accuracy', f.read())
        self.assertTrue(os.path.exists(
            os.path.join(workdir, 'accuracy_vs_bytes.png')))


class FullSizeConfigTest(absltest.TestCase):

  def test_feddf_cifar10_table2_runs_a_round_on_mocked_cifar10(self):
    toys.full_or(self, False)  # a full-size ResNet-8 round: minutes
    config = importlib.import_module(
        'experiments.configs.feddf_cifar10_table2').get_config()
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
      (row,) = runner.run(config, self.create_tempdir().full_path,
                         progress=False)
    self.assertEqual(row['round'], 1)
    self.assertEqual(row['clients'], 2)
    # Each client uploads ResNet-8's 78,042 float32 parameters.
    self.assertEqual(row['upload_bytes'], 2 * 78_042 * 4)
    self.assertBetween(row['student_accuracy'], 0.0, 1.0)
    self.assertTrue(0 < row['server_distill_loss'] < 1e3, row)



class FedproxFigure1Test(absltest.TestCase):
  """configs/fedprox_synthetic_fig1 and experiments/fedprox_fig1.py."""

  def setUp(self):
    super().setUp()
    self.fig1 = importlib.import_module(
        'experiments.configs.fedprox_synthetic_fig1')

  def test_paper_setting_and_arms(self):
    config = self.fig1.get_config('0.5,90')
    # Li et al. 2020, Sec. 5: 30 devices, 10 a round, E = 20, B = 10,
    # lr 0.01, multinomial logistic regression on Synthetic(a, a).
    self.assertEqual(
        (config.dataset, config.synthetic_alpha, config.synthetic_beta,
         config.num_clients, config.clients_per_round, config.local_epochs,
         config.batch_size, config.client_lr, config.student),
        ('synthetic', 0.5, 0.5, 30, 10, 20, 10, 0.01, 'logreg'))
    arms = {label: (c.algorithm, c.prox_mu, c.dropout_rate, c.straggler_rate)
            for label, c in self.fig1.arms(config).items()}
    # FedAvg drops its stragglers; mu = 0 and mu = 1 keep their partial work.
    self.assertEqual(arms, {'fedavg (drops)': ('fedavg', 0.0, 0.9, 0.0),
                            'fedavg (partial)': ('fedavg', 0.0, 0.0, 0.9),
                            'fedprox (mu=1)': ('fedprox', 1.0, 0.0, 0.9)})
    # Synthetic's client sizes (lognormal(4, 2) + 50, seed 0) stay whole.
    self.assertGreaterEqual(config.synthetic_max_examples, 889)
    self.assertEqual(self.fig1.get_config().straggler_rate, 0.9)
    with self.assertRaisesRegex(ValueError, 'use :ALPHA,PERCENT'):
      self.fig1.get_config('1')

  def test_figure_and_table_from_finished_runs(self):
    # Runs whose metrics reach the last round are read, not rerun.
    workdir, out = (self.create_tempdir().full_path for _ in range(2))
    expected = []
    for i, arm in enumerate(('fedavg_drops', 'fedavg_partial',
                             'fedprox_mu_1')):
      os.makedirs(os.path.join(workdir, '1_90', arm))
      rows = [dict(round=r, student_loss=2.0 + i - r, accuracy=0.1 * (i + r))
              for r in (1, 2)]
      with open(os.path.join(workdir, '1_90', arm, 'metrics.jsonl'),
                'w') as f:
        f.writelines(json.dumps(row) + '\n' for row in rows)
      # Final loss 0 + i, largest 1 + i; final accuracy 0.1 (i + 2).
      expected.append(f'{i:.3f} | {1 + i:.3f} | {0.1 * (i + 2):.4f} | '
                      f'{0.1 * (i + 2):.4f} |')
    proc = subprocess.run(
        [sys.executable, 'experiments/fedprox_fig1.py', f'--workdir={workdir}',
         f'--out={out}', '--alphas=1', '--percents=90', '--num_rounds=2'],
        cwd=ROOT, env=toys.subprocess_env(), text=True,
        capture_output=True, timeout=300, check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    self.assertNotIn('compiling', proc.stdout)
    with open(os.path.join(out, 'fedprox_fig1.md')) as f:
      lines = f.read().splitlines()[2:]
    self.assertLen(lines, 3)
    for line, tail in zip(lines, expected):
      self.assertTrue(line.endswith(tail), (line, tail))
    for name in ('loss', 'accuracy'):
      self.assertGreater(os.path.getsize(
          os.path.join(out, f'fedprox_fig1_{name}.png')), 1000)


if __name__ == '__main__':
  absltest.main()
