"""The one exception type for bad user input.

Library code raises `FedkdError` with a single line that says what is wrong and
how to fix it; `experiments/main.py` and the other scripts print that line
and exit with code 2 (`experiments/cli.py`).
The line names settings by their `train.Settings` field names
(`overwrite=True`, `clients_per_chunk=25`), not by the flags of one script
(`experiments/main.py` takes each as a config override).
"""

import errno

# OSError numbers of a full disk or an exhausted quota.
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class FedkdError(ValueError):
  """Bad user input: a config value, a dataset file, a work directory."""
