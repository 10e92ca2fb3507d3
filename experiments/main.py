"""Runs one federated experiment: the only reader of flags in fedkd.

    python experiments/main.py --config=experiments/configs/default.py \
        --workdir=/tmp/fedkd_run [--config.num_clients=1000 ...]

Writes WORKDIR/metrics.jsonl and WORKDIR/config.json and prints a table. A
config whose `compare` field lists algorithms runs each of them instead (see
`experiments/compare.py`). Bad input prints one line starting with `error:`
and exits with code 2.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import compare  # experiments/compare.py, beside this file
from fedkd import train
from fedkd import validation
from fedkd.errors import FedkdError

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'experiments/configs/default.py', 'Run config file (:variant).')
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Directory for metrics.jsonl and config.json.')


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0])
  except (ValueError, TypeError, OSError, AttributeError, KeyError) as e:
    # Raised by ml_collections while loading the config file or applying an
    # override (bad variant, unknown field, value of the wrong type).
    _fail(f'bad --config: {str(e).splitlines()[0] if str(e) else repr(e)}')


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}; pass settings as --config.FIELD')
  if not flags.FLAGS['verbosity'].present:
    # Library INFO lines (tfds lookups) would bury the one-line errors.
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  try:
    if config.compare:
      validation.validate_comparison(config)
      compare.run(config, _WORKDIR.value)
    else:
      train.run(config, _WORKDIR.value)
  except FedkdError as e:
    _fail(str(e))


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
