"""The host loop: data, partition, algorithm, one jitted round per step.

`run(config, workdir)` is everything `experiments/main.py` does after parsing
flags. It validates all input before writing anything to `workdir`, resumes
from the newest checkpoint there, and checkpoints every `checkpoint_every`
rounds, on the last round and on SIGINT/SIGTERM (see `fedkd.stopping`).

Rounds are dispatched asynchronously: the host keeps one round queued behind
the running one and fetches metrics (all rounds' at once) only at rounds it
evaluates or checkpoints. Evaluation is sized to fit the memory (see
`fedkd.metrics`); running out of memory anywhere ends the run with
`OutOfMemory`, naming the settings to lower.
"""

import contextlib
import dataclasses
import functools
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from fedkd import algorithm
from fedkd import algorithms
from fedkd import clients
from fedkd import data
from fedkd import metrics as metrics_lib
from fedkd import partition
from fedkd import privacy
from fedkd import sharding
from fedkd import stopping
from fedkd import synthetic
from fedkd import validation
from fedkd import workdir as workdir_lib
from fedkd.errors import FedkdError
from fedkd.errors import NO_SPACE_ERRNOS

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
  """SIGINT/SIGTERM arrived; a checkpoint of the last finished round exists."""

  def __init__(self, signum: int, rounds_done: int, num_rounds: int):
    name = signal.Signals(signum).name
    if rounds_done == num_rounds:
      message = (f'stopped by {name} after the last round ({rounds_done}); '
                 'the run is complete and saved')
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
def _out_of_memory_is(where: str, advice: str):
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


# feddf and fedmd with public_examples 0 hold out this share of the training
# examples as public data.
DEFAULT_PUBLIC_FRACTION = 0.1
# For running out of memory outside the places that name their own settings.
_RUN_ADVICE = ('lower clients_per_chunk, clients_per_round, batch_size or '
               'eval_batch_size, or use a smaller dataset')
_NO_SPACE_TEXTS = ('no space left on device', 'disk quota exceeded')


@contextlib.contextmanager
def _out_of_space_is(workdir: str):
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
                     'free space there, or choose a --workdir on a disk with '
                     'room') from None


def _round_advice(config, cohort_size: int, chunk: int) -> str:
  """Which settings bound the memory of a training round."""
  at_once = chunk or cohort_size
  if at_once > 1:
    lower = (f'lower clients_per_chunk (clients trained at once, now '
             f'{at_once}), e.g. --config.clients_per_chunk={at_once // 4 or 1},'
             ' or')
  else:
    lower = 'lower'
  return (f'{lower} clients_per_round (now {config.clients_per_round}) or '
          f'batch_size (now {config.batch_size})')


def _eval_advice(config) -> str:
  return (f'lower eval_batch_size (now {config.eval_batch_size}) or '
          f'eval_teachers (now {config.eval_teachers})')


@dataclasses.dataclass
class _Run:
  """Everything the loop needs, built once by `_setup`."""
  config: Any
  built: algorithms.Built
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
  one = jax.eval_shape(
      lambda s: jax.tree.map(lambda p: p[0], read_params(s)), state)
  per_example = metrics_lib.activation_bytes(
      model, one, jax.ShapeDtypeStruct(x.shape[1:], x.dtype))
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


def _setup(config, dataset, parts, public_x, public_y,
           stop: stopping.Stopper) -> _Run:
  mesh = sharding.make_mesh(config.num_devices)
  input_shape = dataset.x_train.shape[1:]
  built = algorithms.build(config, input_shape, dataset.num_classes,
                           len(public_x))
  alg = built.algorithm
  key = jax.random.PRNGKey(config.seed)
  replicated = sharding.replicated(mesh)
  cohort_sharding = sharding.cohort_sharding(mesh)
  groups = len(algorithms.architectures(config))
  cohort_size, chunk = sharding.cohort_layout(
      config.clients_per_round, mesh, config.clients_per_chunk,
      quota=clients.group_quota(config.num_clients, config.clients_per_round,
                                groups) if groups > 1 else ())
  round_advice = _round_advice(config, cohort_size, chunk)
  with _out_of_memory_is('placing the data and models', round_advice):
    # Every device holds all client data: cohorts are random, so split rows
    # would sit on any device, and XLA then gathers each local step's batch
    # with an all-reduce across devices (rounds ~1.3x slower on 8 CPU devices).
    client_data = jax.device_put(
        clients.stack_clients(dataset.x_train, dataset.y_train, parts).replace(
            public_x=public_x, public_y=public_y), replicated)
    # fd and fedmd have no global model to initialise.
    params = built.init_params and built.init_params(
        jax.random.fold_in(key, 0))
    state = jax.jit(algorithms.initializer(config, alg))(
        params, jax.random.fold_in(key, 1), client_data)
    state_shardings = sharding.state_sharding(state, mesh)
    state = jax.device_put(state, state_shardings)

  def cohort_for(round_index):
    # Cohorts depend on (seed, round) only, so a resumed run samples the same.
    rng = np.random.default_rng([config.seed, round_index])
    return jax.device_put(
        clients.sample_cohort(rng, config.num_clients,
                              config.clients_per_round, cohort_size, groups),
        cohort_sharding)

  round_key = jax.random.fold_in(key, 2)
  # Built before compilation (seconds for pld), where a signal still ends
  # the run at once.
  accountant = _accountant(config)
  stop.phase('compilation')
  print('compiling the round and the evaluation', flush=True)
  start = time.perf_counter()
  dp = None
  if config.dp_clip_norm > 0:
    dp = privacy.DpSettings(config.dp_clip_norm, config.dp_noise_multiplier,
                            expected_clients=config.clients_per_round)
  round_fn = algorithm.make_round(
      alg.client_update, alg.server_update, clients_per_chunk=chunk,
      faults=algorithm.Faults(dropout_rate=config.dropout_rate,
                              straggler_rate=config.straggler_rate), dp=dp)
  with _out_of_memory_is('compiling the round', round_advice):
    apply = jax.jit(
        round_fn, donate_argnums=0,
        in_shardings=(state_shardings, replicated, cohort_sharding,
                      replicated),
        out_shardings=(state_shardings, replicated)).lower(
            state, client_data, cohort_for(0), round_key).compile()
  compile_seconds = time.perf_counter() - start

  test = jax.device_put((dataset.x_test, dataset.y_test), replicated)
  evaluation = functools.partial(
      _compile_evaluation, state=state, x=test[0], y=test[1],
      max_batch_size=config.eval_batch_size,
      budget=metrics_lib.eval_budget_bytes(jax.local_devices()[0]))
  with _out_of_memory_is('compiling the evaluation', _eval_advice(config)):
    eval_students = tuple((m.name, evaluation(m.model, m.params, num_models=1))
                          for m in built.global_models)
    eval_teachers = tuple(
        (m.name, evaluation(m.model, m.params,
                            num_models=min(config.eval_teachers, m.count)))
        for m in built.private_models if config.eval_teachers)
  return _Run(config, built, state, client_data, apply, cohort_for, round_key,
              eval_students, eval_teachers, test, compile_seconds,
              round_advice, accountant)


def _accountant(config) -> privacy.Accountant | None:
  """The run's privacy accountant, or None without DP noise."""
  if not (config.dp_clip_norm > 0 and config.dp_noise_multiplier > 0):
    return None
  return privacy.Accountant(
      noise_multiplier=config.dp_noise_multiplier,
      sampling_probability=config.clients_per_round / config.num_clients,
      delta=config.dp_delta, accountant=config.dp_accountant)


def _evaluate(run: _Run, state, kept: str) -> dict:
  """Test-set figures of the global models and the evaluated private ones.

  With several architectures, each one's mean accuracy is reported too
  (`accuracy_<model>`); `student_accuracy` and `student_loss` are then the
  means over the global models, `teacher_accuracy` over every private model
  evaluated.
  """
  row = dict(student_accuracy=None, student_loss=None, teacher_accuracy=None)
  several = len(run.eval_students) > 1 or len(run.eval_teachers) > 1

  def figures(evaluations):
    """([N] losses, [N] accuracies) of every model of `evaluations`."""
    out = []
    for name, evaluate in evaluations:
      out.append(jax.device_get(evaluate(state, *run.test)))
      if several:
        row[f'accuracy_{name}'] = float(np.mean(out[-1][1]))
    return [np.concatenate(x) for x in zip(*out)] if out else None

  with _out_of_memory_is('evaluating', f'{_eval_advice(run.config)}; {kept}'):
    students, teachers = figures(run.eval_students), figures(
        run.eval_teachers)
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
  examples = max(float(m['train_examples']), 1.0)
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
  config = run.config
  state, rows, first, streak = run.state, [], 0, 0
  totals = dict.fromkeys((name for name, _ in _TOTALS), 0)
  restored = work.restore(state, totals)
  if restored is not None:
    first, state, meta = restored
    rows, totals = meta['rows'], meta['totals']
    streak = meta.get('nonfinite_streak', 0)
    print(f'resuming from the checkpoint after round {first}')
  work.start(rows)
  last_saved = first
  if stop.signum:
    raise Interrupted(stop.signum, first, config.num_rounds)
  pending = []  # (round, metrics on device) not yet fetched
  seconds, timed = 0.0, 0  # training wall time and rounds since the last row

  def kept():
    return (f'the last good checkpoint, from round {last_saved}, is kept in '
            f'{work.path}' if last_saved else 'no checkpoint was saved')

  with tqdm.tqdm(range(first, config.num_rounds), desc='rounds',
                 initial=first, total=config.num_rounds,
                 disable=not progress) as bar:
    mark = time.perf_counter()
    for r in bar:
      done = r + 1
      with _out_of_memory_is(f'in round {done}',
                             f'{run.round_advice}; {kept()}'):
        state, m = run.apply(state, run.client_data, run.cohort_for(r),
                             jax.random.fold_in(run.round_key, r))
        pending.append((done, m))
        # Waiting for the previous round keeps one round queued, never more,
        # so a stop comes within a round.
        if len(pending) > 1:
          jax.block_until_ready(pending[-2][1])
        evaluate = done % config.eval_every == 0 or done == config.num_rounds
        save = done == config.num_rounds or (
            config.checkpoint_every and done % config.checkpoint_every == 0)
        if not (evaluate or save or stop.signum):
          continue
        fetched = jax.device_get([m for _, m in pending])
      seconds += time.perf_counter() - mark
      timed += len(pending)
      streak = _account(pending, fetched, totals, kept, streak,
                        config.max_nonfinite_rounds)
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
      if stop.signum and done < config.num_rounds:
        raise Interrupted(stop.signum, done, config.num_rounds)
      mark = time.perf_counter()
  work.write_final(state.params)
  if stop.signum:
    raise Interrupted(stop.signum, config.num_rounds, config.num_rounds)
  return rows


def _hold_out_public(dataset: data.Dataset, num_public: int, seed: int):
  """Splits `num_public` random training examples off as public data.

  Returns:
    (dataset without them, public features, public labels).
  """
  if num_public >= len(dataset.y_train):
    raise FedkdError(f'public_examples={num_public} leaves no training data: '
                     f'{dataset.name} has {len(dataset.y_train)} training '
                     'examples')
  order = np.random.default_rng([seed, 1]).permutation(len(dataset.y_train))
  public, train = order[:num_public], np.sort(order[num_public:])
  return (dataclasses.replace(dataset, x_train=dataset.x_train[train],
                              y_train=dataset.y_train[train]),
          dataset.x_train[public], dataset.y_train[public].astype(np.int32))


def num_public(config, num_train: int) -> int:
  """Training examples to hold out as public data.

  `public_examples`, or where it is 0 for an algorithm that needs public data
  (feddf, fedmd), `DEFAULT_PUBLIC_FRACTION` of the `num_train` examples.
  """
  if config.public_examples or config.algorithm not in algorithms.PUBLIC_DATA:
    return config.public_examples
  return max(1, int(DEFAULT_PUBLIC_FRACTION * num_train))


def load_data(config):
  """The dataset, its partition into clients and the public data.

  Returns:
    (dataset, parts, public_x, public_y); `public_y` is empty unless the
    algorithm reads the public labels (`algorithms.public_labels`).
  """
  if config.dataset == 'synthetic':
    dataset, parts = synthetic.synthetic(
        config.num_clients, alpha=config.synthetic_alpha,
        beta=config.synthetic_beta,
        max_examples=config.synthetic_max_examples, seed=config.seed)
    return dataset, parts, dataset.x_train[:0], dataset.y_train[:0]
  dataset = data.load_dataset(config.dataset, config.data_dir or None,
                              download=config.tfds_download)
  dataset, public_x, public_y = _hold_out_public(
      dataset, num_public(config, len(dataset.y_train)), config.seed)
  parts = partition.partition(
      dataset.y_train, config.num_clients, config.partition,
      alpha=config.alpha, shards_per_client=config.shards_per_client,
      seed=config.seed)
  if not algorithms.public_labels(config):
    public_y = public_y[:0]  # e.g. fd's and fedkd's runs have none
  return dataset, parts, public_x, public_y


def _partition_name(config) -> str:
  return 'natural' if config.dataset == 'synthetic' else config.partition


def run(config, workdir: str, *, progress: bool = True) -> list[dict]:
  """Trains as configured, writing results to `workdir` (see fedkd.workdir).

  The work runs in a worker thread, so SIGINT/SIGTERM are handled at once
  from any point, compilation included (see `fedkd.stopping`).

  Returns:
    The rows of metrics.jsonl, one per evaluated round.

  Raises:
    FedkdError: bad input (`OutOfMemory`: a setting too large for memory).
    Diverged: the global model became NaN/inf, or (`NoFiniteClients`)
      every client update did for `max_nonfinite_rounds` rounds in a row.
    Interrupted: SIGINT/SIGTERM once the workdir was in use.
  """
  with stopping.handling_signals() as stop, _out_of_space_is(workdir), \
      _out_of_memory_is('during the run', _RUN_ADVICE):
    return stopping.run_in_worker(_run, config, workdir, stop, progress)


def _checked_data(config):
  """Validates `config` and its data.

  Returns:
    (dataset, parts, public_x, public_y, the fingerprint a checkpoint keeps).
  """
  validation.validate_config(config)
  dataset, parts, public_x, public_y = load_data(config)
  validation.validate_models(config, dataset.x_train.shape[1:],
                             dataset.num_classes, len(public_x))
  # Only runs that read the public labels hash them: other checkpoints keep
  # their fingerprints.
  labels = (public_y,) if len(public_y) else ()
  return (dataset, parts, public_x, public_y,
          data.fingerprint(dataset, public_x, *labels))


def check(config, workdir: str) -> None:
  """Refuses what `run` would refuse before training; trains nothing.

  The config, its data and the models are checked; an existing `workdir` is
  locked, checked against the run and released, a missing one is not made.
  `experiments/compare.py` checks every sub-run so before the first starts.

  Raises:
    FedkdError: as `run` would before its first round.
  """
  with _out_of_space_is(workdir), _out_of_memory_is('checking the data',
                                                    _RUN_ADVICE):
    *_, fingerprint = _checked_data(config)
    validation.validate_workdir(workdir, create=False)
    if os.path.isdir(workdir):
      workdir_lib.Workdir(workdir, config.to_dict(), data=fingerprint,
                          overwrite=config.overwrite).close()


def _run(config, workdir: str, stop: stopping.Stopper, progress: bool):
  validation.validate_processes(config)
  sharding.initialize_distributed(config.coordinator_address,
                                  config.num_processes, config.process_id,
                                  config.coordinator_timeout)
  stop.phase('data loading')
  dataset, parts, public_x, public_y, fingerprint = _checked_data(config)
  validation.validate_workdir(workdir)
  # Locks the workdir and refuses another run's files before the set-up;
  # nothing in it changes before the loop starts.
  work = workdir_lib.Workdir(workdir, config.to_dict(), data=fingerprint,
                             overwrite=config.overwrite)
  try:
    stop.phase('set-up')
    setup = _setup(config, dataset, parts, public_x, public_y, stop)
    stop.defer()  # the workdir is written from here on
    if config.algorithm in algorithms.PUBLIC_DATA and not (
        config.public_examples):
      print(f'public data: {len(public_x)} training examples held out '
            f'({DEFAULT_PUBLIC_FRACTION:.0%}, as public_examples is 0)')
    if num_val := algorithms.feddf_num_val(config, len(public_x)):
      print(f'feddf validates its distillation on {num_val} of the '
            f'{len(public_x)} public examples (distill_val_fraction)')
    print(f'{_partition_name(config)} partition of {dataset.name}:')
    print(partition.describe(dataset.y_train, parts, dataset.num_classes))
    rows = _loop(setup, work, stop, progress=progress)
  finally:
    work.close()
  print(format_table(rows))
  return rows
