"""The CLI end to end: the smoke config, and one clear line for bad input.

The bad-input cases run through tests/cli_forkserver.py: main.py in a forked
child per case, so each sees its real exit code and stderr.
"""

import errno
import fcntl
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from unittest import mock
import zipfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from experiments import runner
from experiments import validation
from experiments.configs import default
from fedkd.errors import FedkdError
import rundirs
import toys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = '--config=experiments/configs/default.py:smoke'


def _main(*args):
  env = toys.subprocess_env()  # one device, as a user would run it
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


def _claiming_npz(path, shape):
  """A dataset .npz whose x_train header claims `shape` over 40 bytes."""
  _npz(path, x_train=None)
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      header, {'descr': '<f4', 'fortran_order': False, 'shape': shape})
  with zipfile.ZipFile(path, 'a') as archive:
    archive.writestr('x_train.npy', header.getvalue() + bytes(40))


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

  def test_runs_as_a_module_too(self):
    proc = subprocess.run(
        [sys.executable, '-m', 'experiments.main', '--help'], cwd=ROOT,
        capture_output=True, text=True, timeout=300, check=False)
    # absl's --help exits 1 after printing the flags.
    self.assertEqual(proc.stderr, '')
    self.assertIn('--workdir', proc.stdout)

  def _loads_config(self, *command, cwd=ROOT):
    """The config loads: only the validation refuses num_rounds=0."""
    proc = subprocess.run(
        [sys.executable, *command, '--config.num_rounds=0',
         f'--workdir={self.create_tempdir().full_path}/run'], cwd=cwd,
        env=toys.subprocess_env(), capture_output=True, text=True,
        timeout=300, check=False)
    toys.assert_error_line(self, proc.returncode, proc.stderr,
                           'num_rounds must be >= 1, got 0')

  def test_paper_config_loads_under_python_m(self):
    # It imports experiments.configs.default.
    self._loads_config(
        '-m', 'experiments.main',
        '--config=experiments/configs/compare_digits.py:smoke')

  def test_default_config_loads_from_any_working_directory(self):
    self._loads_config(os.path.join(ROOT, 'experiments', 'main.py'),
                       cwd=self.create_tempdir().full_path)

  def test_lists_of_names_may_have_spaces_after_commas(self):
    workdir = self.create_tempdir().full_path
    proc = _main(SMOKE, f'--workdir={workdir}/run',
                 '--config.algorithm=local_kd',
                 '--config.client_models=seed_student, seed_teacher')
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    with open(os.path.join(workdir, 'run', 'config.json')) as f:
      self.assertEqual(json.load(f)['client_models'],
                       'seed_student,seed_teacher')

  def test_npz_dataset_and_overrides(self):
    workdir = self.create_tempdir().full_path
    path = _npz(os.path.join(workdir, 'd.npz'))
    args = (SMOKE, f'--workdir={workdir}/run', f'--config.dataset=npz:{path}',
            '--config.num_clients=4', '--config.clients_per_round=3',
            '--config.algorithm=fedavg', '--config.clients_per_chunk=2',
            '--config.clients_per_chunk=none')
    proc = _main(*args)
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    with open(os.path.join(workdir, 'run', 'metrics.jsonl')) as f:
      rows = [json.loads(line) for line in f]
    self.assertEqual(rows[-1]['clients'], 3)
    with open(os.path.join(workdir, 'run', 'config.json')) as f:
      self.assertIsNone(json.load(f)['clients_per_chunk'])  # the last one
    self.assertIsNone(rows[-1]['teacher_accuracy'])  # fedavg has no teacher
    # The same command on a changed .npz is refused, not resumed.
    before = rundirs.snapshot(f'{workdir}/run')
    x = np.load(path)['x_train']
    x[0, 0] += 1
    _npz(path, x_train=x)
    proc = _main(*args)
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    self.assertStartsWith(proc.stderr, 'error: the dataset differs from the '
                          'one checkpoint 2')
    self.assertLen(proc.stderr.strip().splitlines(), 1, proc.stderr)
    self.assertEqual(rundirs.snapshot(f'{workdir}/run'), before)


# (name, extra arguments, text the one error line must contain). `{tmp}` is a
# scratch directory; every case runs against an existing workdir that holds a
# finished run's metrics.jsonl, which must come through untouched.
BAD_INPUTS = (
    ('dataset', ['--config.dataset=nope'], 'unknown dataset'),
    ('algorithm', ['--config.algorithm=nope'], 'unknown algorithm'),
    ('student', ['--config.student=nope'], 'unknown student'),
    ('teacher', ['--config.teacher=nope'], 'unknown teacher'),
    ('partition', ['--config.partition=nope'], 'unknown partition'),
    ('alpha_huge', ['--config.partition=dirichlet', '--config.alpha=1e308'],
     'got 1e+308; for an IID split use partition=iid'),
    ('alpha', ['--config.alpha=0'], 'alpha must be > 0'),
    ('shards', ['--config.partition=shards', '--config.shards_per_client=0'],
     'shards_per_client must be >= 1'),
    ('too_many_clients', ['--config.num_clients=5000',
                          '--config.clients_per_round=10'],
     'more clients than examples'),
    ('cohort_2_20', ['--config.num_clients=2000000',
                     '--config.clients_per_round=1048577'],
     'clients_per_round must be <= 1048576'),
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
    ('client_fedadam', ['--config.client_optimizer=fedadam'],
     "client_optimizer 'fedadam' is a server optimizer"),
    ('server_optimizer', ['--config.server_optimizer=nope'],
     'unknown server_optimizer'),
    ('dropout', ['--config.dropout_rate=1.0'], 'dropout_rate must be in'),
    ('straggler', ['--config.straggler_rate=-0.1'], 'straggler_rate must be'),
    ('noise_without_clip', ['--config.dp_noise_multiplier=1.0'],
     'dp_noise_multiplier=1.0 needs dp_clip_norm > 0 (noise without clipping'
     ' gives no privacy); set dp_clip_norm'),
    ('dp_clip_negative', ['--config.dp_clip_norm=-1'],
     'dp_clip_norm must be a finite number >= 0, got -1'),
    ('dp_noise_negative', ['--config.dp_noise_multiplier=-1'],
     'dp_noise_multiplier must be a finite number >= 0'),
    ('dp_delta', ['--config.dp_delta=0'], 'dp_delta must be in (0, 1)'),
    ('accountant', ['--config.dp_accountant=nope'],
     "unknown dp_accountant 'nope'"),
    ('devices', ['--config.num_devices=99'], 'num_devices must be in'),
    ('chunk', ['--config.clients_per_chunk=-1'], 'clients_per_chunk must be'),
    ('checkpoint_every', ['--config.checkpoint_every=-1'],
     'checkpoint_every must be'),
    ('wrong_type', ['--config.num_clients=abc'], 'num_clients'),
    ('unknown_field', ['--config.nope=1'], 'nope'),
    ('field_of_a_setting', ['--config.student.width=1'],
     '--config.student.width: student is one setting, not a group of fields;'
     ' set it with --config.student=VALUE'),
    ('config_variant', ['--config=experiments/configs/default.py:nope'],
     'unknown config variant'),
    ('config_file', ['--config=experiments/configs/nope.py'], 'nope.py'),
    # Broken config files (_CONFIG_FILES).
    ('config_syntax', ['--config={tmp}/syntax.py'],
     'syntax.py: SyntaxError: invalid syntax (line 1)'),
    ('config_raises', ['--config={tmp}/raises.py'], 'RuntimeError: boom'),
    ('config_import', ['--config={tmp}/imports.py'],
     "ModuleNotFoundError: No module named 'no_such_module'"),
    ('config_dict', ['--config={tmp}/dict.py'],
     'get_config() returned a dict, not an ml_collections.ConfigDict'),
    ('config_fields', ['--config={tmp}/fields.py'],
     'its config lacks the fields algorithm, alpha, batch_size'),
    ('config_no_get', ['--config={tmp}/no_get.py', '--config.seed=1'],
     'it defines no get_config(); start from experiments/configs/default.py'),
    ('process_id', ['--config.num_processes=2', '--config.process_id=2'],
     'process_id must be in [0, 2)'),
    ('coordinator', ['--config.num_processes=2'], 'needs coordinator_address'),
    ('coordinator_no_host', ['--config.num_processes=2',
                             '--config.coordinator_address=:1234'],
     'needs coordinator_address=HOST:PORT'),
    ('coordinator_port', ['--config.num_processes=2',
                          '--config.coordinator_address=localhost:abc'],
     "the port must be an integer in 1..65535, got 'abc'"),
    ('coordinator_port_range', ['--config.num_processes=2',
                                '--config.coordinator_address=[::1]:65536'],
     "the port must be an integer in 1..65535, got '65536'"),
    ('synthetic', ['--config.dataset=synthetic',
                   '--config.synthetic_max_examples=10'],
     'synthetic_max_examples must be >= 50'),
    ('no_public_data', ['--config.algorithm=fedmd',
                        '--config.dataset=synthetic'], 'needs public data'),
    ('server_model', ['--config.server_model=seed_teacher'],
     'server_model is only used by feddf'),
    ('client_models_algorithm', ['--config.algorithm=fedavg',
                                 '--config.client_models=seed_student,'
                                 'mnist_2nn'],
     "fedavg, which averages the clients' models"),
    ('client_models_twice', ['--config.algorithm=fd',
                             '--config.client_models=mnist_2nn,mnist_2nn'],
     'lists a model twice'),
    ('client_models_name', ['--config.algorithm=fd',
                            '--config.client_models=mnist_2nn,nope'],
     'nope'),
    ('client_models_cohort', ['--config.algorithm=fd',
                              '--config.client_models=mnist_2nn,logreg',
                              '--config.clients_per_round=1'],
     'fewer than the 2 client_models'),
    ('client_models_server', ['--config.algorithm=feddf',
                              '--config.client_models=mnist_2nn,logreg',
                              '--config.server_model=seed_teacher'],
     'leave server_model empty'),
    ('positional', ['extra'], 'unexpected arguments'),
    ('unknown_flag', ['--nope'], "Unknown command line flag 'nope'"),
    ('npz_file', ['--config.dataset=npz:{tmp}/absent.npz'], 'absent.npz'),
    ('npz_keys', ['--config.dataset=npz:{tmp}/keys.npz'],
     'missing arrays x_test'),
    ('npz_shapes', ['--config.dataset=npz:{tmp}/shapes.npz'],
     'x_train has 40 examples but y_train has 39'),
    ('npz_nan', ['--config.dataset=npz:{tmp}/nan.npz'], 'NaN'),
    ('tfds_download_off', ['--config.dataset=mnist',
                           '--config.data_dir={tmp}/tfds',
                           '--config.tfds_download=False'],
     'not prepared under '),
    ('data_dir_file', ['--config.dataset=mnist',
                       '--config.data_dir={tmp}/keys.npz'],
     'keys.npz is not a directory'),
    ('data_dir_under_file', ['--config.dataset=mnist',
                             '--config.data_dir={tmp}/keys.npz/tfds'],
     'keys.npz/tfds is not a directory'),
    ('other_run', ['--config.seed=5'], 'holds a run with a different config'),
    # The run directory: `workdir_*` cases run against a copy of the existing
    # run changed by _PREPARED[name] (locked while they run: _LOCKED).
    ('npz_labels_int64', ['--config.dataset=npz:{tmp}/labels_int64.npz'],
     'y_train has labels in [0, 2147483649]'),
    ('npz_labels_uint64', ['--config.dataset=npz:{tmp}/labels_uint64.npz'],
     'y_test has labels in [0, 4294967297]'),
    ('npz_labels_sparse', ['--config.dataset=npz:{tmp}/labels_sparse.npz'],
     'the largest label is 1000000 but only 5 of the 1,000,001 classes'),
    ('npz_objects', ['--config.dataset=npz:{tmp}/objects.npz'],
     'objects.npz: y_train holds Python objects'),
    ('npz_labels_overwrite', ['--config.overwrite=True',
                              '--config.dataset=npz:{tmp}/labels_int64.npz'],
     'y_train has labels in'),
    ('synthetic_alpha_inf', ['--config.dataset=synthetic',
                             '--config.synthetic_alpha=inf'],
     'synthetic_alpha'),
    ('synthetic_beta_inf', ['--config.dataset=synthetic',
                            '--config.synthetic_beta=inf'],
     'synthetic_beta'),
    ('num_rounds_below_done', ['--config.num_rounds=1'],
     'num_rounds=1 is below the 2 rounds'),
    ('workdir_locked', [], 'is in use by another run'),
    ('workdir_locked_overwrite', ['--config.overwrite=True'],
     'is in use by another run'),
    ('workdir_no_config', ['--config.algorithm=fedkd', '--config.seed=5'],
     "config in checkpoint 2 (algorithm: 'local_kd' there, 'fedkd' now)"),
    ('workdir_config_null', ['--config.seed=5'],
     'config.json holds null, not a config object'),
    ('workdir_config_list', [], 'config.json holds [], not a config object'),
    ('workdir_checkpoints_file', [], 'checkpoints is not a directory'),
    ('workdir_metrics_dir', [], 'metrics.jsonl is not a regular file'),
    ('workdir_meta_empty', [], 'its metadata has no config'),
    ('workdir_meta_rows', [], 'its metric rows are not objects'),
    ('workdir_other_data', [], 'the dataset differs from the one checkpoint'),
    ('workdir_comparison', [], 'holds a comparison (fedavg); a single run '
     'would write among its files: use another workdir'),
    ('workdir_fedkd_rounds', ['--config.algorithm=fedkd',
                              '--config.num_rounds=3'],
     "(num_rounds: 2 there, 3 now; fedkd's SVD energy schedule"),
    # Float fields are finite; DP only where it is sound.
    ('prox_mu_nan', ['--config.prox_mu=nan'], 'prox_mu must be a finite'),
    ('ntd_beta_inf', ['--config.ntd_beta=inf'], 'ntd_beta must be a finite'),
    ('client_lr_inf', ['--config.client_lr=-inf'], 'client_lr must be a'),
    # Finite in float64, not in the run's float32.
    ('client_lr_float32', ['--config.client_lr=1e300'],
     'client_lr must be a finite number (float32: at most 3.403e+38'),
    ('server_lr_float32', ['--config.server_lr=-3.5e38'],
     'server_lr must be a finite number'),
    ('dp_feddf', ['--config.algorithm=feddf', '--config.public_examples=50',
                  '--config.dp_clip_norm=0.5'],
     'DP is not supported by feddf'),
    ('dp_fd', ['--config.algorithm=fd', '--config.dp_clip_norm=0.5'],
     'DP is not supported by fd'),
    ('dp_fedmd', ['--config.algorithm=fedmd', '--config.public_examples=50',
                  '--config.dp_clip_norm=0.5'],
     'DP is not supported by fedmd'),
    ('max_nonfinite_rounds', ['--config.max_nonfinite_rounds=0'],
     'max_nonfinite_rounds must be >= 1'),
    # Clear errors instead of tracebacks or hangs.
    ('seed_negative', ['--config.seed=-1'], 'seed must be in [0, 2**32)'),
    ('compare_seeds', ['--config.compare=fedavg,fedprox',
                       '--config.seed=4294967295', '--config.num_seeds=2'],
     'seed + num_seeds - 1 must be below 2**32 (the last run\'s seed), got '
     '4294967295 + 2 - 1 = 4294967296'),
    ('seed_too_big', ['--config.seed=4294967296'], 'seed must be in [0, 2**32)'),
    ('alpha_inf', ['--config.alpha=inf'], 'alpha must be a finite'),
    ('alpha_nan', ['--config.alpha=nan'], 'alpha must be a finite'),
    ('fedkd_rounds_int32', ['--config.algorithm=fedkd',
                            '--config.num_rounds=2147483648'],
     'num_rounds must be < 2**31'),
    ('dataset_empty', ['--config.dataset='], 'dataset is empty'),
    ('dataset_unparsable', ['--config.dataset=a b'],
     "dataset 'a b' is neither digits"),
    ('npz_zero_width', ['--config.dataset=npz:{tmp}/zero_width.npz'],
     'examples without features'),
    ('npz_cnn_on_vectors', ['--config.dataset=npz:{tmp}/vectors.npz',
                            '--config.student=mnist_cnn'],
     "student 'mnist_cnn' cannot take examples of shape (5,)"),
    ('resnet_on_synthetic', ['--config.dataset=synthetic',
                             '--config.student=resnet8_gn'],
     'ResNets need images'),
    ('npz_huge_header', ['--config.dataset=npz:{tmp}/huge.npz'],
     'x_train claims shape (1000000000000, 5)'),
    ('npz_device', ['--config.dataset=npz:/dev/zero'], 'not a regular file'),
    ('coordinator_unreachable', ['--config.num_processes=2',
                                 '--config.process_id=1',
                                 '--config.coordinator_address=127.0.0.1:1',
                                 '--config.coordinator_timeout=2'],
     'did not all join within coordinator_timeout=2 s'),
    ('coordinator_timeout', ['--config.coordinator_timeout=0'],
     'coordinator_timeout must be a finite number of seconds > 0'),
    ('dp_noise_inf', ['--config.dp_clip_norm=1',
                      '--config.dp_noise_multiplier=inf'],
     'dp_noise_multiplier must be a finite'),
    ('dp_clip_inf', ['--config.dp_clip_norm=inf'],
     'dp_clip_norm must be a finite'),
    ('distill_val_fraction', ['--config.distill_val_fraction=1.0'],
     'distill_val_fraction must be in [0, 1)'),
    ('distill_val_no_proxy', ['--config.algorithm=feddf',
                              '--config.public_examples=1'],
     'leaves no proxy data to distill on'),
    # Beyond int64 or a C int.
    ('num_clients_huge', ['--config.dataset=synthetic',
                          '--config.num_clients=18446744073709551616'],
     'num_clients must be < 2**31'),
    ('synthetic_max_huge', ['--config.dataset=synthetic',
                            '--config.synthetic_max_examples='
                            '18446744073709551616'],
     'synthetic_max_examples must be < 2**31'),
    ('num_processes_huge', ['--config.num_processes=100000000000000000000',
                            '--config.coordinator_address=localhost:45672'],
     'num_processes must be < 2**31'),
    ('coordinator_timeout_huge', ['--config.coordinator_timeout=1e300'],
     'coordinator_timeout must be a finite number of seconds > 0 and < 2**30'),
    ('batch_size_huge', ['--config.batch_size=18446744073709551616'],
     'batch_size must be < 2**31'),
    ('distill_patience_huge', ['--config.algorithm=feddf',
                               '--config.distill_patience=2147483648'],
     'distill_patience must be < 2**31'),
    # 10**9 clients' examples need terabytes.
    ('synthetic_memory', ['--config.dataset=synthetic',
                          '--config.num_clients=1000000000'],
     'num_clients=1000000000 of dataset=synthetic need at least 11,362.1 GiB'),
    # A stage's steps are a scan's length, an int32 (143 public examples,
    # the largest client 38).
    ('local_epochs_int32', ['--config.local_epochs=2147483648'],
     'local_epochs=2147483648 makes 8,589,934,592 steps'),
    ('distill_epochs_int32', ['--config.algorithm=feddf',
                              '--config.distill_epochs=1000000000'],
     'distill_epochs=1000000000 makes 3,000,000,000 steps'),
    ('digest_epochs_int32', ['--config.algorithm=fedmd',
                             '--config.digest_epochs=1000000000'],
     'digest_epochs=1000000000 makes 3,000,000,000 steps'),
    ('transfer_epochs_int32', ['--config.algorithm=fedmd',
                               '--config.fedmd_transfer_epochs=1000000000'],
     'lower fedmd_transfer_epochs'),
    ('private_epochs_int32', ['--config.algorithm=fedmd',
                              '--config.fedmd_private_epochs=1000000000'],
     'lower fedmd_private_epochs'),
)


def _replace(name, text=None):
  """Prepares a workdir whose `name` holds `text`, or is a directory."""
  def prepare(workdir):
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    else:
      os.remove(path)
    if text is None:
      os.makedirs(os.path.join(path, 'inner'))
    else:
      with open(path, 'w') as f:
        f.write(text)
  return prepare


def _as_fedkd(workdir):
  """The existing run as if it had been a fedkd run."""
  fedkd = lambda config: {**config, 'algorithm': 'fedkd'}
  rundirs.edit_json(os.path.join(workdir, 'config.json'), fedkd)
  rundirs.edit_checkpoint_metas(
      workdir, lambda meta: {**meta, 'config': fedkd(meta['config'])})


def _as_comparison(workdir):
  """The existing run moved to WORKDIR/fedavg, a comparison's sub-run."""
  names = os.listdir(workdir)
  os.makedirs(os.path.join(workdir, 'fedavg'))
  for name in names:
    shutil.move(os.path.join(workdir, name), os.path.join(workdir, 'fedavg'))


_LOCKED = ('workdir_locked', 'workdir_locked_overwrite')
_PREPARED = {
    'workdir_locked': lambda workdir: None,
    'workdir_locked_overwrite': lambda workdir: None,
    'workdir_no_config': lambda w: os.remove(os.path.join(w, 'config.json')),
    'workdir_config_null': _replace('config.json', 'null'),
    'workdir_config_list': _replace('config.json', '[]'),
    'workdir_checkpoints_file': _replace('checkpoints', 'x'),
    'workdir_metrics_dir': _replace('metrics.jsonl'),
    'workdir_meta_empty': lambda w: rundirs.edit_checkpoint_metas(
        w, lambda meta: {}),
    'workdir_meta_rows': lambda w: rundirs.edit_checkpoint_metas(
        w, lambda meta: {**meta, 'rows': ['x']}),
    'workdir_other_data': lambda w: rundirs.edit_checkpoint_metas(
        w, lambda meta: {**meta, 'data': 'f' * 64}),
    'workdir_fedkd_rounds': _as_fedkd,
    'workdir_comparison': _as_comparison,
}
_NPZ_ARGS = ['--config.num_clients=4', '--config.clients_per_round=4']
# Config files that do not load, or lack fields.
_CONFIG_FILES = {
    'syntax.py': 'def get_config(:\n',
    'raises.py': 'def get_config(arg=None):\n  raise RuntimeError("boom")\n',
    'imports.py': 'import no_such_module\n',
    'dict.py': 'def get_config(arg=None):\n  return {"num_clients": 3}\n',
    'fields.py': 'import ml_collections\ndef get_config():\n'
                 '  return ml_collections.ConfigDict({"num_clients": 3})\n',
    'no_get.py': 'x = 1\n',
}


class BadInputTest(parameterized.TestCase):
  """Every bad setting: exit 2, one `error:` line, the workdir untouched."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    tmp = tempfile.mkdtemp()
    _npz(f'{tmp}/keys.npz', x_test=None)
    _npz(f'{tmp}/shapes.npz', y_train=np.zeros(39, int))
    _npz(f'{tmp}/nan.npz', x_train=np.full((40, 5), np.nan, np.float32))
    _npz(f'{tmp}/vectors.npz')
    _npz(f'{tmp}/zero_width.npz', x_train=np.zeros((40, 0), np.float32),
         x_test=np.zeros((10, 0), np.float32))
    _claiming_npz(f'{tmp}/huge.npz', (10**12, 5))
    _npz(f'{tmp}/labels_int64.npz', y_train=np.arange(40) % 3 + 2**31 * (
        np.arange(40) == 7))
    _npz(f'{tmp}/labels_sparse.npz', y_train=np.arange(40) % 4 + (
        10**6 - 3) * (np.arange(40) == 7))
    _npz(f'{tmp}/objects.npz', y_train=np.arange(40).astype(object))
    _npz(f'{tmp}/labels_uint64.npz',
         y_test=np.array([0, 1, 2] * 3 + [2**32 + 1], np.uint64))
    for name, text in _CONFIG_FILES.items():
      with open(f'{tmp}/{name}', 'w') as f:
        f.write(text)
    # A finished run every bad invocation points at.
    cls.workdir = f'{tmp}/existing'
    proc = _main(SMOKE, f'--workdir={cls.workdir}')
    assert proc.returncode == 0, proc.stderr
    cls.before = rundirs.snapshot(cls.workdir)
    cls.prepared = {}
    for name, prepare in _PREPARED.items():
      path = f'{tmp}/{name}'
      shutil.copytree(cls.workdir, path)
      prepare(path)
      cls.prepared[name] = path, rundirs.snapshot(path)

    def args_of(case):
      name, args, _ = case
      args = [a.format(tmp=tmp) for a in args]
      if name.startswith('npz'):
        args += _NPZ_ARGS
      if not any(a.startswith('--config=') for a in args):
        args = [SMOKE] + args
      workdir = cls.prepared.get(name, (cls.workdir,))[0]
      return args + [f'--workdir={workdir}']

    env = toys.subprocess_env()
    # What a live run holds on its workdir.
    locks = [os.open(f'{tmp}/{name}/.fedkd.lock', os.O_RDWR)
             for name in _LOCKED]
    for lock in locks:
      fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      proc = subprocess.run(
          [sys.executable, 'tests/cli_forkserver.py'], cwd=ROOT, env=env,
          input=json.dumps([args_of(c) for c in BAD_INPUTS]),
          capture_output=True, text=True, timeout=600, check=True)
    finally:
      for lock in locks:
        os.close(lock)
    cls.results = {case[0]: result for case, result in
                   zip(BAD_INPUTS, json.loads(proc.stdout))}

  @parameterized.named_parameters(*BAD_INPUTS)
  def test_bad_input(self, args, expected):
    del args
    name = self._testMethodName.removeprefix('test_bad_input').lstrip('_')
    toys.assert_error_line(self, *self.results[name], expected)
    workdir, before = self.prepared.get(name, (self.workdir, self.before))
    self.assertEqual(rundirs.snapshot(workdir), before)

  def test_unwritable_workdir(self):
    blocker = self.create_tempfile('a_file').full_path
    proc = _main(SMOKE, f'--workdir={blocker}/run')
    self.assertEqual(proc.returncode, 2, proc.stderr)
    self.assertIn('cannot create workdir', proc.stderr)


class StepsTest(absltest.TestCase):
  """A stage's steps, epochs x batches, must stay below 2**31."""

  def test_limit_is_exact(self):
    config = default.get_config('smoke')
    # 3 batches of 10 over the largest client's 21 examples.
    config.local_epochs = (2**31 - 1) // 3
    validation.validate_steps(config, max_examples=21, num_public=0)
    config.local_epochs += 1
    with self.assertRaisesRegex(FedkdError, 'makes 2,147,483,649 steps'):
      validation.validate_steps(config, max_examples=21, num_public=0)


class SignalTest(parameterized.TestCase):
  """A signal during compilation: one line, 128 + signal, nothing written."""

  @parameterized.parameters(signal.SIGINT, signal.SIGTERM)
  def test_signal_during_compilation(self, signum):
    # Both go through one handler (fedkd.stopping); SIGTERM during training
    # is resume_test's. SIGTERM here with FEDKD_FULL_TESTS=1.
    toys.full_or(self, signum == signal.SIGINT)
    workdir = self.create_tempdir().full_path
    proc = subprocess.Popen(
        [sys.executable, 'experiments/main.py', SMOKE, f'--workdir={workdir}'],
        # No compilation cache: compiling must take long enough to be hit.
        # XLA's default flags: the tests' faster ones shorten compiling.
        cwd=ROOT, env=dict(os.environ, XLA_FLAGS='',
                           JAX_COMPILATION_CACHE_DIR=''),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
      if line.startswith('compiling'):
        break
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    self.assertEqual(proc.returncode, 128 + signum, err)
    name = signal.Signals(signum).name
    self.assertEqual(err, f'stopped by {name} during compilation; this run '
                     'saved nothing yet, rerun the same command to start '
                     'it\n')
    # Only the workdir's lock file, taken before compiling, is left.
    self.assertEqual(os.listdir(workdir), ['.fedkd.lock'])

  def test_signal_once_the_outcome_stands_keeps_its_exit_code(self):
    # Python's teardown restores the default handlers: a signal during it
    # would kill the process (-SIGTERM) instead of exiting with the code.
    workdir = self.create_tempdir().full_path
    proc = subprocess.run(
        [sys.executable, '-c', _SIGNAL_AT_TEARDOWN_MAIN, SMOKE,
         '--config.num_rounds=0', f'--workdir={workdir}'],
        cwd=ROOT, env=toys.subprocess_env(), capture_output=True, text=True,
        timeout=300, check=False)
    self.assertEqual(proc.returncode, 2, proc.stderr)
    self.assertEqual(proc.stderr, 'error: num_rounds must be >= 1, got 0\n')


# `python -c` code that runs main.py with the arguments given.
_RUN_MAIN = """
sys.argv = ['experiments/main.py', *sys.argv[1:]]
sys.path[0] = os.path.abspath('experiments')
runpy.run_path('experiments/main.py', run_name='__main__')
"""

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
""" + _RUN_MAIN

# Runs main.py with an object that sends SIGTERM when the interpreter's
# teardown deletes it, once main.py is done.
_SIGNAL_AT_TEARDOWN_MAIN = """
import os, runpy, signal, sys
class SignalAtTeardown:
  def __del__(self):
    os.kill(os.getpid(), signal.SIGTERM)
at_teardown = SignalAtTeardown()
""" + _RUN_MAIN


class OutOfMemoryTest(absltest.TestCase):

  def test_round_too_large_is_refused_naming_the_settings(self):
    workdir = self.create_tempdir().full_path
    # A million local epochs: the round's step schedule alone needs ~40 GB.
    env = toys.subprocess_env(MALLOC_ARENA_MAX='2')
    proc = subprocess.run(
        [sys.executable, '-c', _LIMITED_MAIN, SMOKE, f'--workdir={workdir}',
         '--config.local_epochs=1000000'], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300, check=False)
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    self.assertNotIn('Traceback', proc.stderr)
    last = proc.stderr.strip().splitlines()[-1]
    # Refused from the compiled round's buffers, before any round or write.
    self.assertRegex(last, r'^error: out of memory in a training round \('
                     r'it needs [\d,]+ MiB, [\d,]+ MiB are free\); ')
    self.assertIn('e.g. clients_per_chunk=25', last)
    self.assertIn("or local_epochs (now 1,000,000; the clients' shuffled "
                  'orders take', last)
    self.assertEqual(os.listdir(workdir), ['.fedkd.lock'])


class OutOfResourcesAnywhereTest(parameterized.TestCase):
  """Memory or disk running out outside a round: one line naming the fix."""

  @parameterized.named_parameters(
      ('memory_loading_data', 'fedkd.data.load_dataset', MemoryError(),
       r'^out of memory during the run \(MemoryError\); lower '
       'clients_per_chunk'),
      ('disk_full_taking_the_lock', 'fedkd.workdir.Workdir.__init__',
       OSError(errno.ENOSPC, 'No space left on device', '/full/.fedkd.lock'),
       r'^no space left on the disk holding /full/.fedkd.lock \(\[Errno 28\]'
       r' No space left on device.*\); free space there'),
      ('quota_in_a_wrapped_error', 'fedkd.workdir.Workdir.__init__',
       ValueError('write failed: Disk quota exceeded'),
       r'^no space left on the disk holding {workdir} \(write failed'))
  def test_one_line(self, target, error, pattern):
    workdir = self.create_tempdir().full_path
    with mock.patch(target, side_effect=error):
      with self.assertRaisesRegex(FedkdError, pattern.format(
          workdir=workdir)) as raised:
        runner.run(default.get_config('smoke'), workdir, progress=False)
    self.assertNotIn('\n', str(raised.exception))
    self.assertEmpty(os.listdir(workdir))


class DefaultPublicDataTest(parameterized.TestCase):
  """feddf and fedmd without public_examples hold out 10% of the training."""

  @parameterized.parameters(('feddf', 0, 1437, 143), ('fedmd', 0, 1437, 143),
                            ('fedmd', 50, 1437, 50), ('fedavg', 0, 1437, 0),
                            ('feddf', 0, 5, 1))
  def test_num_public(self, algorithm, public_examples, num_train, expected):
    config = default.get_config('smoke')
    config.update(algorithm=algorithm, public_examples=public_examples)
    self.assertEqual(runner.num_public(config, num_train), expected)

  def test_a_partition_left_too_little_names_the_hold_out(self):
    # 1,437 digits training examples less 1,430 public: 7 for 10 clients.
    config = default.get_config('smoke')
    config.update(algorithm='feddf', public_examples=1430, num_clients=10,
                  clients_per_round=10)
    with self.assertRaises(FedkdError) as raised:
      runner.load_data(config)
    self.assertIn('10 clients for 7 examples', str(raised.exception))
    self.assertIn('1430 of the 1437 training examples are held out as '
                  'public data; set public_examples lower',
                  str(raised.exception))

  def test_digits_split(self):
    config = default.get_config('smoke')
    config.algorithm = 'feddf'
    dataset, _, public_x, *_ = runner.load_data(config)
    # digits: 1,797 images, 360 of them in the test split; 10% of 1,437.
    self.assertLen(public_x, 143)
    self.assertLen(dataset.y_train, 1437 - 143)


if __name__ == '__main__':
  absltest.main()
