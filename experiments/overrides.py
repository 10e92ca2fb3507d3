"""The `--config.FIELD` overrides that ml_collections cannot take as typed.

* `--config.FIELD=none` unsets a field that may be unset (its default is
  None, as `clients_per_chunk`'s): ml_collections parses an override by the
  field's type, and `int` has no None.
* `--config.FIELD.SUB=VALUE` into a field that holds one value fails inside
  ml_collections with a message about indexing; here it is one line that
  names the field.
* Lists of names (`compare`, `client_models`) may have spaces after their
  commas, as a shell-quoted "fedavg, fedkd" has.
"""

from collections.abc import Sequence

import ml_collections

from fedkd.errors import FedkdError

_PREFIX = '--config.'


def _overrides(argv: Sequence[str]):
  """(index, path, value or None, arguments it takes) of each override."""
  for i, arg in enumerate(argv):
    if not arg.startswith(_PREFIX):
      continue
    path, eq, value = arg[len(_PREFIX):].partition('=')
    if eq:
      yield i, path, value, 1
    elif i + 1 < len(argv) and not argv[i + 1].startswith('-'):
      yield i, path, argv[i + 1], 2
    else:
      yield i, path, None, 1


def check_paths(argv: Sequence[str],
                config: ml_collections.ConfigDict) -> None:
  """Refuses `--config.A.B` where field A holds a value, not fields."""
  for _, path, _, _ in _overrides(argv):
    field, dot, _ = path.partition('.')
    if dot and field in config and not isinstance(
        config[field], ml_collections.ConfigDict):
      raise FedkdError(f'--config.{path}: {field} is one setting, not a '
                       f'group of fields; set it with --config.{field}=VALUE')


def split_unsets(
    argv: Sequence[str], config: ml_collections.ConfigDict
) -> tuple[list[str], list[str]]:
  """`argv` without its `none` overrides of the fields whose default in
  `config` is None, and the fields that the last of them unsets (with their
  earlier overrides dropped too)."""
  unsettable = {f for f, v in config.items() if v is None}
  to_none = lambda value: value is not None and value.lower() == 'none'
  last = {path: to_none(value) for _, path, value, _ in _overrides(argv)
          if path in unsettable}
  unset = [f for f, is_none in last.items() if is_none]
  drop = {j for i, path, value, n in _overrides(argv)
          if path in unset or (path in unsettable and to_none(value))
          for j in range(i, i + n)}
  return [a for j, a in enumerate(argv) if j not in drop], unset


# Config fields that hold comma-separated names.
LIST_FIELDS = ('client_models', 'compare')


def tidy_lists(config: ml_collections.ConfigDict) -> None:
  """Strips the spaces around each name of `LIST_FIELDS`, in place."""
  for field in LIST_FIELDS:
    if config.get(field):
      config[field] = ','.join(n.strip() for n in config[field].split(','))
