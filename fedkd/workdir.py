"""What a run keeps in its work directory, and resuming from it.

    WORKDIR/.fedkd.lock           locked (flock), as WORKDIR itself, while a
                                  run uses the workdir
    WORKDIR/config.json           the run's config
    WORKDIR/metrics.jsonl         one JSON row per evaluated round
    WORKDIR/checkpoints/<round>/  orbax checkpoints (state; rows so far, the
                                  config and the dataset's fingerprint)
    WORKDIR/final_params.msgpack  the global model after the last round
    WORKDIR/tensorboard/          TensorBoard event files: each row's scalars,
                                  the config (`fedkd.tensorboard`)

Rerunning the same command on the same workdir resumes from the newest
checkpoint. A workdir in use by another run, holding a run of a different
config or dataset (by config.json or by any checkpoint), or holding files of
the wrong type is refused before anything in it changes. With `overwrite`, a
run that would be refused so is replaced instead, only once the new one has
started (`Workdir.start`); a run of the same config resumes as without it.
"""

from collections.abc import Collection, Mapping
import errno
import fcntl
import functools
import json
import math
import os
import shutil
import tempfile

from absl import logging
from flax import serialization
import jax
from jax.experimental import multihost_utils

from fedkd import checkpoint
from fedkd.errors import FedkdError
from fedkd.errors import NO_SPACE_ERRNOS
from fedkd.typing import Params, PyTree

LOCK = '.fedkd.lock'
CONFIG = 'config.json'
METRICS = 'metrics.jsonl'
CHECKPOINTS = 'checkpoints'
TENSORBOARD = 'tensorboard'
FINAL_PARAMS = 'final_params.msgpack'
NONFINITE = 'nonfinite_metrics'

_FILES = (CONFIG, METRICS, FINAL_PARAMS)


def json_row(row: dict) -> dict:
  """`row` with NaN/inf as None, their names listed under `nonfinite_metrics`.

  JSON has no NaN or infinity (Python would write bare `NaN`, which strict
  readers reject), so non-finite figures become `null` and are named.
  """
  bad = sorted(k for k, v in row.items()
               if isinstance(v, float) and not math.isfinite(v))
  return {**{k: None if k in bad else v for k, v in row.items()},
          NONFINITE: bad}


def _atomic_write(path: str, data: bytes) -> None:
  """Writes `path` through a fresh temporary file beside it, then renames.

  `mkstemp` never opens an existing name (nor follows a planted symlink), and
  `os.replace` replaces the name itself, not what a symlink there points to.
  """
  directory, name = os.path.split(path)
  fd, tmp = tempfile.mkstemp(prefix=f'.{name}.', suffix='.tmp', dir=directory)
  try:
    os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide results from others
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def _json_bytes(value) -> bytes:
  return json.dumps(value, indent=2, sort_keys=True).encode()


def _writes(method):
  """Makes a `Workdir` method's failed write one `FedkdError` line.

  A full disk passes through, for `fedkd.train.out_of_space_is` to name.
  """

  @functools.wraps(method)
  def wrapped(self, *args, **kwargs):
    try:
      return method(self, *args, **kwargs)
    except OSError as e:
      if e.errno in NO_SPACE_ERRNOS:
        raise
      raise FedkdError(
          f'cannot write {e.filename or self.path} ({e.strerror or e}); make '
          'it writable and rerun the same command to resume from the newest '
          'checkpoint') from e

  return wrapped


def _check_writable(dirs: list[str]) -> None:
  """Refuses directories the run would write in that are read-only (by
  permissions or a read-only mount), rather than failing at a save."""
  for path in dirs:
    if os.path.isdir(path) and not os.access(path, os.W_OK | os.X_OK):
      raise FedkdError(f'{path} is not writable; make it writable or use '
                       'another workdir')


def _changed_field(old: dict, new: dict,
                   may_change: Collection[str]) -> str | None:
  """The first field whose change would make a resumed run differ."""
  # Fields missing from the old record came with a newer fedkd.
  for k in sorted(old):
    same = old[k] == new.get(k) or json.dumps(old[k]) == json.dumps(new.get(k))
    if same or k in may_change:
      continue
    return k
  return None


def _meta_problem(meta, step: int) -> str | None:
  """What is wrong with a checkpoint's metadata, or None."""
  if not isinstance(meta, dict):
    return 'its metadata is not a JSON object'
  for key, kind in (('config', dict), ('data', str), ('rows', list),
                    ('totals', dict)):
    if not isinstance(meta.get(key), kind):
      return f'its metadata has no {key} ({kind.__name__})'
  rounds = [r.get('round') if isinstance(r, dict) else None
            for r in meta['rows']]
  if not all(type(r) is int and 0 < r <= step for r in rounds) or (
      rounds != sorted(set(rounds))):
    return 'its metric rows are not objects with increasing rounds'
  if not all(type(v) is int for v in meta['totals'].values()):
    return 'its totals are not integers'
  return None


class Workdir:
  """A run's files. Construct only after the config and data are validated.

  Construction takes the workdir's lock and checks the files there without
  changing any; `start` is where an `overwrite` run replaces the old one.
  """

  def __init__(self, path: str, config: dict, *, data: str, overwrite: bool,
               num_rounds: int, may_change: Collection[str] = (),
               why_fixed: Mapping[str, str] | None = None):
    """Locks and checks `path`.

    Args:
      path: the workdir; it exists.
      config: the run's settings (JSON values), as written to config.json
        and every checkpoint, and compared with the run there.
      data: the dataset's fingerprint (`fedkd.data.fingerprint`).
      overwrite: replace a run that would be refused (of another config
        or dataset, or that cannot be resumed) instead of refusing.
      num_rounds: the rounds of the run (a checkpoint past them is refused).
      may_change: the fields a resumed run may change (the rounds compute
        the same); any other difference from the run there is refused.
      why_fixed: per field, why it may not change, for the refusal.

    Raises:
      FedkdError: another run uses `path`, or it holds files that cannot be
        resumed (of the wrong type, corrupt, or of a different run).
    """
    self.path = path
    self._config = json.loads(json.dumps(config))  # as read back from JSON
    self._num_rounds = num_rounds
    self._may_change = frozenset(may_change)
    self._why_fixed = dict(why_fixed or {})
    self._data = data
    self._overwrite = overwrite
    self._replace = False  # `start` deletes the old run
    self._started = False
    self._checkpoints = None
    self._tensorboard = None
    # In a multi-process run all processes share the workdir; process 0
    # locks and writes the files, orbax coordinates the checkpoints.
    self._writer = jax.process_index() == 0
    if self._writer:  # before its lock file, which it could not make
      _check_writable([path])
    self._lock = self._take_lock() if self._writer else None
    try:
      self._check_file_types()
      _check_writable([self._file(TENSORBOARD), *(
          root for root, _, _ in os.walk(self._file(CHECKPOINTS)))])
      try:
        self._check_same_run()
      except FedkdError as e:
        if not overwrite:
          raise
        self._will_replace(e)
    except BaseException:
      self.close()
      raise

  def _will_replace(self, why: FedkdError) -> None:
    """Marks the old run, which cannot be resumed, for `start` to delete."""
    self._replace = True
    if self._checkpoints is not None:
      self._checkpoints.close()
      self._checkpoints = None
    # The refusal up to its advice (which `overwrite` follows).
    logging.warning('overwrite=True: the run in %s is replaced once this one '
                    'starts: %s', self.path, str(why).split('; ')[0])

  def _file(self, name: str) -> str:
    return os.path.join(self.path, name)

  def _take_lock(self) -> list[int]:
    """Locks the workdir for this process's lifetime; returns the fds.

    Both the directory itself (its lock goes with it, which deleting the
    lock file cannot undo) and the lock file (which older fedkd versions
    lock) are locked. The kernel drops a flock when its holder dies, so a
    lock file left by a killed run blocks nothing.
    """
    fds = []
    try:
      # The workdir may be a symlink; a planted one at the lock file not.
      for name, flags in ((self.path, os.O_RDONLY | os.O_DIRECTORY),
                          (self._file(LOCK),
                           os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW)):
        fds.append(self._lock_one(name, flags))
    except BaseException:
      for fd in fds:
        os.close(fd)
      raise
    return fds

  def _lock_one(self, name: str, flags: int) -> int:
    """Opens `name` with `flags` and locks it; returns the fd."""
    try:
      fd = os.open(name, flags | os.O_CLOEXEC, 0o644)
    except OSError as e:
      what = 'the workdir' if name == self.path else 'the lock file'
      remove = '' if name == self.path else 'remove it or '
      raise FedkdError(f'cannot open {what} {name} ({e.strerror}); '
                       f'{remove}use another workdir') from e
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno in (errno.EAGAIN, errno.EACCES):
        raise FedkdError(f'workdir {self.path} is in use by another run '
                         f'(it locks {name}); wait for that run to end or '
                         'use another workdir') from e
      raise FedkdError(f'cannot lock {name} ({e.strerror}); use a workdir '
                       'on a local filesystem') from e
    return fd

  def _check_file_types(self) -> None:
    for name in (*_FILES, CHECKPOINTS, TENSORBOARD):
      path, want_dir = self._file(name), name in (CHECKPOINTS, TENSORBOARD)
      if os.path.lexists(path) and not (
          os.path.isdir(path) if want_dir else os.path.isfile(path)):
        kind = 'directory' if want_dir else 'regular file'
        raise FedkdError(f'{path} is not a {kind}; move it out of the workdir'
                         ' or use another workdir')

  def _refuse(self, where: str, field: str, old, now) -> None:
    hint = f'; {self._why_fixed[field]}' if field in self._why_fixed else ''
    raise FedkdError(
        f'workdir {self.path} holds a run with a different {where} ({field}: '
        f'{old!r} there, {now!r} now{hint}); use another workdir, or set '
        'overwrite=True to replace that run')

  def _check_same_run(self) -> None:
    """Refuses a workdir holding another run, by config.json or checkpoint."""
    old = self._read_config()
    if old is not None:
      field = _changed_field(old, self._config, self._may_change)
      if field:
        self._refuse(f'config in {CONFIG}', field, old.get(field),
                     self._config.get(field))
    metas = self._checkpoint_metas()
    if old is None and not metas and any(
        os.path.lexists(self._file(n)) for n in _FILES):
      raise FedkdError(f'workdir {self.path} holds run files but neither '
                       f'{CONFIG} nor a checkpoint to check them against; '
                       'use another workdir, or set overwrite=True '
                       'to replace them')
    problems = {step: _meta_problem(meta, step) for step, meta in
                metas.items()}
    for step, meta in sorted(metas.items()):
      if not problems[step]:
        self._check_checkpoint(step, meta)
    # The newest usable checkpoint is the one resumed, so its step is the
    # least num_rounds that works (an older one's would be refused again).
    done = max((s for s in metas if not problems[s]), default=0)
    if done > self._num_rounds:
      raise FedkdError(
          f'num_rounds={self._num_rounds} is below the {done} '
          f'rounds the checkpoint in {self.path} has done; set num_rounds '
          f'>= {done}, or set overwrite=True to start over')
    if metas and all(problems.values()):
      newest = max(metas)
      raise FedkdError(
          f'no checkpoint in {self._file(CHECKPOINTS)} loads (newest, step '
          f'{newest}: {problems[newest]}); use a new workdir, or set '
          'overwrite=True to start over')

  def _check_checkpoint(self, step: int, meta: dict) -> None:
    """Refuses to resume checkpoint `step` of another config or dataset."""
    field = _changed_field(meta['config'], self._config,
                           self._may_change)
    if field:
      self._refuse(f'config in checkpoint {step}', field,
                   meta['config'].get(field), self._config.get(field))
    if meta['data'] != self._data:
      raise FedkdError(
          f'the dataset differs from the one checkpoint {step} in {self.path}'
          f' was trained on (sha256 {meta["data"][:12]}... there, '
          f'{self._data[:12]}... now); restore that data, use another '
          'workdir, or set overwrite=True to replace that run')

  def _read_config(self) -> dict | None:
    try:
      with open(self._file(CONFIG)) as f:
        config = json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError) as e:
      self._bad_config(f'cannot be read ({e})')
    if not isinstance(config, dict):
      self._bad_config(f'holds {json.dumps(config)[:20]}, not a config object')
    return config

  def _bad_config(self, problem: str) -> None:
    """Refuses a damaged config.json, with the advice that keeps the most."""
    # Checkpoints carry the config; `overwrite` would delete them.
    steps = os.path.isdir(self._file(CHECKPOINTS)) and any(
        n.isdigit() for n in os.listdir(self._file(CHECKPOINTS)))
    advice = ('remove it to resume from the checkpoints (they hold the '
              'config), or use another workdir' if steps else
              'use another workdir or set overwrite=True')
    raise FedkdError(f'{self._file(CONFIG)} {problem}; {advice}')

  def _checkpoint_metas(self) -> dict[int, object]:
    """Step -> metadata of every checkpoint whose metadata reads."""
    if not os.path.isdir(self._file(CHECKPOINTS)):
      return {}
    return self._checkpointer().metas()

  def _checkpointer(self) -> checkpoint.Checkpointer:
    """The checkpoints; read-only until `start`, so checks change nothing."""
    if self._checkpoints is None:
      self._checkpoints = checkpoint.Checkpointer(
          self._file(CHECKPOINTS), writable=self._started)
    return self._checkpoints

  def restore(self, state_like: PyTree,
              totals_like: dict) -> tuple[int, PyTree, dict] | None:
    """(rounds done, state, meta) of the newest loadable checkpoint.

    None when there is none, or when `overwrite` replaces the old run
    (also where no checkpoint loads). Checkpoints whose metadata lacks this
    run's totals are skipped.
    """
    if self._replace or not os.path.isdir(self._file(CHECKPOINTS)):
      return None

    def check_meta(meta, step):
      problem = _meta_problem(meta, step)
      if not problem and meta['totals'].keys() != totals_like.keys():
        problem = 'its totals are not those of this fedkd version'
      if problem:
        raise ValueError(problem)

    try:
      return self._checkpointer().restore(state_like, check_meta=check_meta)
    except FedkdError as e:
      if not self._overwrite:
        raise
      self._will_replace(e)
      return None

  @_writes
  def start(self, rows: list[dict]) -> None:
    """Writes config.json and metrics.jsonl holding `rows` (from a resume).

    An `overwrite` run replacing another first deletes the old run's files.
    """
    if self._checkpoints is not None:
      self._checkpoints.close()  # read-only; a writable one follows
      self._checkpoints = None
    self._started = True
    if self._replace and self._writer:
      for name in _FILES:
        if os.path.lexists(self._file(name)):
          os.remove(self._file(name))
      shutil.rmtree(self._file(CHECKPOINTS), ignore_errors=True)
      shutil.rmtree(self._file(TENSORBOARD), ignore_errors=True)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('fedkd workdir ready')
    self._checkpointer()
    if not self._writer:
      return
    _atomic_write(self._file(CONFIG), _json_bytes(self._config))
    self._rows = list(rows)  # what metrics.jsonl holds
    self._write_metrics()
    # Imported here: tensorboardX imports torch where it is installed
    # (seconds), which runs that stop before writing should not pay.
    from fedkd import tensorboard  # pylint: disable=g-import-not-at-top
    # Without resumed rows, metrics.jsonl starts anew, and so do the events.
    self._tensorboard = tensorboard.EventWriter(self._file(TENSORBOARD),
                                                fresh=not rows)
    self._tensorboard.write_config(self._config,
                                   rows[-1]['round'] if rows else 0)
    self._tensorboard.write_rows(rows)

  @_writes
  def append_row(self, row: dict) -> None:
    if not self._writer:
      return
    self._rows.append(row)
    try:
      fd = os.open(self._file(METRICS),
                   os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    except FileNotFoundError:
      logging.warning('%s was deleted during the run; writing it anew',
                      self._file(METRICS))
      self._write_metrics()
    else:
      with os.fdopen(fd, 'wb') as f:
        f.write(_row_bytes(row))
    self._tensorboard.write_rows([row])

  def _write_metrics(self) -> None:
    """Writes metrics.jsonl anew, holding the rows so far."""
    _atomic_write(self._file(METRICS), b''.join(map(_row_bytes, self._rows)))

  @_writes
  def save(self, rounds_done: int, state: PyTree, meta: dict) -> None:
    """Checkpoints `state` with `meta`, this run's config and dataset."""
    self._checkpointer().save(
        rounds_done, state, {**meta, 'config': self._config,
                             'data': self._data})

  @_writes
  def write_final(self, params: Params) -> None:
    if self._writer:
      _atomic_write(self._file(FINAL_PARAMS), serialization.to_bytes(params))

  def close(self) -> None:
    """Releases the event files, the checkpointer and the lock, each even
    where closing another fails (a full disk)."""
    tensorboard, self._tensorboard = self._tensorboard, None
    checkpoints, self._checkpoints = self._checkpoints, None
    try:
      if tensorboard is not None:
        tensorboard.close()
    finally:
      try:
        if checkpoints is not None:
          checkpoints.close()
      finally:
        for fd in self._lock or ():
          os.close(fd)  # drops the flock
        self._lock = None


def _row_bytes(row: dict) -> bytes:
  # allow_nan=False: rows pass through json_row; a bare NaN is a bug.
  return (json.dumps(row, allow_nan=False) + '\n').encode()
