"""How the scripts in experiments/ end on bad input: one line, exit code 2.

A bad flag value, an argument no flag takes, or a `FedkdError` from the
script's `main` prints one line starting with `error:` (no traceback, no
usage text) and exits with code 2. The scripts check their settings before
they time, run or write anything.
"""

import os
import sys
from typing import NoReturn

from absl import app
from absl import flags
from absl import logging

from fedkd.errors import FedkdError


def fail(message: str) -> NoReturn:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def flag_error(e: flags.Error) -> str:
  """absl's message for a flag it cannot parse, on one line."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return ' '.join(lines[:1] + lines[1:][-1:])


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(flag_error(e))


def positive_ints(flag: str, values) -> list[int]:
  """The list flag `flag`'s `values` as ints, at least one, each >= 1."""
  try:
    ints = [int(v) for v in values]
  except ValueError:
    ints = [0]
  if not ints or min(ints) < 1:
    raise FedkdError(f'--{flag} takes a comma-separated list of integers >= '
                     f'1, got {",".join(values)!r}')
  return ints


def output_dir(path: str, flag: str) -> None:
  """Makes directory `path`, given by `--flag`, for a script's outputs; fails
  if it cannot be made or written, before any work."""
  if not path:
    raise FedkdError(f'--{flag} is empty; name a directory')
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise FedkdError(f'--{flag}: cannot create directory {path} '
                     f'({e.strerror}); choose another --{flag}') from e
  if not os.access(path, os.W_OK | os.X_OK):
    raise FedkdError(f'--{flag}: directory {path} is not writable; make it '
                     f'writable or choose another --{flag}')


def begin(argv, settings: str = 'settings are flags (--helpshort lists '
          'them)') -> None:
  """Fails on arguments that no flag takes (`settings` says where they
  go); keeps library INFO lines out unless --verbosity asks for them."""
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}; {settings}')
  if not flags.FLAGS['verbosity'].present:
    # Library INFO lines (backend, tfds lookups) would bury the error line.
    logging.set_verbosity(logging.WARNING)


def run(main) -> None:
  """`app.run(main)`, failing as above."""

  def checked(argv):
    begin(argv)
    try:
      main(argv)
    except FedkdError as e:
      fail(str(e))

  app.run(checked, flags_parser=_parse_flags)
