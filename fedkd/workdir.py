"""What a run keeps in its work directory, and resuming from it.

    WORKDIR/config.json           the run's config
    WORKDIR/metrics.jsonl         one JSON row per evaluated round
    WORKDIR/checkpoints/<round>/  orbax checkpoints (state + rows so far)
    WORKDIR/final_params.msgpack  the global model after the last round

Rerunning the same command on the same workdir resumes from the newest
checkpoint; a workdir that holds a run of a different config is refused unless
`overwrite` is set.
"""

import json
import os
import shutil

from flax import serialization
import jax
from jax.experimental import multihost_utils

from fedkd import checkpoint
from fedkd.errors import FedkdError
from fedkd.typing import Params, PyTree

CONFIG = 'config.json'
METRICS = 'metrics.jsonl'
CHECKPOINTS = 'checkpoints'
FINAL_PARAMS = 'final_params.msgpack'

# Fields a resumed run may change: they do not change what a round computes.
_RESUMABLE = frozenset({
    'num_rounds', 'overwrite', 'checkpoint_every', 'eval_every',
    'eval_batch_size', 'eval_teachers', 'num_devices', 'clients_per_chunk',
    'process_id', 'coordinator_address'})


def _atomic_write(path: str, text: str) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


class Workdir:
  """A run's files. Construct only after all input has been validated."""

  def __init__(self, path: str, config: dict, *, overwrite: bool):
    self.path = path
    self._config = config
    # In a multi-process run all processes share the workdir; process 0
    # writes the files, orbax coordinates the checkpoints of all of them.
    self._writer = jax.process_index() == 0
    old = self._read_config()
    if old is not None and not overwrite:
      # Fields missing from the old config came with a newer fedkd.
      changed = sorted(k for k in old
                       if k not in _RESUMABLE and old[k] != config.get(k))
      if changed:
        k = changed[0]
        raise FedkdError(
            f'workdir {path} holds a run with a different config ({k}: '
            f'{old.get(k)!r} there, {config.get(k)!r} now); use another '
            '--workdir, or --config.overwrite=True to replace that run')
    if overwrite and self._writer:
      for name in (METRICS, FINAL_PARAMS, CONFIG):
        if os.path.exists(self._file(name)):
          os.remove(self._file(name))
      shutil.rmtree(self._file(CHECKPOINTS), ignore_errors=True)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('fedkd workdir ready')
    self._checkpoints = checkpoint.Checkpointer(self._file(CHECKPOINTS))

  def _file(self, name: str) -> str:
    return os.path.join(self.path, name)

  def _read_config(self) -> dict | None:
    try:
      with open(self._file(CONFIG)) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError) as e:
      raise FedkdError(f'cannot read {self._file(CONFIG)} ({e}); use another '
                       '--workdir or --config.overwrite=True') from e

  def restore(self, state_like: PyTree) -> tuple[int, PyTree, dict] | None:
    """(rounds done, state, meta) of the newest loadable checkpoint."""
    return self._checkpoints.restore(state_like)

  def start(self, rows: list[dict]) -> None:
    """Writes config.json and metrics.jsonl holding `rows` (from a resume)."""
    if not self._writer:
      return
    _atomic_write(self._file(CONFIG),
                  json.dumps(self._config, indent=2, sort_keys=True))
    _atomic_write(self._file(METRICS),
                  ''.join(json.dumps(r) + '\n' for r in rows))

  def append_row(self, row: dict) -> None:
    if not self._writer:
      return
    with open(self._file(METRICS), 'a') as f:
      f.write(json.dumps(row) + '\n')

  def save(self, rounds_done: int, state: PyTree, meta: dict) -> None:
    self._checkpoints.save(rounds_done, state, meta)

  def write_final(self, params: Params) -> None:
    if not self._writer:
      return
    tmp = self._file(FINAL_PARAMS) + '.tmp'
    with open(tmp, 'wb') as f:
      f.write(serialization.to_bytes(params))
    os.replace(tmp, self._file(FINAL_PARAMS))

  def close(self) -> None:
    self._checkpoints.close()
