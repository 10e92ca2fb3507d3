"""The host loop: one jitted round per step, evaluation, checkpoints.

`train(settings, built, client_data, test, work, stop)` runs an algorithm
(`Built`) on stacked client data as `Settings` say, into a locked
`fedkd.workdir.Workdir`: it resumes from the newest checkpoint there and
checkpoints every `checkpoint_every` rounds, on the last round and when
`stop` (`fedkd.stopping`) reports SIGINT/SIGTERM. `experiments/runner.py`
builds all of it from a run config.

Rounds are dispatched asynchronously: the host keeps one round queued behind
the running one and fetches metrics (all rounds' at once) only at rounds it
evaluates or checkpoints. Evaluation is sized to fit the memory (see
`fedkd.metrics`); running out of memory anywhere ends the run with
`OutOfMemory`, naming the settings to lower.
"""

from collections.abc import Callable
import contextlib
import dataclasses
import functools
import os
import signal
import time
from typing import Any, NamedTuple

import jax
import numpy as np
import tqdm

import flax.linen as nn

from fedkd import algorithm
from fedkd import clients
from fedkd import metrics as metrics_lib
from fedkd import privacy
from fedkd import sharding
from fedkd import stopping
from fedkd import workdir as workdir_lib
from fedkd.errors import FedkdError
from fedkd.errors import NO_SPACE_ERRNOS
from fedkd.typing import Params, PRNGKey

# Columns of the final table: (metrics.jsonl key, header, format, scale).
_TABLE = (('round', 'round', '{:d}', 1),
          ('student_accuracy', 'student acc', '{:.4f}', 1),
          ('student_loss', 'student loss', '{:.4f}', 1),
          ('teacher_accuracy', 'teacher acc', '{:.4f}', 1),
          ('upload_bytes', 'upload MB', '{:.3f}', 1e-6),
          ('cumulative_bytes', 'total MB', '{:.3f}', 1e-6),
          ('round_seconds', 'round s', '{:.4f}', 1))
# Running totals over all rounds so far, reported in every row, and the
# per-round counters that add up to each.
_TOTALS = (('cumulative_upload_bytes', ('upload_bytes',)),
           ('cumulative_download_bytes', ('download_bytes',)),
           ('cumulative_bytes', ('upload_bytes', 'download_bytes')),
           ('total_dropped_clients', ('dropped_clients',)),
           ('total_nonfinite_clients', ('nonfinite_clients',)))
# How XLA and its CPU kernels report a failed allocation.
_OOM_MARKERS = ('resource_exhausted', 'out of memory', 'allocat',
                'ynnpack operation failed')


class Diverged(Exception):
  """The global model became NaN/inf; the last good checkpoint is kept."""


class NoFiniteClients(Diverged):
  """Every client update was NaN/inf for `max_nonfinite_rounds` rounds."""


class OutOfMemory(FedkdError):
  """A setting needs more memory than there is; the message names it."""


class Interrupted(Exception):
  """SIGINT/SIGTERM arrived; a checkpoint of the last finished round exists
  (unless no round was run)."""

  def __init__(self, signum: int, rounds_done: int, num_rounds: int):
    name = signal.Signals(signum).name
    if rounds_done == num_rounds:
      message = (f'stopped by {name} after the last round ({rounds_done}); '
                 'the run is complete and saved')
    elif not rounds_done:
      message = (f'stopped by {name} before round 1; no round was run, '
                 'rerun the same command to start')
    else:
      message = (f'stopped by {name} after round {rounds_done}; checkpoint '
                 'saved, rerun the same command to resume')
    super().__init__(message)
    self.signum = signum


def format_table(rows) -> str:
  header = ' | '.join(h for _, h, _, _ in _TABLE)
  lines = [header, '-' * len(header)]
  for row in rows:
    cells = []
    for key, head, fmt, scale in _TABLE:
      value = row.get(key)
      text = '-' if value is None else fmt.format(
          value * scale if scale != 1 else value)
      cells.append(text.rjust(len(head)))
    lines.append(' | '.join(cells))
  return '\n'.join(lines)


@contextlib.contextmanager
def out_of_memory_is(where: str, advice: str):
  """Turns a failed allocation inside into `OutOfMemory`: where, and advice."""
  try:
    yield
  except (jax.errors.JaxRuntimeError, MemoryError) as e:
    text = str(e).strip()
    if isinstance(e, jax.errors.JaxRuntimeError) and not any(
        marker in text.lower() for marker in _OOM_MARKERS):
      raise
    first = text.splitlines()[0][:200] if text else type(e).__name__
    raise OutOfMemory(f'out of memory {where} ({first}); {advice}') from None


def check_fits(compiled, mesh, where: str, advice: str) -> None:
  """Raises `OutOfMemory` if the buffers that `compiled` allocates when it
  runs exceed the free memory: refused before anything is run or written.

  XLA reports them per device at compile time: temporaries and outputs,
  less outputs written over donated inputs (the inputs exist already). CPU
  devices share the host's memory; an accelerator that reports no memory
  limit is not checked.
  """
  analysis = compiled.memory_analysis()
  here = [d for d in mesh.devices.flat
          if d.process_index == jax.process_index()]
  stats = here[0].memory_stats() or {}
  if analysis is None or (here[0].platform != 'cpu'
                          and 'bytes_limit' not in stats):
    return
  needed = (analysis.temp_size_in_bytes + analysis.output_size_in_bytes
            - analysis.alias_size_in_bytes)
  if here[0].platform == 'cpu':
    needed *= len(here)
  free = metrics_lib.available_bytes(here[0])
  if needed > free:
    mib = lambda n: f'{n / 2**20:,.0f} MiB'
    raise OutOfMemory(f'out of memory {where} (it needs {mib(needed)}, '
                      f'{mib(free)} are free); {advice}')


# For running out of memory outside the places that name their own settings.
RUN_ADVICE = ('lower clients_per_chunk, clients_per_round, batch_size or '
               'eval_batch_size, or use a smaller dataset')
_NO_SPACE_TEXTS = ('no space left on device', 'disk quota exceeded')


@contextlib.contextmanager
def out_of_space_is(workdir: str):
  """Turns a full disk inside into one `FedkdError` line: where, and advice.

  Writers that wrap the OSError (orbax, tensorstore) are recognised by its
  text.
  """
  try:
    yield
  except FedkdError:
    raise
  except Exception as e:  # pylint: disable=broad-exception-caught
    text = str(e).strip()
    if not ((isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS) or
            any(t in text.lower() for t in _NO_SPACE_TEXTS)):
      raise
    where = getattr(e, 'filename', None) or workdir
    first = text.splitlines()[0][:200] if text else type(e).__name__
    raise FedkdError(f'no space left on the disk holding {where} ({first}); '
                     'free space there, or choose a workdir on a disk with '
                     'room') from None


# Clients' local-step schedules from this size on are named in the advice.
_SCHEDULE_NAMED_BYTES = 2**30


def _round_advice(settings: 'Settings', cohort_size: int, chunk: int,
                  max_examples: int) -> str:
  """Which settings bound the memory of a training round."""
  at_once = chunk or cohort_size
  if at_once > 1:
    lower = (f'lower clients_per_chunk (clients trained at once, now '
             f'{at_once}), e.g. clients_per_chunk={at_once // 4 or 1},'
             ' or')
  else:
    lower = 'lower'
  batches = f'batch_size (now {settings.batch_size})'
  if settings.public_batch_size:
    batches += f' or public_batch_size (now {settings.public_batch_size})'
  advice = (f'{lower} clients_per_round (now {settings.clients_per_round}) '
            f'or {batches}')
  # Each client's shuffled order of every epoch: int32 indices, bool mask.
  steps = clients.num_steps(max_examples, epochs=settings.local_epochs,
                            batch_size=settings.batch_size)
  schedule = at_once * steps * settings.batch_size * 5
  if schedule >= _SCHEDULE_NAMED_BYTES:
    advice += (f', or local_epochs (now {settings.local_epochs:,}; the '
               f'clients\' shuffled orders take {schedule / 2**20:,.0f} MiB)')
  return advice


def _eval_advice(settings: 'Settings') -> str:
  return (f'lower eval_batch_size (now {settings.eval_batch_size}) or '
          f'eval_teachers (now {settings.eval_teachers})')


class Evaluated(NamedTuple):
  """Models of one architecture that evaluation tests.

  Attributes:
    name: the model's name (`accuracy_<name>` with several architectures).
    model: the module.
    params: reads their stacked parameters ([count, ...]) from a state.
    count: how many there are: 1 global model, or the clients of a group.
  """
  name: str
  model: nn.Module
  params: Callable[[algorithm.ServerState], Params]
  count: int


class Built(NamedTuple):
  """An algorithm ready to run and what evaluation needs to know of it.

  Attributes:
    algorithm: the `FederatedAlgorithm`.
    init: `(params, rng, data) -> state`: `algorithm.init`, given the client
      data (a jit argument, never a closed-over constant) where it trains on
      it (fedmd's transfer learning).
    init_params: rng -> the global model's parameters for `init` (a tuple,
      one per architecture, with several); None without a global model (fd,
      fedmd).
    global_models: the global model(s), evaluated every `eval_every` rounds
      (for feddf with `server_model`, that model).
    private_models: the clients' private models (teachers, mentors, or for
      fd and fedmd the clients' only models), one entry per architecture.
  """
  algorithm: algorithm.FederatedAlgorithm
  init: Callable[[Params, PRNGKey, clients.ClientData],
                 algorithm.ServerState]
  init_params: Callable[[PRNGKey], Params] | None
  global_models: tuple[Evaluated, ...] = ()
  private_models: tuple[Evaluated, ...] = ()


@dataclasses.dataclass(frozen=True)
class Settings:
  """How `train` runs (the run config's fields of the same names).

  Attributes:
    num_clients: clients in the federation.
    clients_per_round: clients sampled each round (client groups: each
      group's share, `clients.group_quota`).
    num_rounds: rounds in the whole run.
    seed: seeds the models, cohorts and rounds.
    batch_size: the local minibatch size (named in out-of-memory advice).
    public_batch_size: the batch size on public data (feddf, fedmd; named
      in out-of-memory advice), or 0 without public data.
    local_epochs: the clients' passes over their data a round (named in
      out-of-memory advice: their shuffled orders are held for the round).
    groups: client groups (architectures); client i is in group i % groups.
    eval_every: rounds between evaluations (and after the last).
    checkpoint_every: rounds between checkpoints; 0 = after the last only.
    eval_batch_size: the largest test batch evaluation may use.
    eval_teachers: private models evaluated, per architecture.
    clients_per_chunk: clients trained at once; 0 = the whole cohort; None
      = chosen from the model and activation sizes (`sharding.auto_chunk`).
    num_devices: devices of the `clients` mesh; 0 = all.
    shard_data: split the client examples by rows over the devices (1/D
      each); False copies them to every device (`sharding.place_data`).
    faults: simulated client failures.
    dp: client-level DP, or None.
    dp_delta: the delta of the reported epsilon (with DP noise).
    dp_accountant: 'rdp' or 'pld'.
    max_nonfinite_rounds: rounds in a row of only NaN/inf updates that end
      the run.
  """
  num_clients: int
  clients_per_round: int
  num_rounds: int
  seed: int = 0
  batch_size: int = 10
  public_batch_size: int = 0
  local_epochs: int = 1
  groups: int = 1
  eval_every: int = 1
  checkpoint_every: int = 0
  eval_batch_size: int = 1000
  eval_teachers: int = 100
  clients_per_chunk: int | None = None
  num_devices: int = 0
  shard_data: bool = True
  faults: algorithm.Faults = algorithm.Faults()
  dp: privacy.DpSettings | None = None
  dp_delta: float = 1e-5
  dp_accountant: str = 'rdp'
  max_nonfinite_rounds: int = 3


@dataclasses.dataclass
class _Run:
  """Everything the loop needs, built once by `_setup`."""
  settings: Settings
  built: Built
  state: algorithm.ServerState
  client_data: clients.ClientData
  apply: Any  # the compiled round
  cohort_for: Any  # round index -> sharded Cohort
  round_key: jax.Array
  # Per architecture, (name, compiled (state, x_test, y_test) -> ([N]
  # losses, [N] accuracies)) of the global model (N = 1) and of the
  # evaluated private models.
  eval_students: tuple[tuple[str, Any], ...]
  eval_teachers: tuple[tuple[str, Any], ...]
  test: tuple[jax.Array, jax.Array]
  compile_seconds: float
  round_advice: str
  accountant: privacy.Accountant | None  # None without DP noise


def _cores() -> int:
  """CPU cores this process may run on."""
  return len(os.sched_getaffinity(0)) if hasattr(
      os, 'sched_getaffinity') else os.cpu_count() or 1


def _first(read_params, state) -> Params:
  """Shapes of the first of the stacked models `read_params` reads."""
  return jax.eval_shape(
      lambda s: jax.tree.map(lambda p: p[0], read_params(s)), state)


def _step_bytes(built: Built, state, data: clients.ClientData,
                batch_size: int) -> int:
  """`metrics.step_bytes` of a client training the global and private
  models of `built` (for feddf with a `server_model`, that model stands in
  for the clients' own)."""
  return metrics_lib.step_bytes(
      [[(m.model, _first(m.params, state)) for m in kind]
       for kind in (built.global_models, built.private_models)],
      jax.ShapeDtypeStruct(data.x.shape[1:], data.x.dtype), batch_size)


def _compile_evaluation(model, read_params, state, x, y, *, num_models: int,
                        max_batch_size: int, budget: int):
  """Compiles `state, x, y -> evaluate_stacked(read_params(state)...)`.

  The chunks come from `metrics.activation_bytes` and `budget`; where the
  compiler reports more working memory than that (accelerators count their
  kernels' scratch space, XLA:CPU does not), they shrink to match and it
  compiles again.

  Returns:
    The compiled function, returning ([N] losses, [N] accuracies).
  """
  per_example = metrics_lib.activation_bytes(
      model, _first(read_params, state),
      jax.ShapeDtypeStruct(x.shape[1:], x.dtype))
  while True:
    batch, chunk = metrics_lib.plan_chunks(
        per_example, num_models=num_models, num_examples=len(y),
        max_batch_size=max_batch_size, budget_bytes=budget)
    evaluate = functools.partial(metrics_lib.evaluate_stacked, model,
                                 batch_size=batch, models_per_chunk=chunk)
    compiled = jax.jit(lambda s, x, y, evaluate=evaluate: evaluate(
        jax.tree.map(lambda p: p[:num_models], read_params(s)), x,
        y)).lower(state, x, y).compile()
    analysis = compiled.memory_analysis()
    used = analysis.temp_size_in_bytes if analysis else 0
    if used <= budget or batch * chunk == 1:
      return compiled
    per_example = -(-used // (batch * chunk))


def _setup(settings: Settings, built: Built, client_data: clients.ClientData,
           test, stop: stopping.Stopper) -> _Run:
  mesh = sharding.make_mesh(settings.num_devices)
  alg = built.algorithm
  key = jax.random.PRNGKey(settings.seed)
  replicated = sharding.replicated(mesh)
  cohort_sharding = sharding.cohort_sharding(mesh)
  groups = settings.groups
  layout = functools.partial(
      sharding.cohort_layout, settings.clients_per_round, mesh,
      quota=clients.group_quota(settings.num_clients,
                                settings.clients_per_round, groups)
      if groups > 1 else ())
  # Unset, the chunk follows from the state's sizes, known after init.
  with out_of_memory_is('placing the data and models', _round_advice(
      settings, *layout(settings.clients_per_chunk or 0),
      client_data.max_examples)):
    client_data = sharding.place_data(client_data, mesh,
                                      settings.shard_data)
    # fd and fedmd have no global model to initialise.
    params = built.init_params and built.init_params(
        jax.random.fold_in(key, 0))
    state = sharding.jit_init(built.init, mesh)(
        params, jax.random.fold_in(key, 1), client_data)
    state_shardings = sharding.state_sharding(state, mesh)
  per_chunk = settings.clients_per_chunk
  if per_chunk is None:
    per_chunk = sharding.auto_chunk(
        state, settings.num_clients, settings.clients_per_round, mesh,
        _step_bytes(built, state, client_data, settings.batch_size))
  cohort_size, chunk = layout(per_chunk)
  round_advice = _round_advice(settings, cohort_size, chunk,
                               client_data.max_examples)

  def cohort_for(round_index):
    # Cohorts depend on (seed, round) only, so a resumed run samples the same.
    rng = np.random.default_rng([settings.seed, round_index])
    return jax.device_put(
        clients.sample_cohort(rng, settings.num_clients,
                              settings.clients_per_round, cohort_size, groups),
        cohort_sharding)

  round_key = jax.random.fold_in(key, 2)
  # Built before compilation (seconds for pld), where a signal still ends
  # the run at once.
  accountant = _accountant(settings)
  stop.phase('compilation')
  chunks = (f'{chunk} client{"s" * (chunk > 1)} a chunk' if chunk else
            'the cohort in one chunk')
  if settings.clients_per_chunk is None:
    chunks += ', chosen from the model sizes'
  hint = sharding.device_split_hint(jax.default_backend(),
                                    jax.local_device_count(), _cores())
  if hint:
    print(hint)
  print(f'compiling the round ({chunks}) and the evaluation', flush=True)
  start = time.perf_counter()
  alg = algorithm.with_round(alg, clients_per_chunk=chunk,
                             faults=settings.faults, dp=settings.dp)
  with out_of_memory_is('compiling the round', round_advice):
    apply = sharding.jit_round(
        alg.apply, mesh, state_shardings,
        sharding.data_sharding(client_data, mesh), donate_argnums=0).lower(
            state, client_data, cohort_for(0), round_key).compile()
  check_fits(apply, mesh, 'in a training round', round_advice)
  compile_seconds = time.perf_counter() - start

  test = jax.device_put(test, replicated)
  evaluation = functools.partial(
      _compile_evaluation, state=state, x=test[0], y=test[1],
      max_batch_size=settings.eval_batch_size,
      budget=metrics_lib.eval_budget_bytes(jax.local_devices()[0]))
  with out_of_memory_is('compiling the evaluation', _eval_advice(settings)):
    eval_students = tuple((m.name, evaluation(m.model, m.params, num_models=1))
                          for m in built.global_models)
    eval_teachers = tuple(
        (m.name, evaluation(m.model, m.params,
                            num_models=min(settings.eval_teachers, m.count)))
        for m in built.private_models if settings.eval_teachers)
  return _Run(settings, built, state, client_data, apply, cohort_for,
              round_key, eval_students, eval_teachers, test, compile_seconds,
              round_advice, accountant)


def _accountant(settings: Settings) -> privacy.Accountant | None:
  """The run's privacy accountant, or None without DP noise."""
  if not (settings.dp and settings.dp.noise_multiplier > 0):
    return None
  return privacy.Accountant(
      noise_multiplier=settings.dp.noise_multiplier,
      sampling_probability=clients.inclusion_probability(
          settings.num_clients, settings.clients_per_round, settings.groups),
      delta=settings.dp_delta, accountant=settings.dp_accountant)


def _evaluate(run: _Run, state, kept: str) -> dict:
  """Test-set figures of the global models and the evaluated private ones.

  With several architectures, each one's mean accuracy is reported too:
  `accuracy_<model>`, or for private teachers beside a global model
  `teacher_accuracy_<model>`. `student_accuracy` and `student_loss` are
  then the means over the global models, `teacher_accuracy` over every
  private model evaluated.
  """
  row = dict(student_accuracy=None, student_loss=None, teacher_accuracy=None)

  def figures(evaluations, prefix):
    """([N] losses, [N] accuracies) of every model of `evaluations`."""
    out = []
    for name, evaluate in evaluations:
      out.append(jax.device_get(evaluate(state, *run.test)))
      if len(evaluations) > 1:
        row[f'{prefix}accuracy_{name}'] = float(np.mean(out[-1][1]))
    return [np.concatenate(x) for x in zip(*out)] if out else None

  with out_of_memory_is('evaluating', f'{_eval_advice(run.settings)}; {kept}'):
    students = figures(run.eval_students, '')
    teachers = figures(run.eval_teachers,
                       'teacher_' if run.eval_students else '')
  if students:
    row.update(student_loss=float(np.mean(students[0])),
               student_accuracy=float(np.mean(students[1])))
  if teachers:
    row['teacher_accuracy'] = float(np.mean(teachers[1]))
  # The headline: the global model, or the clients' own models without one.
  row['accuracy'] = row['student_accuracy' if students else
                        'teacher_accuracy']
  return row


def _row(run: _Run, m, rounds_done, round_seconds, totals, evaluated,
         epsilon):
  row = {'round': rounds_done,
         'upload_bytes': int(m['upload_bytes']),
         'download_bytes': int(m['download_bytes']),
         'clients': int(m['clients']),
         'dropped_clients': int(m['dropped_clients']),
         'nonfinite_clients': int(m['nonfinite_clients']),
         'stragglers': int(m['stragglers']),
         **totals,
         'dp_epsilon': epsilon,
         'round_seconds': round_seconds,
         'compile_seconds': run.compile_seconds,
         **evaluated}
  if 'server_distill_loss' in m:
    row['server_distill_loss'] = float(m['server_distill_loss'])
  examples = max(int(m['train_examples']), 1)
  for name in ('student', 'teacher'):
    if f'{name}_loss_sum' in m:
      row[f'{name}_train_loss'] = float(m[f'{name}_loss_sum']) / examples
  return workdir_lib.json_row(row)


def _account(pending, fetched, totals: dict, kept, streak: int,
             limit: int) -> int:
  """Adds fetched rounds to `totals`; raises `Diverged` at the first NaN/inf.

  Args:
    pending: (round, device metrics) of the rounds fetched.
    fetched: their metrics on the host.
    totals: the running totals, updated in place.
    kept: () -> what the workdir still holds, for the message.
    streak: rounds in a row, before these, whose updates were all NaN/inf.
    limit: `max_nonfinite_rounds`: such rounds in a row that end the run.

  Returns:
    The streak after these rounds.
  """
  for (round_done, _), m in zip(pending, fetched):
    if not m['params_finite']:
      raise Diverged(f'the global model became NaN/inf in round {round_done}; '
                     f'{kept()}; lower the learning rates or clip updates '
                     '(dp_clip_norm)')
    # Rounds whose clients all dropped out say nothing about finiteness.
    if int(m['clients']):
      streak = 0
    elif int(m['nonfinite_clients']):
      streak += 1
    if streak >= limit:
      raise NoFiniteClients(
          f'every client update was NaN/inf in rounds {round_done - streak + 1}'
          f'-{round_done} (max_nonfinite_rounds={limit}), so the global model '
          f'cannot move; {kept()}; lower the learning rates or the loss '
          'weights (prox_mu, ntd_beta)')
    for total, keys in _TOTALS:
      totals[total] += sum(int(m[k]) for k in keys)
  return streak


def _loop(run: _Run, work: workdir_lib.Workdir, stop: stopping.Stopper, *,
          progress: bool):
  settings = run.settings
  state, rows, first, streak = run.state, [], 0, 0
  totals = dict.fromkeys((name for name, _ in _TOTALS), 0)
  restored = work.restore(state, totals)
  if restored is not None:
    first, state, meta = restored
    rows, totals = meta['rows'], meta['totals']
    streak = meta.get('nonfinite_streak', 0)
    print(f'resuming from the checkpoint after round {first}')
    # The rows' compositions again, as the run before made them: pld rounds
    # a differently grouped composition differently (1e-12 of epsilon).
    if run.accountant:
      for row in rows:
        if run.accountant.epsilon(row['round'],
                                  lambda: stop.signum is not None) is None:
          break
  work.start(rows)
  last_saved = first
  if stop.signum:
    raise Interrupted(stop.signum, first, settings.num_rounds)
  pending = []  # (round, metrics on device) not yet fetched
  seconds, timed = 0.0, 0  # training wall time and rounds since the last row

  def kept():
    return (f'the last good checkpoint, from round {last_saved}, is kept in '
            f'{work.path}' if last_saved else 'no checkpoint was saved')

  with tqdm.tqdm(range(first, settings.num_rounds), desc='rounds',
                 initial=first, total=settings.num_rounds,
                 disable=not progress) as bar:
    mark = time.perf_counter()
    for r in bar:
      done = r + 1
      with out_of_memory_is(f'in round {done}',
                             f'{run.round_advice}; {kept()}'):
        state, m = run.apply(state, run.client_data, run.cohort_for(r),
                             jax.random.fold_in(run.round_key, r))
        pending.append((done, m))
        # Waiting for the previous round keeps one round queued, never more,
        # so a stop comes within a round.
        if len(pending) > 1:
          jax.block_until_ready(pending[-2][1])
        evaluate = (done % settings.eval_every == 0 or
                    done == settings.num_rounds)
        save = done == settings.num_rounds or (
            settings.checkpoint_every and done % settings.checkpoint_every == 0)
        if not (evaluate or save or stop.signum):
          continue
        fetched = jax.device_get([m for _, m in pending])
      seconds += time.perf_counter() - mark
      timed += len(pending)
      streak = _account(pending, fetched, totals, kept, streak,
                        settings.max_nonfinite_rounds)
      pending.clear()
      if evaluate:
        evaluated = _evaluate(run, state, kept())
        # A stop request ends the accounting early: this row's epsilon is
        # then null, the next row's complete.
        epsilon = run.accountant and run.accountant.epsilon(
            done, lambda: stop.signum is not None)
        rows.append(_row(run, fetched[-1], done, seconds / timed, totals,
                         evaluated, epsilon))
        seconds, timed = 0.0, 0
        work.append_row(rows[-1])
        bar.set_postfix(accuracy=f'{rows[-1]["accuracy"]:.3f}')
      if save or stop.signum:
        work.save(done, state, {'rows': rows, 'totals': totals,
                                'nonfinite_streak': streak})
        last_saved = done
      if stop.signum and done < settings.num_rounds:
        raise Interrupted(stop.signum, done, settings.num_rounds)
      mark = time.perf_counter()
  work.write_final(state.params)
  if stop.signum:
    raise Interrupted(stop.signum, settings.num_rounds, settings.num_rounds)
  return rows


def train(settings: Settings, built: Built, client_data: clients.ClientData,
          test: tuple[Any, Any], work: workdir_lib.Workdir,
          stop: stopping.Stopper, *, progress: bool = True) -> list[dict]:
  """Trains `built` as `settings` say, recording into the locked `work`.

  Args:
    settings: how to run.
    built: the algorithm and its models.
    client_data: every client's examples (`clients.stack_clients`), with
      the public data where the algorithm reads it.
    test: (x_test, y_test), what evaluation scores.
    work: the run directory, locked and checked against this run.
    stop: the run's `stopping.Stopper`; nothing in `work` changes before
      the first round, so a stop until then leaves it as it was.
    progress: show a progress bar.

  Returns:
    The rows of metrics.jsonl, one per evaluated round.

  Raises:
    OutOfMemory: a setting too large for the memory (the message says which).
    Diverged: the global model became NaN/inf, or (`NoFiniteClients`)
      every client update did for `max_nonfinite_rounds` rounds in a row.
    Interrupted: SIGINT/SIGTERM once the workdir was in use.
  """
  stop.phase('set-up')
  setup = _setup(settings, built, client_data, test, stop)
  stop.defer()  # the workdir is written from here on
  return _loop(setup, work, stop, progress=progress)
