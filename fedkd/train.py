"""The host loop: data, partition, algorithm, one jitted round per step.

`run(config, workdir)` is everything `experiments/main.py` does after parsing
flags. It validates all input before writing anything to `workdir`, resumes
from the newest checkpoint there, and checkpoints every `checkpoint_every`
rounds, on the last round and on SIGINT/SIGTERM.
"""

import contextlib
import dataclasses
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
from fedkd import synthetic
from fedkd import validation
from fedkd import workdir as workdir_lib
from fedkd.errors import FedkdError

# Columns of the final table: (metrics.jsonl key, header, format, scale).
_TABLE = (('round', 'round', '{:d}', 1),
          ('student_accuracy', 'student acc', '{:.4f}', 1),
          ('student_loss', 'student loss', '{:.4f}', 1),
          ('teacher_accuracy', 'teacher acc', '{:.4f}', 1),
          ('upload_bytes', 'upload MB', '{:.3f}', 1e-6),
          ('cumulative_bytes', 'total MB', '{:.3f}', 1e-6),
          ('round_seconds', 'round s', '{:.4f}', 1))


class Diverged(Exception):
  """The global model became NaN/inf; the last good checkpoint is kept."""


class Interrupted(Exception):
  """SIGINT/SIGTERM arrived; a checkpoint of the last finished round exists."""

  def __init__(self, signum: int, rounds_done: int):
    super().__init__(f'stopped by {signal.Signals(signum).name} after round '
                     f'{rounds_done}; checkpoint saved, rerun the same '
                     'command to resume')
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
def _signals_to_flag():
  """While active, SIGINT/SIGTERM only append themselves to the yielded list.

  The host loop checks it between rounds, so a stop never lands in the middle
  of a round or of a checkpoint write.
  """
  received = []
  handler = lambda signum, frame: received.append(signum)
  previous = {s: signal.signal(s, handler)
              for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield received
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


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
  eval_student: Any
  eval_teachers: Any
  compile_seconds: float


def _setup(config, dataset, parts, public_x) -> _Run:
  mesh = sharding.make_mesh(config.num_devices)
  input_shape = dataset.x_train.shape[1:]
  built = algorithms.build(config, input_shape, dataset.num_classes,
                           len(public_x))
  alg = built.algorithm
  key = jax.random.PRNGKey(config.seed)
  replicated = sharding.replicated(mesh)
  cohort_sharding = sharding.cohort_sharding(mesh)
  client_data = jax.device_put(
      clients.stack_clients(dataset.x_train, dataset.y_train, parts).replace(
          public_x=public_x), replicated)
  # fd and fedmd have no global model to initialise.
  params = built.student and built.student.init(
      jax.random.fold_in(key, 0), jnp.zeros((1, *input_shape)))
  state = jax.jit(alg.init)(params, jax.random.fold_in(key, 1))
  state_shardings = sharding.state_sharding(state, mesh)
  state = jax.device_put(state, state_shardings)
  cohort_size, chunk = sharding.cohort_layout(
      config.clients_per_round, mesh, config.clients_per_chunk)

  def cohort_for(round_index):
    # Cohorts depend on (seed, round) only, so a resumed run samples the same.
    rng = np.random.default_rng([config.seed, round_index])
    return jax.device_put(
        clients.sample_cohort(rng, config.num_clients,
                              config.clients_per_round, cohort_size),
        cohort_sharding)

  round_key = jax.random.fold_in(key, 2)
  start = time.perf_counter()
  dp = None
  if config.dp_clip_norm > 0:
    dp = privacy.DpSettings(config.dp_clip_norm, config.dp_noise_multiplier,
                            expected_clients=config.clients_per_round)
  round_fn = algorithm.make_round(
      alg.client_update, alg.server_update, clients_per_chunk=chunk,
      faults=algorithm.Faults(dropout_rate=config.dropout_rate,
                              straggler_rate=config.straggler_rate), dp=dp)
  apply = jax.jit(
      round_fn, donate_argnums=0,
      in_shardings=(state_shardings, replicated, cohort_sharding,
                    replicated),
      out_shardings=(state_shardings, replicated)).lower(
          state, client_data, cohort_for(0), round_key).compile()
  compile_seconds = time.perf_counter() - start

  x_test, y_test = jnp.asarray(dataset.x_test), jnp.asarray(dataset.y_test)
  batch = min(config.eval_batch_size, len(dataset.y_test))
  evaluate = lambda model, p: metrics_lib.evaluate(model, p, x_test, y_test,
                                                   batch_size=batch)
  eval_student = built.student and jax.jit(
      lambda state: evaluate(built.student, built.global_params(state)))
  num_teachers = min(config.eval_teachers, config.num_clients)
  eval_teachers = None
  if built.teacher is not None and num_teachers:
    eval_teachers = jax.jit(lambda state: jnp.mean(clients.map_clients(
        lambda p: evaluate(built.teacher, p)[1])(jax.tree.map(
            lambda t: t[:num_teachers], built.teachers(state)))))
  return _Run(config, built, state, client_data, apply, cohort_for, round_key,
              eval_student, eval_teachers, compile_seconds)


def _epsilon(config, rounds_done):
  """(epsilon, delta) spent so far, or None without DP noise."""
  if not (config.dp_clip_norm > 0 and config.dp_noise_multiplier > 0):
    return None
  return privacy.epsilon(
      noise_multiplier=config.dp_noise_multiplier,
      sampling_probability=config.clients_per_round / config.num_clients,
      rounds=rounds_done, delta=config.dp_delta,
      accountant=config.dp_accountant)


def _row(run: _Run, state, m, rounds_done, round_seconds, totals):
  row = {'round': rounds_done, 'student_accuracy': None,
         'student_loss': None, 'teacher_accuracy': None,
         'upload_bytes': int(m['upload_bytes']),
         'download_bytes': int(m['download_bytes']),
         'clients': int(m['clients']),
         'dropped_clients': int(m['dropped_clients']),
         'nonfinite_clients': int(m['nonfinite_clients']),
         'stragglers': int(m['stragglers']),
         **totals,
         'dp_epsilon': _epsilon(run.config, rounds_done),
         'round_seconds': round_seconds,
         'compile_seconds': run.compile_seconds}
  if run.eval_student:
    loss, acc = jax.device_get(run.eval_student(state))
    row.update(student_accuracy=float(acc), student_loss=float(loss))
  if 'server_distill_loss' in m:
    row['server_distill_loss'] = float(m['server_distill_loss'])
  examples = max(float(m['train_examples']), 1.0)
  for name in ('student', 'teacher'):
    if f'{name}_loss_sum' in m:
      row[f'{name}_train_loss'] = float(m[f'{name}_loss_sum']) / examples
  if run.eval_teachers is not None:
    row['teacher_accuracy'] = float(run.eval_teachers(state))
  # The headline: the global model, or the clients' own models without one.
  row['accuracy'] = row['student_accuracy' if run.eval_student else
                        'teacher_accuracy']
  return row


def _loop(run: _Run, work: workdir_lib.Workdir, *, progress: bool):
  config = run.config
  state, rows, first = run.state, [], 0
  # Running totals over all rounds so far, reported in every row.
  totals = dict.fromkeys(('cumulative_upload_bytes',
                          'cumulative_download_bytes', 'cumulative_bytes',
                          'total_dropped_clients', 'total_nonfinite_clients'),
                         0)
  restored = work.restore(state)
  if restored is not None:
    first, state, meta = restored
    rows, totals = meta['rows'], meta['totals']
    print(f'resuming from the checkpoint after round {first}')
  work.start(rows)
  last_saved = first

  def save(rounds_done):
    work.save(rounds_done, state, {'rows': rows, 'totals': totals})

  with _signals_to_flag() as stop, tqdm.tqdm(
      range(first, config.num_rounds), desc='rounds', initial=first,
      total=config.num_rounds, disable=not progress) as bar:
    for r in bar:
      start = time.perf_counter()
      state, m = run.apply(state, run.client_data, run.cohort_for(r),
                           jax.random.fold_in(run.round_key, r))
      m = jax.device_get(m)
      round_seconds = time.perf_counter() - start
      done = r + 1
      if not m['params_finite']:
        kept = (f'the last good checkpoint, from round {last_saved}, is kept '
                f'in {work.path}' if last_saved else 'no checkpoint was saved')
        raise Diverged(f'the global model became NaN/inf in round {done}; '
                       f'{kept}; lower the learning rates or clip updates '
                       '(dp_clip_norm)')
      for total, keys in (
          ('cumulative_upload_bytes', ('upload_bytes',)),
          ('cumulative_download_bytes', ('download_bytes',)),
          ('cumulative_bytes', ('upload_bytes', 'download_bytes')),
          ('total_dropped_clients', ('dropped_clients',)),
          ('total_nonfinite_clients', ('nonfinite_clients',))):
        totals[total] += sum(int(m[k]) for k in keys)
      if done % config.eval_every == 0 or done == config.num_rounds:
        rows.append(_row(run, state, m, done, round_seconds, totals))
        work.append_row(rows[-1])
        bar.set_postfix(accuracy=f'{rows[-1]["accuracy"]:.3f}')
      if stop or done == config.num_rounds or (
          config.checkpoint_every and done % config.checkpoint_every == 0):
        save(done)
        last_saved = done
      if stop:
        raise Interrupted(stop[0], done)
  work.write_final(state.params)
  return rows


def _hold_out_public(dataset: data.Dataset, num_public: int, seed: int):
  """Splits `num_public` random training examples off as public data.

  Returns:
    (dataset without them, public features; their labels are dropped).
  """
  if num_public >= len(dataset.y_train):
    raise FedkdError(f'public_examples={num_public} leaves no training data: '
                     f'{dataset.name} has {len(dataset.y_train)} training '
                     'examples')
  order = np.random.default_rng([seed, 1]).permutation(len(dataset.y_train))
  public, train = order[:num_public], np.sort(order[num_public:])
  return (dataclasses.replace(dataset, x_train=dataset.x_train[train],
                              y_train=dataset.y_train[train]),
          dataset.x_train[public])


def load_data(config):
  """The dataset, its partition into clients and the public data."""
  if config.dataset == 'synthetic':
    dataset, parts = synthetic.synthetic(
        config.num_clients, alpha=config.synthetic_alpha,
        beta=config.synthetic_beta,
        max_examples=config.synthetic_max_examples, seed=config.seed)
    return dataset, parts, dataset.x_train[:0]
  dataset, public_x = _hold_out_public(
      data.load_dataset(config.dataset, config.data_dir or None),
      config.public_examples, config.seed)
  parts = partition.partition(
      dataset.y_train, config.num_clients, config.partition,
      alpha=config.alpha, shards_per_client=config.shards_per_client,
      seed=config.seed)
  return dataset, parts, public_x


def _partition_name(config) -> str:
  return 'natural' if config.dataset == 'synthetic' else config.partition


def run(config, workdir: str, *, progress: bool = True) -> list[dict]:
  """Trains as configured, writing results to `workdir` (see fedkd.workdir).

  Returns:
    The rows of metrics.jsonl, one per evaluated round.
  """
  validation.validate_processes(config)
  sharding.initialize_distributed(config.coordinator_address,
                                  config.num_processes, config.process_id)
  validation.validate_config(config)
  dataset, parts, public_x = load_data(config)
  validation.validate_workdir(workdir)
  setup = _setup(config, dataset, parts, public_x)
  work = workdir_lib.Workdir(workdir, config.to_dict(),
                             overwrite=config.overwrite)
  print(f'{_partition_name(config)} partition of {dataset.name}:')
  print(partition.describe(dataset.y_train, parts, dataset.num_classes))
  try:
    rows = _loop(setup, work, progress=progress)
  finally:
    work.close()
  print(format_table(rows))
  return rows
