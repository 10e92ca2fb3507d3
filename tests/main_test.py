"""The CLI end to end: the smoke config, and one clear line for bad input."""

import json
import os
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = '--config=experiments/configs/default.py:smoke'


def _main(*args):
  env = dict(os.environ, XLA_FLAGS='')  # one device, as a user would run it
  return subprocess.run(
      [sys.executable, 'experiments/main.py', *args], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=300, check=False)


def _npz(path, **overrides):
  rng = np.random.default_rng(0)
  arrays = dict(x_train=rng.random((40, 5), np.float32),
                y_train=rng.integers(0, 3, 40),
                x_test=rng.random((10, 5), np.float32),
                y_test=rng.integers(0, 3, 10))
  arrays.update(overrides)
  np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
  return path


class SmokeTest(absltest.TestCase):

  def test_smoke_config_runs_and_prints_table(self):
    workdir = self.create_tempdir().full_path
    proc = _main(SMOKE, f'--workdir={workdir}')
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    self.assertIn('student acc', proc.stdout)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      rows = [json.loads(line) for line in f]
    self.assertEqual([r['round'] for r in rows], [1, 2])
    for row in rows:
      for key in ('student_accuracy', 'student_loss', 'teacher_accuracy',
                  'upload_bytes', 'round_seconds'):
        self.assertIsNotNone(row[key], key)
      # 100 clients each upload the 2,410-parameter float32 student.
      self.assertEqual(row['upload_bytes'], 100 * 2410 * 4)
      self.assertBetween(row['student_accuracy'], 0.0, 1.0)
    with open(os.path.join(workdir, 'config.json')) as f:
      self.assertEqual(json.load(f)['num_rounds'], 2)

  def test_npz_dataset_and_overrides(self):
    workdir = self.create_tempdir().full_path
    path = _npz(os.path.join(workdir, 'd.npz'))
    proc = _main(SMOKE, f'--workdir={workdir}/run',
                 f'--config.dataset=npz:{path}', '--config.num_clients=4',
                 '--config.clients_per_round=3', '--config.algorithm=fedavg')
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    with open(os.path.join(workdir, 'run', 'metrics.jsonl')) as f:
      rows = [json.loads(line) for line in f]
    self.assertEqual(rows[-1]['clients'], 3)
    self.assertIsNone(rows[-1]['teacher_accuracy'])  # fedavg has no teacher


class BadInputTest(parameterized.TestCase):

  def _assert_one_line_error(self, proc, expected):
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    self.assertLen(lines, 1, proc.stderr)
    self.assertStartsWith(lines[0], 'error: ')
    self.assertIn(expected, lines[0])

  @parameterized.named_parameters(
      ('dataset', ['--config.dataset=nope'], 'unknown dataset'),
      ('algorithm', ['--config.algorithm=nope'], 'unknown algorithm'),
      ('model', ['--config.student=nope'], 'unknown student'),
      ('partition', ['--config.partition=nope'], 'unknown partition'),
      ('alpha', ['--config.alpha=0'], 'alpha must be > 0'),
      ('too_many_clients', ['--config.num_clients=5000',
                            '--config.clients_per_round=10'],
       'more clients than examples'),
      ('cohort', ['--config.clients_per_round=200'],
       'clients_per_round=200 exceeds num_clients=100'),
      ('batch_size', ['--config.batch_size=0'], 'batch_size must be >= 1'),
      ('no_public_data', ['--config.algorithm=fedmd'], 'needs public data'),
      ('server_model', ['--config.server_model=seed_teacher'],
       'server_model is only used by feddf'),
      ('wrong_type', ['--config.num_clients=abc'], 'num_clients'),
      ('unknown_field', ['--config.nope=1'], 'nope'),
  )
  def test_bad_config(self, args, expected):
    workdir = self.create_tempdir()
    workdir.create_file('metrics.jsonl', content='keep me\n')
    proc = _main(SMOKE, f'--workdir={workdir.full_path}', *args)
    self._assert_one_line_error(proc, expected)
    self.assertEqual(sorted(os.listdir(workdir.full_path)), ['metrics.jsonl'])
    with open(os.path.join(workdir.full_path, 'metrics.jsonl')) as f:
      self.assertEqual(f.read(), 'keep me\n')

  @parameterized.named_parameters(
      ('missing_keys', dict(x_test=None), 'missing arrays x_test'),
      ('mismatched', dict(y_train=np.zeros(39, int)),
       'x_train has 40 examples but y_train has 39'),
      ('nan', dict(x_train=np.full((40, 5), np.nan, np.float32)), 'NaN'),
  )
  def test_bad_npz(self, overrides, expected):
    tmp = self.create_tempdir().full_path
    path = _npz(os.path.join(tmp, 'bad.npz'), **overrides)
    proc = _main(SMOKE, f'--workdir={tmp}/run', f'--config.dataset=npz:{path}',
                 '--config.num_clients=4', '--config.clients_per_round=4')
    self._assert_one_line_error(proc, expected)

  def test_unwritable_workdir(self):
    blocker = self.create_tempfile('a_file').full_path
    proc = _main(SMOKE, f'--workdir={blocker}/run')
    self._assert_one_line_error(proc, 'cannot create workdir')


if __name__ == '__main__':
  absltest.main()
