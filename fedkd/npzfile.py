"""Reads arrays from a user's .npz file, checking it before loading anything.

`np.load` trusts the file: a FIFO or a device (/dev/zero) as the path blocks
or reads forever, and a member whose header claims a huge shape allocates it
before finding the data missing. `read` checks the path is a regular file and
every member's header (dtype, shape) against the bytes the archive holds and
the machine's memory, then loads.
"""

import os
import stat
import zipfile

import numpy as np

from fedkd.errors import FedkdError

# .npy format versions whose headers numpy reads publicly; np.save writes 1.0
# (2.0 for headers over 64 KiB; 3.0 only for unicode structured field names).
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}


def memory_bytes() -> int:
  """The machine's physical memory, in bytes."""
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def check_memory(needed: int, what: str, fix: str, detail: str = '') -> None:
  """Refuses arrays of `needed` bytes beyond this machine's memory, in one
  line: '`what` <GiB>`detail`, more than ...; `fix`'."""
  memory = memory_bytes()
  if needed > memory:
    raise FedkdError(f'{what} {needed / 2**30:,.1f} GiB{detail}, more than '
                     f'this machine\'s {memory / 2**30:.1f} GiB of memory; '
                     f'{fix}')


def read(path: str, keys) -> dict[str, np.ndarray]:
  """Those of the arrays named `keys` that the .npz file at `path` holds.

  Args:
    path: a .npz file (np.savez or np.savez_compressed).
    keys: the array names to read; names the file lacks are left out.

  Returns:
    name -> array.

  Raises:
    FedkdError: `path` is not a readable regular file, not an .npz archive, or
      a member's header is malformed, claims more bytes than the archive
      holds for it, or more than the machine's memory.
  """
  try:
    mode = os.stat(path).st_mode
  except OSError as e:
    raise FedkdError(f'cannot read .npz file {path}: {e.strerror}') from e
  if not stat.S_ISREG(mode):
    raise FedkdError(f'cannot read .npz file {path}: not a regular file (a '
                     'directory, FIFO or device); give the path of a .npz '
                     'file')
  try:
    with zipfile.ZipFile(path) as archive:
      members = {info.filename: info for info in archive.infolist()}
      wanted = [k for k in keys if f'{k}.npy' in members]
      total = 0
      for key in wanted:
        with archive.open(members[f'{key}.npy']) as f:
          total += _check_header(path, key, f, members[f'{key}.npy'].file_size)
      check_memory(total, f'cannot read .npz file {path}: its arrays need',
                   'use a smaller dataset')
    with np.load(path, allow_pickle=False) as npz:
      return {k: npz[k] for k in wanted}
  except FedkdError:
    raise  # a ValueError, said already (not wrapped again below)
  except zipfile.BadZipFile as e:
    raise FedkdError(f'cannot read .npz file {path}: not an .npz archive '
                     f'({e}); save one with np.savez') from e
  except (OSError, ValueError, EOFError) as e:
    raise FedkdError(f'cannot read .npz file {path}: {e}') from e


def _check_header(path: str, key: str, f, stored: int) -> int:
  """Checks member `key`'s .npy header; returns its array's size in bytes."""
  try:
    version = np.lib.format.read_magic(f)
    if version not in _HEADER_READERS:
      raise ValueError(f'unsupported .npy format version {version}')
    shape, _, dtype = _HEADER_READERS[version](f)
  except ValueError as e:
    raise FedkdError(f'cannot read .npz file {path}: {key} has no valid '
                     f'.npy header ({e}); save the arrays with np.savez') from e
  if dtype.hasobject:
    raise FedkdError(f'cannot read .npz file {path}: {key} holds Python '
                     f'objects (dtype {dtype}); save numeric arrays')
  size = int(np.prod(shape, dtype=object)) * dtype.itemsize
  # The header and padding come first; the data must fill the rest.
  if size > stored - f.tell():
    raise FedkdError(
        f'cannot read .npz file {path}: {key} claims shape {shape} of {dtype} '
        f'({size:,} bytes) but the archive holds '
        f'{max(stored - f.tell(), 0):,} bytes of it; the file is truncated or '
        'corrupt, save it again')
  return size
