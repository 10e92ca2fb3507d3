"""Checkpoints of a run: the server state pytree plus JSON host-side data.

Each checkpoint is a step directory `<directory>/<step>/` holding two orbax
items: `state` (the array pytree, OCDBT/zarr via `StandardSave`) and `meta`
(one JSON document: metric rows, round, config, ...).

Atomicity comes from orbax (0.12.x, local filesystem): a save writes
everything into `<step>.orbax-checkpoint-tmp/`, writes `commit_success.txt`
and only then renames the directory to `<step>/`. Only directories named
by a bare step number count as checkpoints, so a save killed at any point
leaves a tmp directory that is never loaded (and that orbax deletes when
the next `Checkpointer` on the directory saves). On GCS, where renames are
not atomic, orbax writes in place and `commit_success.txt` alone marks the
step final.

`restore` still treats every step as untrusted: it checks the stored tree's
leaf paths, shapes and dtypes against the target before reading arrays, and
falls back to older steps when the newest cannot be loaded. Orbax keeps no
checksum of the array data, so a few flipped bytes would load silently:
`save` stores a sha256 of the state's arrays and the metadata in the `meta`
item, and a step whose restored arrays or metadata (hand-edited, say) do
not match it counts as corrupt. Checkpoints
without one (saved before fedkd kept it, or by a multi-process run, whose
processes each hold only part of the arrays) are restored unverified.
"""

from collections.abc import Callable
import hashlib
import json
import logging as std_logging
import os
import re
import sys

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from fedkd.errors import FedkdError
from fedkd.typing import PyTree

_STATE = 'state'
_META = 'meta'
# The key of the state's digest in the stored `meta` item.
_DIGEST = 'fedkd_sha256'


class Checkpointer:
  """Saves and restores `(step, state, meta)` under one directory.

  Not safe for several processes writing one directory at the same time; a
  run owns its checkpoint directory. Opening one drops orbax's ERROR log
  records for the rest of the process (`_QuietOrbaxErrors`): the failures
  they describe are raised by `save` and `restore`, and a program that uses
  orbax itself as well loses those records of its own.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 2,
               writable: bool = True):
    """Opens (creating if needed) a checkpoint directory.

    Args:
      directory: where step directories live; local or any path orbax
        accepts (e.g. `gs://`).
      max_to_keep: how many of the newest checkpoints survive each save.
      writable: False reads only: nothing is created or cleaned up (a run
        checks its workdir so before it is sure to start), `save` raises.
    """
    if max_to_keep < 1:
      raise FedkdError(f'max_to_keep={max_to_keep} must be at least 1')
    if '://' not in directory:
      directory = os.path.abspath(directory)
    self.directory = directory
    options = ocp.CheckpointManagerOptions(
        # `save` must return only once the step is committed.
        enable_async_checkpointing=False,
        preservation_policy=ocp.checkpoint_managers.LatestN(n=max_to_keep),
        # Leftovers of saves killed mid-write; this process owns the dir.
        cleanup_tmp_directories=writable,
        create=writable,
    )
    self._writable = writable
    _quiet_orbax_errors()
    self._manager = ocp.CheckpointManager(
        directory,
        options=options,
        item_handlers={
            _STATE: ocp.StandardCheckpointHandler(),
            _META: ocp.JsonCheckpointHandler(),
        },
    )
    if writable:
      # Orbax deletes those leftovers in a thread that it awaits only at
      # the first save; a run stopped before one would leave it running.
      # pylint: disable-next=protected-access
      self._manager._maybe_await_cleanup_tmp_directory()

  def save(self, step: int, state: PyTree, meta: dict) -> None:
    """Writes checkpoint `step`; it is committed on disk when this returns.

    Existing checkpoints at `step` or later are deleted first: saving `step`
    means the run continues from here (e.g. after falling back past a
    corrupt newer step), and stale newer steps would otherwise be restored
    in its place.

    Args:
      step: non-negative step number, usually the round.
      state: pytree of arrays (jax or numpy).
      meta: a JSON-serialisable dict; JSON turns tuples into lists and dict
        keys into strings, so use lists and string keys to round-trip.
    """
    if not self._writable:
      raise RuntimeError(f'{self.directory} was opened read-only')
    if step < 0:
      raise ValueError(f'step={step} must be non-negative')
    # Fail before any directory is created, not halfway through the save.
    json.dumps(meta)
    if not isinstance(meta, dict) or _DIGEST in meta:
      raise ValueError(f'meta must be a dict without the key {_DIGEST!r}')
    digest = _digest(state, meta)
    if digest is not None:
      meta = {**meta, _DIGEST: digest}
    for stale in [s for s in self._manager.all_steps() if s >= step]:
      logging.warning('Deleting checkpoint %s: saving step %d replaces it.',
                      self._step_dir(stale), step)
      self._manager.delete(stale)
    saved = self._manager.save(
        step,
        args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(state),
            _META: ocp.args.JsonSave(meta),
        }),
        force=True,  # Bypass orbax's save-interval policy.
    )
    if not saved:
      raise RuntimeError(f'orbax skipped saving step {step} in '
                         f'{self.directory}')
    self._manager.wait_until_finished()

  def latest_step(self) -> int | None:
    """The newest committed step (not checked for loadability), or None."""
    return self._manager.latest_step()

  def metas(self) -> dict[int, object]:
    """Step -> `meta` of every committed step whose `meta` item reads.

    Reads no arrays: what a run checks (e.g. its config) before restoring.
    """
    self._manager.reload()
    metas = {}
    for step in self._manager.all_steps():
      try:
        metas[step] = _without_digest(self._manager.restore(
            step, args=ocp.args.Composite(**{
                _META: ocp.args.JsonRestore()}))[_META])
      except Exception as e:  # pylint: disable=broad-exception-caught
        logging.warning('Cannot read the metadata of checkpoint %s (%s).',
                        self._step_dir(step), _one_line(e))
    return metas

  def restore(
      self, state_like: PyTree,
      check_meta: Callable[[object, int], None] | None = None,
  ) -> tuple[int, PyTree, dict] | None:
    """Restores the newest checkpoint that loads into `state_like`.

    Args:
      state_like: pytree of arrays or `jax.ShapeDtypeStruct`s with the
        structure, shapes and dtypes of the saved state. Restored leaves get
        its shardings; leaves without one land on the first device.
      check_meta: `(meta, step) -> None`, raising ValueError for a `meta`
        that cannot be used: that step is skipped like a corrupt one.

    Returns:
      `(step, state, meta)`, or None if the directory holds no checkpoint.

    Raises:
      FedkdError: there are checkpoints but none of them loads.
    """
    self._manager.reload()  # The directory may have changed since __init__.
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    target = jax.tree.map(_abstract, state_like)
    _drop_closed_loop_callbacks()
    first_error, skipped = None, []
    for step in steps:
      try:
        _check_compatible(self._manager.item_metadata(step)[_STATE], target)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(**{
                _STATE: ocp.args.StandardRestore(target),
                _META: ocp.args.JsonRestore(),
            }))
        meta = _verified(restored[_STATE], restored[_META])
        if check_meta is not None:
          check_meta(meta, step)
      except Exception as e:  # pylint: disable=broad-exception-caught
        if _short_of_resources(e):
          raise  # says nothing about the step, which a retry may load
        # Any other failure means this step cannot be trusted; try older ones.
        first_error = first_error or e
        skipped.append((self._step_dir(step), _one_line(e)))
        continue
      # Said only when an older step loads: otherwise the error says it.
      for directory, why in skipped:
        logging.warning('Cannot load checkpoint %s (%s); skipping it.',
                        directory, why)
      if step != steps[0]:
        logging.warning('Restored checkpoint %s, not the newest (step %d).',
                        self._step_dir(step), steps[0])
      return step, restored[_STATE], meta
    raise FedkdError(
        f'no checkpoint in {self.directory} loads (newest, step {steps[0]}: '
        f'{_one_line(first_error)}); use a new workdir or delete '
        f'{self.directory} to start over') from first_error

  def close(self) -> None:
    """Waits for pending work and releases orbax's resources."""
    self._manager.close()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))


def _short_of_resources(e: Exception) -> bool:
  """Whether a restore failed for want of memory or access, not data."""
  text = str(e).lower()
  return isinstance(e, (MemoryError, PermissionError)) or any(
      marker in text for marker in ('resource_exhausted', 'out of memory'))


class _QuietOrbaxErrors(std_logging.Filter):
  """Drops orbax's ERROR records, and asyncio's about futures it abandons.

  Orbax's worker threads log (with tracebacks) each error that a save or
  restore then raises, for fedkd to report in one line or to fall back on;
  after a failed save (a full disk) some log again at the interpreter's
  exit, and asyncio reports the futures of its other writes.
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not (record.levelno >= std_logging.ERROR and (
        f'{os.sep}orbax{os.sep}' in record.pathname or
        'exception was never retrieved' in str(record.msg)))


def _quiet_orbax_errors() -> None:
  """Installs `_QuietOrbaxErrors` on absl's and asyncio's loggers, once."""
  for name in ('absl', 'asyncio'):
    logger = std_logging.getLogger(name)
    if not any(isinstance(f, _QuietOrbaxErrors) for f in logger.filters):
      logger.addFilter(_QuietOrbaxErrors())


def _drop_closed_loop_callbacks() -> None:
  """Silences orbax's callbacks into a closed event loop, once per process.

  A restore that fails leaves tensorstore reads whose completion callbacks
  reach orbax's already closed asyncio loop; each would print a traceback of
  RuntimeError('Event loop is closed') through `sys.unraisablehook`, after
  or around the one-line error. Other unraisable errors pass through.
  """
  previous = sys.unraisablehook
  if getattr(previous, 'drops_closed_loop', False):
    return

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError) and
            str(unraisable.exc_value) == 'Event loop is closed'):
      previous(unraisable)

  hook.drops_closed_loop = True
  sys.unraisablehook = hook


def _digest(state: PyTree, meta: dict) -> str | None:
  """sha256 of the leaves' dtypes, shapes and bytes, in tree order, and of
  `meta` (as JSON, which it round-trips through).

  Leaves are fetched to the host one at a time. None where this process
  holds only part of the arrays (multi-process runs).
  """
  leaves = jax.tree.leaves(state)
  if jax.process_count() > 1 or not all(
      getattr(x, 'is_fully_addressable', True) for x in leaves):
    return None
  sha = hashlib.sha256()
  for leaf in leaves:
    x = np.ascontiguousarray(jax.device_get(leaf))
    sha.update(f'{x.dtype.str}{list(x.shape)};'.encode())
    sha.update(x.reshape(-1).view(np.uint8))
  # As restored: JSON turns int keys into strings, which sort differently.
  meta = json.loads(json.dumps(meta))
  sha.update(json.dumps(meta, sort_keys=True).encode())
  return sha.hexdigest()


def _verified(state: PyTree, meta):
  """`meta` as the caller saved it (without the digest); raises ValueError
  if `state` and it do not match the digest stored in `meta`."""
  want = meta.get(_DIGEST) if isinstance(meta, dict) else None
  meta = _without_digest(meta)
  if want is None:
    return meta  # an old checkpoint, or a multi-process run's
  got = _digest(state, meta)
  if got is not None and got != want:
    raise ValueError('its arrays or metadata do not match the sha256 saved '
                     'with them (corrupt or edited)')
  return meta


def _without_digest(meta):
  """The caller's `meta`, as saved: without the digest."""
  if isinstance(meta, dict):
    meta = {k: v for k, v in meta.items() if k != _DIGEST}
  return meta


def _abstract(x) -> jax.ShapeDtypeStruct:
  """What to restore a leaf as; orbax yields numpy without a sharding."""
  sharding = getattr(x, 'sharding', None)
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _check_compatible(stored, target: PyTree) -> None:
  """Raises ValueError unless leaf paths, shapes and dtypes all match.

  Orbax checks paths and shapes itself but silently casts dtypes (a float
  checkpoint would load into int params), so check everything up front.

  Args:
    stored: the `state` item's orbax `TreeMetadata`.
    target: the abstract restore target.
  """
  if stored is None:
    raise ValueError('the state item is missing')
  have = ocp.tree.to_flat_dict(stored.tree)
  want = ocp.tree.to_flat_dict(
      ocp.tree.serialize_tree(target, keep_empty_nodes=True))
  problems = []
  for key in sorted(want.keys() - have.keys()):
    problems.append(f'{"/".join(key)} missing from the checkpoint')
  for key in sorted(have.keys() - want.keys()):
    problems.append(f'{"/".join(key)} in the checkpoint but not the target')
  for key in sorted(want.keys() & have.keys()):
    got, expected = _describe(have[key]), _describe(want[key])
    if got != expected:
      problems.append(f'{"/".join(key)} is {got} in the checkpoint, '
                      f'{expected} in the target')
  if problems:
    more = f' (+{len(problems) - 3} more)' if len(problems) > 3 else ''
    raise ValueError('; '.join(problems[:3]) + more)


def _describe(leaf) -> str:
  """`float32[2, 3]` for an array or its metadata; `?` where unknown."""
  shape = getattr(leaf, 'shape', None)
  dtype = getattr(leaf, 'dtype', None)
  return (f'{"?" if dtype is None else np.dtype(dtype)}'
          f'{"?" if shape is None else list(shape)}')


def _one_line(e: BaseException | None, limit: int = 300) -> str:
  """An exception as one short line (tensorstore errors span pages)."""
  text = re.sub(r'\s+', ' ', f'{type(e).__name__}: {e}').strip()
  return text if len(text) <= limit else text[:limit - 3] + '...'
