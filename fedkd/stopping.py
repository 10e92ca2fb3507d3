"""SIGINT/SIGTERM stop a run promptly, whatever it is doing.

A Python signal handler runs only in the main thread, between bytecodes, so a
main thread blocked in XLA (a compile can take minutes) would hold it back.
`run_in_worker` therefore does the work in a worker thread while the main
thread waits in short slices and handles signals:

* until a run writes to its workdir (start-up, data loading, compilation), a
  signal ends the process at once: one line on stderr, then
  `os._exit(128 + signum)`, which skips the interpreter's teardown (that can
  crash while XLA threads still compile) and leaves nothing half-written;
* afterwards (`Stopper.defer`), a signal only sets `Stopper.signum`; the host
  loop checks it after each round, checkpoints and stops. A second signal
  ends the process at once, like a SIGKILL, which the checkpoints survive.

A first signal during or after the last round (its checkpoint, the final
parameters, the table) lets the run finish; it still exits with 128 + the
signal number, saying that the run is complete (`experiments/runner.py`),
so that a `compare` stops there too. Once `experiments/main.py` has the
outcome, a further signal only ends the process at once with its code.
"""

from collections.abc import Callable, Iterator
import contextlib
import os
import signal
import sys
import threading
from typing import Any

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_WAIT_SECONDS = 0.1


def exit_now(message: str, code: int) -> None:
  """Prints `message` on stderr and ends the process without teardown."""
  sys.stdout.flush()
  print(message, file=sys.stderr, flush=True)
  os._exit(code)  # pylint: disable=protected-access


class Stopper:
  """What a signal does at this point of a run.

  Attributes:
    signum: the first signal received once deferred, else None.
  """

  def __init__(self):
    self.signum = None
    self._phase = 'start-up'
    self._deferred = False

  def phase(self, name: str) -> None:
    """Names what the run does now, for the message of an immediate stop."""
    self._phase = name

  def defer(self) -> None:
    """From now on, a first signal only sets `signum`."""
    self._deferred = True

  def handle(self, signum: int, frame) -> None:
    del frame  # where the main thread waits says nothing
    name = signal.Signals(signum).name
    if not self._deferred:
      # "This run": in a comparison, the sub-runs before it are kept.
      exit_now(f'stopped by {name} during {self._phase}; this run saved '
               'nothing yet, rerun the same command to start it',
               128 + signum)
    elif self.signum is None:
      self.signum = signum
    else:
      # A leading newline ends a progress bar's line.
      exit_now(f'\nstopped by a second {name}; rounds after the newest '
               'checkpoint are lost, rerun the same command to resume',
               128 + signum)


@contextlib.contextmanager
def handling_signals() -> Iterator[Stopper]:
  """Routes SIGINT/SIGTERM to a `Stopper` while active.

  Outside the main thread, where Python cannot install handlers, the
  `Stopper` never fires.
  """
  stopper = Stopper()
  if threading.current_thread() is not threading.main_thread():
    yield stopper
    return
  previous = {s: signal.signal(s, stopper.handle) for s in _SIGNALS}
  try:
    yield stopper
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def run_in_worker(fn: Callable[..., Any], *args) -> Any:
  """`fn(*args)` in a worker thread; the caller's thread keeps handling signals.

  Returns:
    What `fn` returns; what it raises is raised here.
  """
  outcome = {}

  def target():
    try:
      outcome['value'] = fn(*args)
    except BaseException as e:  # pylint: disable=broad-except
      outcome['error'] = e

  worker = threading.Thread(target=target, name='fedkd-run', daemon=True)
  worker.start()
  while worker.is_alive():
    worker.join(_WAIT_SECONDS)
  if 'error' in outcome:
    raise outcome['error']
  return outcome['value']
