"""Runs one federated experiment: the only reader of flags in fedkd.

    python experiments/main.py --config=experiments/configs/default.py \
        --workdir=/tmp/fedkd_run [--config.num_clients=1000 ...]

Writes WORKDIR/config.json, WORKDIR/metrics.jsonl, checkpoints, TensorBoard
event files and, after the last round, WORKDIR/final_params.msgpack (see
`fedkd.workdir`), and prints a table. A config whose `compare` field lists
algorithms runs each of them instead (see `experiments/compare.py`). Bad
input, or a setting too large for the memory, prints one line starting with
`error:` and exits with code 2; SIGINT/SIGTERM print one line and exit with
128 + the signal number (see `fedkd.stopping`).
"""

import atexit
import functools
import importlib.machinery
import importlib.util
import os
import signal
import sys


def _stop_outside_runs(signum, frame):
  del frame
  print(f'stopped by {signal.Signals(signum).name} before training started '
        'or between runs; nothing was lost', file=sys.stderr, flush=True)
  os._exit(128 + signum)  # pylint: disable=protected-access


def _exit_now(code, signum, frame):
  del signum, frame
  sys.stdout.flush()  # the table, where stdout is a file or a pipe
  os._exit(code)  # pylint: disable=protected-access


def _ending(code: int) -> None:
  """From here a signal ends the process with `code` and no line: the run's
  outcome is printed (or about to be), and it stands."""
  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, functools.partial(_exit_now, code))


def _skip_teardown() -> None:
  """Once `_ending` has the code, ends the process with it after the exit
  handlers: the interpreter's teardown would first restore the default
  signal handlers, then take a second (XLA's objects), and a signal then
  would kill the process instead."""
  handler = signal.getsignal(signal.SIGINT)
  if isinstance(handler, functools.partial) and handler.func is _exit_now:
    handler(signal.SIGINT, None)


# Importing JAX takes seconds: a signal meanwhile ends the process with one
# line, not a traceback. `runner.run` handles signals itself while it runs.
for _signum in (signal.SIGINT, signal.SIGTERM):
  signal.signal(_signum, _stop_outside_runs)
# Registered before the imports' exit handlers (JAX's), so it runs after them.
atexit.register(_skip_teardown)

# `python experiments/main.py` puts experiments/ first on the path, `python -m
# experiments.main` the working directory: either way the repository root,
# from which the configs import `experiments.configs.default`.
_EXPERIMENTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_EXPERIMENTS))
# The default --config, found from any working directory.
_DEFAULT_FILE = os.path.join(_EXPERIMENTS, 'configs', 'default.py')

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from experiments import cli
from experiments import compare
from experiments import overrides
from experiments import runner
from experiments import validation
from experiments.configs import default
from fedkd import train
from fedkd.errors import FedkdError
# pylint: enable=g-import-not-at-top,wrong-import-position

_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'The run\'s directory: config.json, metrics.jsonl, '
    'checkpoints/, tensorboard/, final_params.msgpack.')


# What ml_collections raises for the default config file that does not load
# (a --config file loads through `_ConfigFileParser`), an unknown field or a
# value of the wrong type.
_CONFIG_ERRORS = (ValueError, TypeError, OSError, AttributeError, KeyError)


def _config_error(e: Exception) -> str:
  if isinstance(e, (KeyError, AttributeError)) and e.args:
    name = str(e.args[0]).strip('\'"')
    return f'bad --config: unknown field {name!r}; see the config file'
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return f'bad --config: {lines[-1] if lines else repr(e)}'


class _BadConfigFile(Exception):
  """A --config file that does not load or lacks fields (absl passes any
  other type than TypeError and ValueError through unchanged)."""


def _describe(e: Exception) -> str:
  """`Type: message`, its first line (a syntax error's without the path)."""
  if isinstance(e, SyntaxError):
    return f'SyntaxError: {e.msg} (line {e.lineno})'
  lines = str(e).splitlines() or ['']
  return f'{type(e).__name__}: {lines[0]}'


class _ConfigFileParser(flags.ArgumentParser):
  """Parses `--config=FILE[:variant]` as ml_collections' parser does, but
  any failure, whatever the file raises, becomes one `_BadConfigFile` line."""

  def __init__(self, name: str):
    self.name = name

  def parse(self, path):
    file, *arg = path.split(':', 1)
    fail = lambda why: _BadConfigFile(f'cannot load --config {file}: {why}')
    start = 'start from experiments/configs/default.py'
    try:
      # As ml_collections loads it (a module named after the flag).
      loader = importlib.machinery.SourceFileLoader(f'{self.name}_config',
                                                    file)
      module = importlib.util.module_from_spec(
          importlib.util.spec_from_loader(loader.name, loader))
      sys.modules[loader.name] = module
      loader.exec_module(module)
      if not hasattr(module, 'get_config'):
        raise fail(f'it defines no get_config(); {start}')
      config = module.get_config(*arg)
    except _BadConfigFile:
      raise
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise fail(_describe(e)) from e
    if not isinstance(config, ml_collections.ConfigDict):
      raise fail(f'get_config() returned a {type(config).__name__}, not an '
                 f'ml_collections.ConfigDict; {start}')
    missing = [f for f in _DEFAULTS if f not in config]
    if missing:
      more = f' and {len(missing) - 5} more' if len(missing) > 5 else ''
      raise fail(f'its config lacks the fields {", ".join(missing[:5])}'
                 f'{more}; {start} (c = default.get_config())')
    config.lock()
    return config


_DEFAULTS = default.get_config()
try:
  overrides.check_paths(sys.argv, _DEFAULTS)
except FedkdError as e:
  cli.fail(str(e))
# Read before any parser sees them (a --config.FIELD=none it cannot type).
sys.argv, _UNSET = overrides.split_unsets(sys.argv, _DEFAULTS)

try:
  # Without an explicit --config, the default file and any --config.FIELD
  # overrides are read here, at definition.
  _CONFIG = config_flags.DEFINE_config_file(
      'config', _DEFAULT_FILE, 'Run config file (:variant).')
except _CONFIG_ERRORS as e:
  cli.fail(_config_error(e))
# The default file was read above; a --config given parses with this one.
flags.FLAGS['config'].parser = _ConfigFileParser('config')


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except _BadConfigFile as e:
    cli.fail(str(e))
  except flags.Error as e:
    cli.fail(cli.flag_error(e))
  except _CONFIG_ERRORS as e:
    cli.fail(_config_error(e))


def _load_config():
  # A config file that failed to load surfaces only when the value is used.
  try:
    config = _CONFIG.value
    config.keys()
    for field in _UNSET:
      config[field] = None
    overrides.tidy_lists(config)
    return config
  except _CONFIG_ERRORS as e:
    cli.fail(_config_error(e))


def main(argv):
  cli.begin(argv, 'pass settings as --config.FIELD')
  config = _load_config()
  try:
    if config.compare:
      validation.validate_comparison(config)
      compare.run(config, _WORKDIR.value)
    else:
      compare.check_single_run_workdir(_WORKDIR.value)
      runner.run(config, _WORKDIR.value)
  except FedkdError as e:
    _ending(2)
    cli.fail(str(e))
  except train.Diverged as e:
    _ending(1)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  except train.Interrupted as e:
    _ending(128 + e.signum)
    print(e, file=sys.stderr)
    sys.exit(128 + e.signum)
  _ending(0)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
