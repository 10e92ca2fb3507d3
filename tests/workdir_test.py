"""The run directory: lock, config and data checks, overwrite, file safety."""

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax.numpy as jnp
import numpy as np

from experiments import runner
from fedkd import checkpoint
from fedkd import data
from fedkd import workdir as workdir_lib
from fedkd.errors import FedkdError
import rundirs

CONFIG = {'algorithm': 'local_kd', 'seed': 0, 'num_rounds': 3,
          'eval_every': 1, 'svd_energy_start': 0.95, 'svd_energy_end': 0.98}
DATA = 'a' * 64
STATE = {'w': jnp.arange(4, dtype=jnp.float32)}
TOTALS = {'total_bytes': 0}


def _open(path, *, overwrite=False, data_hash=DATA, **changes):
  config = {**CONFIG, **changes}
  return workdir_lib.Workdir(path, config, data=data_hash,
                             overwrite=overwrite,
                             num_rounds=config['num_rounds'],
                             **runner.resumable(config))


def _write_run(path, rounds=(1, 2)):
  """What a run of CONFIG leaves: rows and a checkpoint per round."""
  work = _open(path)
  work.start([])
  rows = []
  for r in rounds:
    rows.append(workdir_lib.json_row({'round': r, 'loss': 1.0 / r}))
    work.append_row(rows[-1])
    work.save(r, STATE, {'rows': rows, 'totals': {'total_bytes': r}})
  work.write_final(STATE)
  work.close()


class WorkdirTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.reference = tempfile.mkdtemp() + '/run'
    os.makedirs(cls.reference)
    _write_run(cls.reference)

  def setUp(self):
    super().setUp()
    self.path = self.create_tempdir().full_path + '/run'
    shutil.copytree(self.reference, self.path)

  def assertRefused(self, expected, **kwargs):
    """Opening the workdir fails with one line and changes nothing."""
    before = rundirs.snapshot(self.path)
    with self.assertRaises(FedkdError) as cm:
      _open(self.path, **kwargs).close()
    self.assertIn(expected, str(cm.exception))
    self.assertNotIn('\n', str(cm.exception))
    self.assertEqual(rundirs.snapshot(self.path), before)

  def test_same_config_resumes_from_the_newest_checkpoint(self):
    work = _open(self.path)
    step, _, meta = work.restore(STATE, TOTALS)
    work.close()
    self.assertEqual(step, 2)
    self.assertEqual([r['round'] for r in meta['rows']], [1, 2])
    self.assertEqual((meta['config'], meta['data']), (CONFIG, DATA))

  # Overwrite.

  def test_overwrite_changes_nothing_before_start(self):
    before = rundirs.snapshot(self.path)
    work = _open(self.path, overwrite=True, seed=5)
    self.assertIsNone(work.restore(STATE, TOTALS))
    work.close()
    self.assertEqual(rundirs.snapshot(self.path), before)

  def test_overwrite_replaces_the_run_at_start(self):
    work = _open(self.path, overwrite=True, seed=5)
    work.start([])
    work.close()
    self.assertFalse(os.path.exists(os.path.join(self.path,
                                                 'final_params.msgpack')))
    self.assertEmpty(os.listdir(os.path.join(self.path, 'checkpoints')))
    with open(os.path.join(self.path, 'metrics.jsonl')) as f:
      self.assertEmpty(f.read())
    with open(os.path.join(self.path, 'config.json')) as f:
      self.assertEqual(json.load(f)['seed'], 5)

  def test_overwrite_resumes_a_run_of_the_same_config(self):
    before = rundirs.snapshot(self.path)
    work = _open(self.path, overwrite=True, eval_every=2)
    step, _, meta = work.restore(STATE, TOTALS)
    work.start(meta['rows'])
    work.close()
    self.assertEqual(step, 2)
    after = rundirs.snapshot(self.path)
    for name in ('final_params.msgpack', 'metrics.jsonl', 'checkpoints/2',
                 'checkpoints/2/state'):
      self.assertEqual(after[name], before[name])

  def test_overwrite_replaces_a_run_whose_checkpoints_do_not_load(self):
    for step in ('1', '2'):
      shutil.rmtree(os.path.join(self.path, 'checkpoints', step, 'state'))
    work = _open(self.path, overwrite=True)
    self.assertIsNone(work.restore(STATE, TOTALS))
    work.start([])
    work.close()
    self.assertEmpty(os.listdir(os.path.join(self.path, 'checkpoints')))

  def test_leftover_save_is_cleaned_up_only_once_a_run_starts(self):
    checkpoints = os.path.join(self.path, 'checkpoints')
    tmp = os.path.join(checkpoints, '8.orbax-checkpoint-tmp')
    shutil.copytree(os.path.join(checkpoints, '2'), tmp)
    os.remove(os.path.join(self.path, 'config.json'))
    self.assertRefused('config in checkpoint 1', seed=5)
    before = rundirs.snapshot(self.path)
    work = _open(self.path)
    step, _, meta = work.restore(STATE, TOTALS)
    self.assertEqual((step, rundirs.snapshot(self.path)), (2, before))
    work.start(meta['rows'])
    work.close()
    self.assertEqual(sorted(os.listdir(checkpoints)), ['1', '2'])

  # Writing.

  def test_read_only_directory_is_refused(self):
    # The workdir itself before its lock file (which exists here) is opened.
    for path in [self.path] + [os.path.join(self.path, name) for name in (
        'checkpoints', 'tensorboard', 'checkpoints/2/state')]:
      os.chmod(path, 0o555)
      try:
        if os.access(path, os.W_OK):
          self.skipTest('permissions do not bind this user (root)')
        self.assertRefused(f'{path} is not writable')
      finally:
        os.chmod(path, 0o755)

  def test_failed_save_is_one_error_line(self):
    work = _open(self.path)
    self.addCleanup(work.close)
    step, _, meta = work.restore(STATE, TOTALS)
    work.start(meta['rows'])
    read_only = OSError(errno.EROFS, 'Read-only file system', '/x/3.tmp')
    with mock.patch.object(checkpoint.Checkpointer, 'save',
                           side_effect=read_only):
      with self.assertRaises(FedkdError) as cm:
        work.save(step + 1, STATE, meta)
    self.assertStartsWith(str(cm.exception),
                          'cannot write /x/3.tmp (Read-only file system); ')
    self.assertNotIn('\n', str(cm.exception))
    # A full disk is left for `train.out_of_space_is` to name.
    full = OSError(errno.ENOSPC, 'No space left on device')
    with mock.patch.object(checkpoint.Checkpointer, 'save', side_effect=full):
      with self.assertRaises(OSError) as cm:
        work.save(step + 1, STATE, meta)
    self.assertIs(cm.exception, full)

  def test_metrics_deleted_during_a_run_are_written_anew(self):
    work = _open(self.path)
    self.addCleanup(work.close)
    _, _, meta = work.restore(STATE, TOTALS)
    work.start(meta['rows'])
    metrics = os.path.join(self.path, 'metrics.jsonl')
    os.remove(metrics)
    work.append_row({'round': 3, 'loss': 0.5})
    with open(metrics) as f:
      self.assertEqual([json.loads(l)['round'] for l in f], [1, 2, 3])

  # The lock.

  def test_second_run_is_refused_while_the_first_holds_the_lock(self):
    first = _open(self.path)
    try:
      self.assertRefused('is in use by another run')
      self.assertRefused('is in use by another run', overwrite=True, seed=5)
    finally:
      first.close()
    _open(self.path).close()  # released

  def test_deleting_the_lock_file_does_not_unlock(self):
    first = _open(self.path)
    try:
      os.remove(os.path.join(self.path, '.fedkd.lock'))
      self.assertRefused('is in use by another run')
    finally:
      first.close()

  def test_lock_file_without_a_holder_does_not_block(self):
    # The reference run left its lock file behind.
    self.assertTrue(os.path.exists(os.path.join(self.path, '.fedkd.lock')))
    _open(self.path).close()

  def test_lock_of_a_killed_process_does_not_block(self):
    holder = subprocess.Popen(
        [sys.executable, '-c',
         'import fcntl, os, sys, time\n'
         'fd = os.open(sys.argv[1], os.O_RDWR)\n'
         'fcntl.flock(fd, fcntl.LOCK_EX)\n'
         'print("locked", flush=True)\n'
         'time.sleep(600)\n', os.path.join(self.path, '.fedkd.lock')],
        stdout=subprocess.PIPE, text=True)
    self.addCleanup(holder.wait)
    self.addCleanup(holder.kill)
    self.assertEqual(holder.stdout.readline(), 'locked\n')
    self.assertRefused('is in use by another run')
    holder.kill()
    holder.wait()
    _open(self.path).close()

  # The config and the data in each checkpoint.

  @parameterized.named_parameters(
      ('missing', None), ('null', 'null'), ('list', '[]'), ('empty', ''))
  def test_other_config_is_refused_whatever_config_json_holds(self, text):
    config = os.path.join(self.path, 'config.json')
    if text is None:
      os.remove(config)
      expected = "config in checkpoint 1 (algorithm: 'local_kd' there"

    else:
      with open(config, 'w') as f:
        f.write(text)
      expected = 'config.json'
    self.assertRefused(expected, algorithm='fedkd', seed=5)

  def test_corrupt_config_json_advice_keeps_the_checkpoints(self):
    config = os.path.join(self.path, 'config.json')
    with open(config, 'w') as f:
      f.write('{"seed": ')
    self.assertRefused('remove it to resume from the checkpoints')
    os.remove(config)  # as advised
    work = _open(self.path)
    self.assertEqual(work.restore(STATE, TOTALS)[0], 2)
    work.close()
    # Without checkpoints there is nothing to keep.
    shutil.rmtree(os.path.join(self.path, 'checkpoints'))
    with open(config, 'w') as f:
      f.write('{"seed": ')
    self.assertRefused('use another workdir or set overwrite=True')

  def test_missing_config_json_resumes_by_the_checkpoint(self):
    os.remove(os.path.join(self.path, 'config.json'))
    work = _open(self.path)
    self.assertEqual(work.restore(STATE, TOTALS)[0], 2)
    work.close()

  def test_other_data_is_refused(self):
    self.assertRefused('the dataset differs from the one checkpoint 1',
                       data_hash='b' * 64)

  def test_checkpoint_without_config_is_refused(self):
    rundirs.edit_checkpoint_metas(self.path, lambda m: {
        k: v for k, v in m.items() if k != 'config'})
    self.assertRefused('no checkpoint in')

  # What may change on resume.

  @parameterized.named_parameters(
      ('more_rounds', dict(num_rounds=9)),
      ('fewer_rounds_not_below_done', dict(num_rounds=2)),
      ('eval_every', dict(eval_every=4)),
      ('chunks', dict(clients_per_chunk=5)),
      ('overwrite_flag', dict(overwrite=True)),
  )
  def test_resumable_changes(self, changes):
    config = {**CONFIG, **changes}
    work = workdir_lib.Workdir(self.path, config, data=DATA, overwrite=False,
                               num_rounds=config['num_rounds'],
                               **runner.resumable(config))
    self.assertEqual(work.restore(STATE, TOTALS)[0], 2)
    work.close()

  def test_num_rounds_below_the_rounds_done_is_refused(self):
    self.assertRefused('num_rounds=1 is below the 2 rounds', num_rounds=1)

  def test_num_rounds_refusal_names_the_newest_checkpoint(self):
    # Checkpoints 1, 2 and 3: resuming needs num_rounds >= 3, not 2.
    self.path = self.create_tempdir().full_path + '/run3'
    os.makedirs(self.path)
    _write_run(self.path, rounds=(1, 2, 3))
    self.assertRefused('num_rounds=1 is below the 3 rounds', num_rounds=1)
    self.assertRefused('set num_rounds >= 3', num_rounds=2)

  def test_fedkd_num_rounds_is_fixed_by_its_energy_schedule(self):
    os.remove(os.path.join(self.path, 'config.json'))
    rundirs.edit_checkpoint_metas(self.path, lambda m: {
        **m, 'config': {**CONFIG, 'algorithm': 'fedkd'}})
    self.assertRefused('(num_rounds: 3 there, 9 now; fedkd\'s SVD energy',
                       algorithm='fedkd', num_rounds=9)

  def test_fedkd_with_a_constant_energy_may_change_num_rounds(self):
    flat = dict(algorithm='fedkd', svd_energy_start=0.9, svd_energy_end=0.9)
    path = self.create_tempdir().full_path
    work = _open(path, **flat)
    work.start([])
    work.save(1, STATE, {'rows': [], 'totals': TOTALS})
    work.close()
    _open(path, num_rounds=9, **flat).close()

  def test_other_seed_is_refused_naming_the_field(self):
    self.assertRefused('(seed: 0 there, 5 now)', seed=5)

  # Corrupt or wrong-typed files.

  @parameterized.named_parameters(
      ('checkpoints_a_file', 'checkpoints', 'file', 'not a directory'),
      ('metrics_a_directory', 'metrics.jsonl', 'dir', 'not a regular file'),
      ('config_a_directory', 'config.json', 'dir', 'not a regular file'),
      ('final_params_a_directory', 'final_params.msgpack', 'dir',
       'not a regular file'),
      ('metrics_a_dangling_link', 'metrics.jsonl', 'link',
       'not a regular file'),
      ('lock_a_directory', '.fedkd.lock', 'dir', 'cannot open the lock file'),
      ('lock_a_symlink', '.fedkd.lock', 'link', 'cannot open the lock file'),
  )
  def test_wrong_file_type_is_refused(self, name, kind, expected):
    path = os.path.join(self.path, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    else:
      os.remove(path)
    if kind == 'file':
      with open(path, 'w') as f:
        f.write('x')
    elif kind == 'dir':
      os.makedirs(os.path.join(path, 'inner'))
    else:
      os.symlink(os.path.join(self.path, 'nowhere'), path)
    self.assertRefused(expected)

  @parameterized.named_parameters(
      ('empty_meta', lambda m: {}, 'its metadata has no config'),
      ('string_rows', lambda m: {**m, 'rows': ['x']},
       'its metric rows are not objects'),
      ('meta_a_list', lambda m: [], 'its metadata is not a JSON object'),
      ('text_totals', lambda m: {**m, 'totals': {'total_bytes': 'x'}},
       'its totals are not integers'),
  )
  def test_corrupt_meta_in_every_checkpoint_is_refused(self, edit, expected):
    rundirs.edit_checkpoint_metas(self.path, edit)
    self.assertRefused(expected)

  def test_corrupt_newest_meta_falls_back_to_the_previous_checkpoint(self):
    rundirs.edit_json(os.path.join(self.path, 'checkpoints', '2', 'meta',
                           'metadata'), lambda m: {})
    work = _open(self.path)
    with self.assertLogs(level='WARNING'):
      step, _, _ = work.restore(STATE, TOTALS)
    work.close()
    self.assertEqual(step, 1)

  def test_totals_of_another_version_are_not_restored(self):
    work = _open(self.path)
    with self.assertRaisesRegex(FedkdError, 'totals are not those'):
      work.restore(STATE, {'total_bytes': 0, 'newer_total': 0})
    work.close()

  def test_metrics_without_config_or_checkpoint_are_refused(self):
    os.remove(os.path.join(self.path, 'config.json'))
    shutil.rmtree(os.path.join(self.path, 'checkpoints'))
    self.assertRefused('holds run files but neither config.json')

  def test_planted_symlinks_at_temporary_names_are_not_followed(self):
    victim = self.create_tempfile('victim', content='keep').full_path
    names = ('config.json', 'metrics.jsonl', 'final_params.msgpack')
    for name in names:  # the names temporary files used to have
      os.symlink(victim, os.path.join(self.path, name + '.tmp'))
    work = _open(self.path)
    work.start([])
    work.write_final(STATE)
    work.close()
    with open(victim) as f:
      self.assertEqual(f.read(), 'keep')
    leftovers = [n for n in os.listdir(self.path)
                 if n.endswith('.tmp') and n[:-4] not in names]
    self.assertEmpty(leftovers)

  # Non-finite metrics.

  def test_nonfinite_metrics_are_written_as_null_and_named(self):
    row = workdir_lib.json_row({'round': 3, 'loss': float('nan'),
                                'eps': float('inf'), 'acc': 0.5,
                                'bytes': 7, 'teacher': None})
    self.assertEqual(row, {'round': 3, 'loss': None, 'eps': None,
                           'acc': 0.5, 'bytes': 7, 'teacher': None,
                           'nonfinite_metrics': ['eps', 'loss']})
    work = _open(self.path)
    work.start([])
    work.append_row(row)
    work.close()

    def no_constants(name):
      raise ValueError(f'bare {name} in metrics.jsonl')

    with open(os.path.join(self.path, 'metrics.jsonl')) as f:
      rows = [json.loads(l, parse_constant=no_constants) for l in f]
    self.assertEqual(rows, [row])

  def test_rows_with_bare_nan_are_never_written(self):
    work = _open(self.path)
    work.start([])
    with self.assertRaises(ValueError):
      work.append_row({'round': 1, 'loss': float('nan')})
    work.close()


def _dataset(**changes):
  rng = np.random.default_rng(0)
  arrays = dict(x_train=rng.random((6, 2, 2, 1), np.float32),
                y_train=np.arange(6, dtype=np.int32) % 3,
                x_test=rng.random((3, 2, 2, 1), np.float32),
                y_test=np.arange(3, dtype=np.int32))
  arrays.update(changes)
  return data.Dataset('toy', num_classes=3, **arrays)


class FingerprintTest(absltest.TestCase):

  def test_equal_data_gives_equal_fingerprints(self):
    a = data.fingerprint(_dataset())
    self.assertLen(a, 64)
    self.assertEqual(a, data.fingerprint(_dataset()))

  def test_any_change_gives_another_fingerprint(self):
    base = _dataset()
    x = base.x_train.copy()
    x[5, 1, 1, 0] = np.nextafter(x[5, 1, 1, 0], 2)
    variants = [
        _dataset(x_train=x),
        _dataset(y_test=np.array([0, 1, 1], np.int32)),
        _dataset(x_train=base.x_train.reshape(6, 4)),  # same bytes
        _dataset(y_train=base.y_train.astype(np.int64)),
    ]
    prints = {data.fingerprint(base)}
    prints |= {data.fingerprint(d) for d in variants}
    prints.add(data.fingerprint(base, base.x_train[:2]))
    self.assertLen(prints, len(variants) + 2)


if __name__ == '__main__':
  absltest.main()
