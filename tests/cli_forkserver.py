"""Runs a script once per argument list, each in a forked child.

    python tests/cli_forkserver.py [PARALLEL [SCRIPT]] < CASES

Reads a JSON list of argument lists on stdin and prints a JSON list of
[exit code, stderr]; PARALLEL sets how many run at once (default 4), SCRIPT
the script (default experiments/main.py). The heavy imports happen once,
before any fork and before JAX starts a backend; each child then runs the
script exactly as `python SCRIPT ARGS` would, so the bad-input tests see the
real exit codes and error lines without paying the imports once per case.
"""

import json
import os
import runpy
import sys

# What main.py imports, imported (no JAX backend started) up front; the
# children inherit them. From the repository root, as main.py imports them.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position,unused-import
import experiments.compare
import experiments.runner
import experiments.validation
import ml_collections.config_flags
# pylint: enable=g-import-not-at-top,wrong-import-position,unused-import


def _start(script, args):
  """Forks a child running `script` with `args`; returns (pid, stderr
  pipe)."""
  read, write = os.pipe()
  pid = os.fork()
  if pid == 0:
    os.dup2(write, 2)
    os.close(read)
    # The parent's stdout carries the JSON answer; the run's output goes.
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    sys.stderr = os.fdopen(2, 'w')
    sys.argv = [script, *args]
    # As for `python SCRIPT`: the script's folder comes first.
    sys.path[0] = os.path.abspath(os.path.dirname(script))
    code = 0
    try:
      runpy.run_path(script, run_name='__main__')
    except SystemExit as e:
      # As the interpreter maps it: None is 0, any other non-int is 1.
      code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    except BaseException:  # pylint: disable=broad-except
      import traceback  # pylint: disable=g-import-not-at-top
      traceback.print_exc()
      code = 1
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access
  os.close(write)
  return pid, read


def _finish(pid, read):
  with os.fdopen(read) as f:
    err = f.read()  # error lines are short: the pipe never fills
  _, status = os.waitpid(pid, 0)
  return [os.waitstatus_to_exitcode(status), err]


def run_all(cases, parallel=4, script='experiments/main.py'):
  results, running = [], []
  for args in cases:
    running.append(_start(script, args))
    if len(running) == parallel:
      results.append(_finish(*running.pop(0)))
  return results + [_finish(*r) for r in running]


if __name__ == '__main__':
  print(json.dumps(run_all(json.load(sys.stdin), *map(int, sys.argv[1:2]),
                           *sys.argv[2:3])))
