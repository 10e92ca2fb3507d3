"""Checkpoint round trips, pruning, and recovery from bad or partial saves."""

import glob
import logging
import os
import shutil
import sys
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
from flax import struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from orbax.checkpoint._src.path import async_path

from fedkd import checkpoint
from fedkd.errors import FedkdError
from fedkd.typing import Array, PyTree
import rundirs

NUM_CLIENTS = 8


class ServerState(struct.PyTreeNode):
  """Shaped like `fedkd.ServerState`, kept here so its edits don't matter."""
  params: PyTree
  opt_state: PyTree
  round: Array
  clients: PyTree


def _state(seed: int, width: int = 48) -> ServerState:
  """Random float32 and int leaves, large enough to live in data files."""
  rng = np.random.default_rng(seed)
  normal = lambda *s: rng.standard_normal(s).astype(np.float32)
  params = {'dense': {'kernel': jnp.asarray(normal(width, width)),
                      'bias': jnp.asarray(normal(width))}}
  opt_state = optax.adam(1e-3).init(params)
  # Non-trivial moments and count, as after some server steps.
  opt_state = jax.tree.map(lambda x: x + seed, opt_state)
  return ServerState(
      params=params,
      opt_state=opt_state,
      round=jnp.asarray(seed, jnp.int32),
      clients={'teacher': jnp.asarray(normal(NUM_CLIENTS, width, 4)),
               'seen': jnp.asarray(rng.integers(-2**31, 2**31 - 1,
                                                (NUM_CLIENTS, 64),
                                                dtype=np.int32))})


def _meta(step: int) -> dict:
  return {'round': step,
          'rows': [{'round': r, 'loss': 1 / (r + 3), 'acc': 0.1 + r * 1e-9}
                   for r in range(step)],
          'config': {'algorithm': 'local_kd', 'lr': 3e-4, 'clients': [1, 2],
                     'note': 'ünïcode', 'seed': None, 'eval': True}}


def _bits(x) -> np.ndarray:
  """Raw bytes, so NaN and -0.0 compare exactly."""
  return np.ascontiguousarray(np.asarray(x)).view(np.uint8)


class CheckpointTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = self.create_tempdir().full_path

  def _open(self, **kwargs) -> checkpoint.Checkpointer:
    ckpt = checkpoint.Checkpointer(self.dir, **kwargs)
    self.addCleanup(ckpt.close)
    return ckpt

  def assertTreesBitEqual(self, got, want):
    self.assertEqual(jax.tree.structure(got), jax.tree.structure(want))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      self.assertIsInstance(g, jax.Array)
      self.assertEqual((g.dtype, g.shape), (w.dtype, w.shape))
      np.testing.assert_array_equal(_bits(g), _bits(w))

  def _save_steps(self, *steps, **kwargs) -> dict[int, ServerState]:
    ckpt = checkpoint.Checkpointer(self.dir, **kwargs)
    states = {s: _state(s) for s in steps}
    for s in steps:
      ckpt.save(s, states[s], _meta(s))
    ckpt.close()
    return states

  def test_round_trip_is_bit_identical(self):
    state = _state(3)
    # Values that a lossy or float-parsing path would alter.
    special = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45, 3.4e38],
                       np.float32)
    state = state.replace(params={**state.params, 'special': special})
    ckpt = self._open()
    ckpt.save(3, state, _meta(3))
    ckpt.close()

    for target in (jax.tree.map(jnp.zeros_like, state),
                   jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape,
                                                               x.dtype),
                                state)):
      step, restored, meta = self._open().restore(target)
      self.assertEqual(step, 3)
      self.assertIsInstance(restored, ServerState)
      self.assertTreesBitEqual(restored, jax.tree.map(jnp.asarray, state))
      self.assertEqual(meta, _meta(3))

  def test_restores_into_target_shardings(self):
    if jax.device_count() < 2:
      self.skipTest('needs several devices')
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ('clients',))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
        'clients'))
    state = _state(1)
    state = state.replace(clients=jax.device_put(state.clients, split))
    ckpt = self._open()
    ckpt.save(1, state, _meta(1))
    _, restored, _ = ckpt.restore(state)
    self.assertTreesBitEqual(restored, state)
    for leaf in jax.tree.leaves(restored.clients):
      self.assertEqual(leaf.sharding, split)

  def test_latest_step_and_pruning(self):
    self.assertIsNone(self._open().latest_step())
    self._save_steps(1, 2, 3, 4, max_to_keep=2)
    self.assertEqual(self._open().latest_step(), 4)
    self.assertEqual(sorted(os.listdir(self.dir)), ['3', '4'])

  def test_save_replaces_newer_steps(self):
    self._save_steps(1, 2, 3, max_to_keep=3)
    ckpt = self._open(max_to_keep=3)
    redo = _state(20)
    ckpt.save(2, redo, {'round': 2, 'redo': True})
    self.assertEqual(ckpt.latest_step(), 2)
    self.assertEqual(sorted(os.listdir(self.dir)), ['1', '2'])
    step, restored, meta = ckpt.restore(redo)
    self.assertEqual((step, meta), (2, {'round': 2, 'redo': True}))
    self.assertTreesBitEqual(restored, redo)

  def test_empty_or_missing_directory_restores_none(self):
    self.assertIsNone(self._open().restore(_state(0)))
    missing = os.path.join(self.dir, 'not', 'yet')
    ckpt = checkpoint.Checkpointer(missing)
    self.addCleanup(ckpt.close)
    self.assertIsNone(ckpt.restore(_state(0)))

  def test_meta_must_be_json(self):
    ckpt = self._open()
    with self.assertRaises(TypeError):
      ckpt.save(1, _state(1), {'bad': object()})
    self.assertIsNone(ckpt.latest_step())
    self.assertEqual(os.listdir(self.dir), [])

  def _corrupt(self, step: int, how: str):
    step_dir = os.path.join(self.dir, str(step))
    data = [f for f in glob.glob(f'{step_dir}/state/**/d/*', recursive=True)
            if os.path.isfile(f)]
    self.assertNotEmpty(data)
    if how == 'truncate':
      for f in data:
        with open(f, 'r+b') as fh:
          fh.truncate(os.path.getsize(f) // 2)
    elif how == 'overwrite':
      for f in data:
        with open(f, 'wb') as fh:
          fh.write(os.urandom(os.path.getsize(f)))
    elif how == 'flip_bytes':
      # 8 bytes at 1/3, 1/2 and 2/3 of the largest data file.
      big = max(data, key=os.path.getsize)
      with open(big, 'r+b') as fh:
        for at in (1 / 3, 1 / 2, 2 / 3):
          fh.seek(int(os.path.getsize(big) * at))
          fh.write(b'\xa5' * 8)
    elif how == 'delete_arrays':
      for f in data:
        os.remove(f)
    elif how == 'bad_json':
      with open(os.path.join(step_dir, 'meta', 'metadata'), 'w') as fh:
        fh.write('{"round": ')
    elif how == 'no_state':
      shutil.rmtree(os.path.join(step_dir, 'state'))
    else:
      raise ValueError(how)

  @parameterized.parameters('truncate', 'overwrite', 'flip_bytes',
                            'delete_arrays', 'bad_json', 'no_state')
  def test_corrupt_newest_falls_back(self, how):
    states = self._save_steps(1, 2)
    self._corrupt(2, how)
    with self.assertLogs(level='WARNING') as logs:
      step, restored, meta = self._open().restore(states[1])
    self.assertEqual(step, 1)
    self.assertTreesBitEqual(restored, states[1])
    self.assertEqual(meta, _meta(1))
    self.assertIn(os.path.join(self.dir, '2'), '\n'.join(logs.output))

  def _change_stored_value(self, step: int, array) -> None:
    """Changes one value of `array` where its raw bytes lie in step's data.

    Orbax stores these uncompressed and checks no sum of them.
    """
    raw = np.asarray(array).tobytes()
    for f in glob.glob(f'{self.dir}/{step}/state/**/d/*', recursive=True):
      with open(f, 'r+b') as fh:
        at = fh.read().find(raw)
        if at >= 0:
          fh.seek(at)
          fh.write(bytes([raw[0] ^ 1]))
          return
    self.fail('the array\'s bytes are not in the checkpoint')

  def test_silently_changed_array_falls_back(self):
    states = self._save_steps(1, 2)
    self._change_stored_value(2, states[2].clients['seen'])
    with self.assertLogs(level='WARNING') as logs:
      step, restored, _ = self._open().restore(states[1])
    self.assertEqual(step, 1)
    self.assertTreesBitEqual(restored, states[1])
    self.assertIn('sha256', '\n'.join(logs.output))

  def test_meta_with_int_keys_verifies(self):
    # JSON restores its keys as strings, which sort differently.
    states = self._save_steps(1)
    with checkpoint.Checkpointer(self.dir) as checkpointer:
      checkpointer.save(2, states[1], {1: 'a', 2: 'b', 10: 'c'})
    step, _, meta = self._open().restore(states[1])
    self.assertEqual((step, meta), (2, {'1': 'a', '2': 'b', '10': 'c'}))

  def test_edited_meta_falls_back(self):
    states = self._save_steps(1, 2)
    path = os.path.join(self.dir, '2', 'meta', 'metadata')
    rundirs.edit_json(path, lambda m: {**m, 'rows': m['rows'][1:]})
    with self.assertLogs(level='WARNING') as logs:
      step, _, meta = self._open().restore(states[1])
    self.assertEqual((step, meta), (1, _meta(1)))
    self.assertIn('sha256', '\n'.join(logs.output))

  @parameterized.parameters(
      MemoryError(), PermissionError(13, 'Permission denied'),
      RuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 8 bytes'))
  def test_want_of_memory_or_access_is_raised_not_skipped(self, error):
    # It says nothing about the step: no fallback, nothing to replace.
    states = self._save_steps(1, 2)
    with self.assertRaises(type(error)):
      checkpointer = self._open()
      # pylint: disable-next=protected-access
      with mock.patch.object(checkpointer._manager, 'restore',
                             side_effect=error):
        checkpointer.restore(states[1])

  def test_checkpoint_without_a_digest_restores_unverified(self):
    # As saved before fedkd kept a digest.
    states = self._save_steps(1, 2)
    path = os.path.join(self.dir, '2', 'meta', 'metadata')
    rundirs.edit_json(path, lambda m: {k: v for k, v in m.items()
                                       if 'sha256' not in k})
    step, restored, meta = self._open().restore(states[1])
    self.assertEqual((step, meta), (2, _meta(2)))
    self.assertTreesBitEqual(restored, states[2])

  def test_orbax_errors_are_not_logged(self):
    # Its threads log each error that `save` or `restore` raises anyway.
    self._open()
    absl_logger = logging.getLogger('absl')
    for path, shown in (('/venv/orbax/checkpoint/future.py', False),
                        ('/work/fedkd/train.py', True)):
      record = logging.LogRecord('absl', logging.ERROR, path, 1, 'failed',
                                 None, None)
      self.assertEqual(absl_logger.filter(record), shown, path)

  def test_all_corrupt_raises(self):
    states = self._save_steps(1, 2)
    self._corrupt(1, 'delete_arrays')
    self._corrupt(2, 'truncate')
    unraisable = []
    with mock.patch.object(sys, 'unraisablehook', unraisable.append), \
        mock.patch.object(checkpoint.logging, 'warning') as warning:
      with self.assertRaises(FedkdError) as cm:
        self._open().restore(states[2])
      # Orbax's callbacks into its closed loop are dropped, others reported.
      for text in ('Event loop is closed', 'another'):
        sys.unraisablehook(mock.Mock(exc_value=RuntimeError(text)))
    self.assertEqual([str(u.exc_value) for u in unraisable], ['another'])
    # The error alone says what failed: no warning per skipped step.
    warning.assert_not_called()
    message = str(cm.exception)
    self.assertIn(self.dir, message)
    self.assertIn('use a new workdir', message)
    self.assertNotIn('\n', message)

  def test_metas_read_without_arrays(self):
    self._save_steps(1, 2, 3, max_to_keep=3)
    self._corrupt(3, 'delete_arrays')  # metadata still reads
    self._corrupt(2, 'bad_json')
    with self.assertLogs(level='WARNING') as logs:
      metas = self._open().metas()
    self.assertEqual(metas, {1: _meta(1), 3: _meta(3)})
    self.assertIn(os.path.join(self.dir, '2'), '\n'.join(logs.output))

  def test_meta_refused_by_check_meta_falls_back(self):
    states = self._save_steps(1, 2)
    seen = []

    def check_meta(meta, step):
      seen.append(step)
      if meta['round'] == 2:
        raise ValueError('not this one')

    with self.assertLogs(level='WARNING') as logs:
      step, restored, meta = self._open().restore(states[1], check_meta)
    self.assertEqual((step, meta, seen), (1, _meta(1), [2, 1]))
    self.assertTreesBitEqual(restored, states[1])
    self.assertIn('not this one', '\n'.join(logs.output))

  def test_incompatible_newest_falls_back_to_compatible(self):
    ckpt = self._open()
    small, big = _state(1, width=16), _state(2, width=32)
    ckpt.save(1, small, _meta(1))
    ckpt.save(2, big, _meta(2))
    with self.assertLogs(level='WARNING'):
      step, restored, _ = ckpt.restore(small)
    self.assertEqual(step, 1)
    self.assertTreesBitEqual(restored, small)
    step, restored, _ = ckpt.restore(big)
    self.assertEqual(step, 2)
    self.assertTreesBitEqual(restored, big)

  @parameterized.named_parameters(
      ('shape', lambda s: s.replace(round=jnp.zeros(2, jnp.int32))),
      ('dtype', lambda s: s.replace(params=jax.tree.map(
          lambda x: x.astype(jnp.bfloat16), s.params))),
      ('int_as_float', lambda s: s.replace(round=jnp.float32(0))),
      ('extra_leaf', lambda s: s.replace(clients={**s.clients,
                                                  'new': jnp.zeros(3)})),
      ('missing_leaf', lambda s: s.replace(clients={'seen': s.clients['seen']
                                                    })),
      ('renamed_leaf', lambda s: s.replace(params={'other': s.params['dense']
                                                   })),
      ('no_clients', lambda s: s.replace(clients=())),
  )
  def test_incompatible_target_raises(self, change):
    states = self._save_steps(1, 2)
    with self.assertRaises(FedkdError) as cm:
      self._open().restore(change(states[2]))
    self.assertIn(self.dir, str(cm.exception))

  def test_leftover_tmp_directory_is_ignored_and_cleaned(self):
    states = self._save_steps(1)
    # What a save killed mid-write leaves: a full-looking tmp step directory.
    tmp = os.path.join(self.dir, '2.orbax-checkpoint-tmp')
    shutil.copytree(os.path.join(self.dir, '1'), tmp)
    ckpt = self._open()
    self.assertEqual(ckpt.latest_step(), 1)
    step, restored, _ = ckpt.restore(states[1])
    self.assertEqual(step, 1)
    self.assertTreesBitEqual(restored, states[1])
    ckpt.save(2, _state(2), _meta(2))
    self.assertEqual(sorted(os.listdir(self.dir)), ['1', '2'])

  def test_save_killed_before_commit_is_ignored(self):
    states = self._save_steps(1)
    rename = async_path.rename

    async def die_at_step_commit(src, dst, *args, **kwargs):
      # Items are renamed into the tmp step directory first; the step's own
      # rename is the commit, so dying right before it is the worst case.
      if os.path.basename(str(dst)).isdigit():
        raise RuntimeError('killed')
      return await rename(src, dst, *args, **kwargs)

    ckpt = self._open()
    with mock.patch.object(async_path, 'rename',
                           side_effect=die_at_step_commit):
      with self.assertRaisesRegex(RuntimeError, 'killed'):
        ckpt.save(2, _state(2), _meta(2))
    tmp = os.path.join(self.dir, '2.orbax-checkpoint-tmp')
    self.assertEqual(sorted(os.listdir(tmp)),
                     ['_CHECKPOINT_METADATA', 'commit_success.txt', 'meta',
                      'state'])
    ckpt = self._open()
    self.assertEqual(ckpt.latest_step(), 1)
    step, restored, meta = ckpt.restore(states[1])
    self.assertEqual((step, meta), (1, _meta(1)))
    self.assertTreesBitEqual(restored, states[1])


if __name__ == '__main__':
  absltest.main()
