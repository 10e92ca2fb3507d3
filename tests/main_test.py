"""The CLI end to end: the smoke config, and one clear line for bad input.

The bad-input cases run through tests/cli_forkserver.py: main.py in a forked
child per case, so each sees its real exit code and stderr.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile

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


# (name, extra arguments, text the one error line must contain). `{tmp}` is a
# scratch directory; every case runs against an existing workdir that holds a
# finished run's metrics.jsonl, which must come through untouched.
BAD_INPUTS = (
    ('dataset', ['--config.dataset=nope'], 'unknown dataset'),
    ('algorithm', ['--config.algorithm=nope'], 'unknown algorithm'),
    ('student', ['--config.student=nope'], 'unknown student'),
    ('teacher', ['--config.teacher=nope'], 'unknown teacher'),
    ('partition', ['--config.partition=nope'], 'unknown partition'),
    ('alpha', ['--config.alpha=0'], 'alpha must be > 0'),
    ('shards', ['--config.partition=shards', '--config.shards_per_client=0'],
     'shards_per_client must be >= 1'),
    ('too_many_clients', ['--config.num_clients=5000',
                          '--config.clients_per_round=10'],
     'more clients than examples'),
    ('cohort', ['--config.clients_per_round=200'],
     'clients_per_round=200 exceeds num_clients=100'),
    ('batch_size', ['--config.batch_size=0'], 'batch_size must be >= 1'),
    ('epochs', ['--config.local_epochs=0'], 'local_epochs must be >= 1'),
    ('rounds', ['--config.num_rounds=0'], 'num_rounds must be >= 1'),
    ('eval_every', ['--config.eval_every=0'], 'eval_every must be >= 1'),
    ('client_lr', ['--config.client_lr=-1'], 'client_lr must be a finite'),
    ('server_lr_inf', ['--config.server_lr=inf'], 'server_lr must be a finite'),
    ('temperature', ['--config.temperature=0'], 'temperature must be'),
    ('distill_weight', ['--config.distill_weight=1.5'],
     'distill_weight must be in [0, 1]'),
    ('client_optimizer', ['--config.client_optimizer=nope'],
     'unknown client_optimizer'),
    ('server_optimizer', ['--config.server_optimizer=nope'],
     'unknown server_optimizer'),
    ('dropout', ['--config.dropout_rate=1.0'], 'dropout_rate must be in'),
    ('straggler', ['--config.straggler_rate=-0.1'], 'straggler_rate must be'),
    ('noise_without_clip', ['--config.dp_noise_multiplier=1.0'],
     'needs clip_norm > 0'),
    ('dp_delta', ['--config.dp_delta=0'], 'delta must be in (0, 1)'),
    ('accountant', ['--config.dp_accountant=nope'], 'unknown accountant'),
    ('devices', ['--config.num_devices=99'], 'num_devices must be in'),
    ('chunk', ['--config.clients_per_chunk=-1'], 'clients_per_chunk must be'),
    ('checkpoint_every', ['--config.checkpoint_every=-1'],
     'checkpoint_every must be'),
    ('wrong_type', ['--config.num_clients=abc'], 'num_clients'),
    ('unknown_field', ['--config.nope=1'], 'nope'),
    ('config_variant', ['--config=experiments/configs/default.py:nope'],
     'unknown config variant'),
    ('config_file', ['--config=experiments/configs/nope.py'], 'nope.py'),
    ('process_id', ['--config.num_processes=2', '--config.process_id=2'],
     'process_id must be in [0, 2)'),
    ('coordinator', ['--config.num_processes=2'], 'needs coordinator_address'),
    ('synthetic', ['--config.dataset=synthetic',
                   '--config.synthetic_max_examples=10'],
     'synthetic_max_examples must be >= 50'),
    ('no_public_data', ['--config.algorithm=fedmd'], 'needs public data'),
    ('server_model', ['--config.server_model=seed_teacher'],
     'server_model is only used by feddf'),
    ('positional', ['extra'], 'unexpected arguments'),
    ('unknown_flag', ['--nope'], "Unknown command line flag 'nope'"),
    ('npz_file', ['--config.dataset=npz:{tmp}/absent.npz'], 'absent.npz'),
    ('npz_keys', ['--config.dataset=npz:{tmp}/keys.npz'],
     'missing arrays x_test'),
    ('npz_shapes', ['--config.dataset=npz:{tmp}/shapes.npz'],
     'x_train has 40 examples but y_train has 39'),
    ('npz_nan', ['--config.dataset=npz:{tmp}/nan.npz'], 'NaN'),
    ('other_run', ['--config.seed=5'], 'holds a run with a different config'),
)
_NPZ_ARGS = ['--config.num_clients=4', '--config.clients_per_round=4']


class BadInputTest(parameterized.TestCase):
  """Every bad setting: exit 2, one `error:` line, the workdir untouched."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    tmp = tempfile.mkdtemp()
    _npz(f'{tmp}/keys.npz', x_test=None)
    _npz(f'{tmp}/shapes.npz', y_train=np.zeros(39, int))
    _npz(f'{tmp}/nan.npz', x_train=np.full((40, 5), np.nan, np.float32))
    # A finished run every bad invocation points at.
    cls.workdir = f'{tmp}/existing'
    proc = _main(SMOKE, f'--workdir={cls.workdir}')
    assert proc.returncode == 0, proc.stderr
    cls.before = _snapshot(cls.workdir)

    def args_of(case):
      name, args, _ = case
      args = [a.format(tmp=tmp) for a in args]
      if name.startswith('npz'):
        args += _NPZ_ARGS
      if not any(a.startswith('--config=') for a in args):
        args = [SMOKE] + args
      return args + [f'--workdir={cls.workdir}']

    env = dict(os.environ, XLA_FLAGS='')
    proc = subprocess.run(
        [sys.executable, 'tests/cli_forkserver.py'], cwd=ROOT, env=env,
        input=json.dumps([args_of(c) for c in BAD_INPUTS]),
        capture_output=True, text=True, timeout=600, check=True)
    cls.results = {case[0]: result for case, result in
                   zip(BAD_INPUTS, json.loads(proc.stdout))}

  @parameterized.named_parameters(*BAD_INPUTS)
  def test_bad_input(self, args, expected):
    del args
    code, stderr = self.results[
        self._testMethodName.removeprefix('test_bad_input').lstrip('_')]
    self.assertEqual(code, 2, stderr[-2000:])
    lines = [l for l in stderr.splitlines() if l.strip()]
    self.assertLen(lines, 1, stderr)
    self.assertStartsWith(lines[0], 'error: ')
    self.assertIn(expected, lines[0])
    self.assertEqual(_snapshot(self.workdir), self.before)

  def test_at_least_25_cases(self):
    self.assertGreaterEqual(len(BAD_INPUTS), 25)

  def test_unwritable_workdir(self):
    blocker = self.create_tempfile('a_file').full_path
    proc = _main(SMOKE, f'--workdir={blocker}/run')
    self.assertEqual(proc.returncode, 2, proc.stderr)
    self.assertIn('cannot create workdir', proc.stderr)


class SignalTest(parameterized.TestCase):
  """A signal during compilation: one line, 128 + signal, nothing written."""

  @parameterized.parameters(signal.SIGINT, signal.SIGTERM)
  def test_signal_during_compilation(self, signum):
    workdir = self.create_tempdir().full_path
    proc = subprocess.Popen(
        [sys.executable, 'experiments/main.py', SMOKE, f'--workdir={workdir}'],
        cwd=ROOT, env=dict(os.environ, XLA_FLAGS=''), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
      if line.startswith('compiling'):
        break
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    self.assertEqual(proc.returncode, 128 + signum, err)
    name = signal.Signals(signum).name
    self.assertEqual(err, f'stopped by {name} during compilation; no round '
                     'was run, nothing saved\n')
    self.assertEmpty(os.listdir(workdir))


# Runs main.py with the address space limited to what JAX occupies once
# started plus 2 GiB, so an allocation beyond that fails whatever the
# machine's memory and overcommit policy.
_LIMITED_MAIN = """
import os, resource, runpy, sys
import jax
jax.jit(lambda x: x + 1)(1.0)
with open('/proc/self/status') as f:
  vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith('VmSize'))
resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), resource.RLIM_INFINITY))
sys.argv = ['experiments/main.py', *sys.argv[1:]]
sys.path[0] = os.path.abspath('experiments')
runpy.run_path('experiments/main.py', run_name='__main__')
"""


class OutOfMemoryTest(absltest.TestCase):

  def test_round_too_large_names_the_settings_to_lower(self):
    workdir = self.create_tempdir().full_path
    # A million local epochs: the round's step schedule alone needs ~40 GB.
    env = dict(os.environ, XLA_FLAGS='', MALLOC_ARENA_MAX='2')
    proc = subprocess.run(
        [sys.executable, '-c', _LIMITED_MAIN, SMOKE, f'--workdir={workdir}',
         '--config.local_epochs=1000000'], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300, check=False)
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    self.assertNotIn('Traceback', proc.stderr)
    last = proc.stderr.strip().splitlines()[-1]
    self.assertStartsWith(last, 'error: out of memory in round 1 (')
    self.assertIn('--config.clients_per_chunk=25', last)
    self.assertIn('no checkpoint was saved', last)


def _snapshot(workdir):
  """Every file under `workdir` with its bytes."""
  files = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        files[os.path.relpath(path, workdir)] = f.read()
  return files


if __name__ == '__main__':
  absltest.main()
