"""The host loop: data, partition, algorithm, one jitted round per step.

`run(config, workdir)` is everything `experiments/main.py` does after parsing
flags. It validates all input before writing anything to `workdir`.
"""

import json
import os
import time

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
from fedkd import sharding
from fedkd import validation
from fedkd.errors import FedkdError

# Columns of the final table: (metrics.jsonl key, header, format).
_TABLE = (('round', 'round', '{:d}'),
          ('student_accuracy', 'student acc', '{:.4f}'),
          ('student_loss', 'student loss', '{:.4f}'),
          ('teacher_accuracy', 'teacher acc', '{:.4f}'),
          ('upload_bytes', 'upload MB', '{:.3f}'),
          ('cumulative_bytes', 'total MB', '{:.3f}'),
          ('round_seconds', 'round s', '{:.4f}'))
_MB = ('upload_bytes', 'cumulative_bytes')


def _format_table(rows) -> str:
  header = ' | '.join(h for _, h, _ in _TABLE)
  lines = [header, '-' * len(header)]
  for row in rows:
    cells = []
    for key, head, fmt in _TABLE:
      value = row.get(key)
      if key in _MB:
        value = value / 1e6
      cells.append(('-' if value is None else fmt.format(value)).rjust(
          len(head)))
    lines.append(' | '.join(cells))
  return '\n'.join(lines)


def _write_json(path: str, obj) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _hold_out_public(dataset: data.Dataset, num_public: int, seed: int):
  """Splits `num_public` random training examples off as public data.

  Returns:
    (x_train, y_train, public_x): the rest of the training set and the
    public features (their labels are dropped).
  """
  if num_public >= len(dataset.y_train):
    raise FedkdError(f'public_examples={num_public} leaves no training data: '
                     f'{dataset.name} has {len(dataset.y_train)} training '
                     'examples')
  order = np.random.default_rng([seed, 1]).permutation(len(dataset.y_train))
  public, train = order[:num_public], np.sort(order[num_public:])
  return (dataset.x_train[train], dataset.y_train[train],
          dataset.x_train[public])


def run(config, workdir: str, *, progress: bool = True) -> list[dict]:
  """Trains as configured, writing metrics.jsonl and config.json to workdir.

  Returns:
    The rows written to metrics.jsonl, one per evaluated round.
  """
  validation.validate_config(config)
  dataset = data.load_dataset(config.dataset, config.data_dir or None)
  x_train, y_train, public_x = _hold_out_public(
      dataset, config.public_examples, config.seed)
  parts = partition.partition(
      y_train, config.num_clients, config.partition,
      alpha=config.alpha, shards_per_client=config.shards_per_client,
      seed=config.seed)
  mesh = sharding.make_mesh(config.num_devices)
  validation.validate_workdir(workdir)
  print(f'{config.partition} partition of {dataset.name}:')
  print(partition.describe(y_train, parts, dataset.num_classes))

  input_shape = dataset.x_train.shape[1:]
  built = algorithms.build(config, input_shape, dataset.num_classes,
                           len(public_x))
  alg, student, teacher = built.algorithm, built.student, built.teacher
  key = jax.random.PRNGKey(config.seed)
  replicated = sharding.replicated(mesh)
  cohort_sharding = sharding.cohort_sharding(mesh)
  client_data = jax.device_put(
      clients.stack_clients(x_train, y_train, parts).replace(
          public_x=public_x), replicated)
  # fd and fedmd have no global model to initialise.
  params = student and student.init(jax.random.fold_in(key, 0),
                                    jnp.zeros((1, *input_shape)))
  state = jax.device_put(
      jax.jit(alg.init)(params, jax.random.fold_in(key, 1)), replicated)

  cohort_size, chunk = sharding.cohort_layout(
      config.clients_per_round, mesh, config.clients_per_chunk)

  def cohort_for(round_index):
    rng = np.random.default_rng([config.seed, round_index])
    return jax.device_put(
        clients.sample_cohort(rng, config.num_clients,
                              config.clients_per_round, cohort_size),
        cohort_sharding)

  round_key = jax.random.fold_in(key, 2)
  start = time.perf_counter()
  round_fn = algorithm.make_round(alg.client_update, alg.server_update,
                                  clients_per_chunk=chunk)
  apply = jax.jit(
      round_fn, donate_argnums=0,
      in_shardings=(replicated, replicated, cohort_sharding, replicated),
      out_shardings=replicated).lower(
          state, client_data, cohort_for(0), round_key).compile()
  compile_seconds = time.perf_counter() - start

  x_test, y_test = jnp.asarray(dataset.x_test), jnp.asarray(dataset.y_test)
  eval_kw = dict(batch_size=min(config.eval_batch_size, len(dataset.y_test)))
  eval_student = student and jax.jit(lambda p: metrics_lib.evaluate(
      student, p, x_test, y_test, **eval_kw))
  num_eval_teachers = min(config.eval_teachers, config.num_clients)
  eval_teachers = teacher and num_eval_teachers and jax.jit(
      lambda stacked: clients.map_clients(lambda p: metrics_lib.evaluate(
          teacher, p, x_test, y_test, **eval_kw))(stacked))

  _write_json(os.path.join(workdir, 'config.json'), config.to_dict())
  rows, cumulative = [], {'upload_bytes': 0, 'download_bytes': 0}
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  with open(metrics_path, 'w') as out, tqdm.trange(
      config.num_rounds, desc='rounds', disable=not progress) as bar:
    for r in bar:
      start = time.perf_counter()
      state, m = apply(state, client_data, cohort_for(r),
                       jax.random.fold_in(round_key, r))
      m = jax.device_get(m)
      round_seconds = time.perf_counter() - start
      for direction in cumulative:
        cumulative[direction] += int(m[direction])
      if (r + 1) % config.eval_every and r + 1 != config.num_rounds:
        continue
      row = {'round': r + 1, 'student_accuracy': None, 'student_loss': None,
             'teacher_accuracy': None,
             'upload_bytes': int(m['upload_bytes']),
             'download_bytes': int(m['download_bytes']),
             'cumulative_upload_bytes': cumulative['upload_bytes'],
             'cumulative_download_bytes': cumulative['download_bytes'],
             'cumulative_bytes': sum(cumulative.values()),
             'clients': int(m['clients']),
             'round_seconds': round_seconds,
             'compile_seconds': compile_seconds}
      if eval_student:
        loss, acc = jax.device_get(eval_student(built.global_params(state)))
        row.update(student_accuracy=float(acc), student_loss=float(loss))
      if 'server_distill_loss' in m:
        row['server_distill_loss'] = float(m['server_distill_loss'])
      examples = max(float(m['train_examples']), 1.0)
      for name in ('student', 'teacher'):
        if f'{name}_loss_sum' in m:
          row[f'{name}_train_loss'] = float(m[f'{name}_loss_sum']) / examples
      if eval_teachers:
        teacher_params = jax.tree.map(lambda t: t[:num_eval_teachers],
                                      built.teachers(state))
        _, teacher_acc = eval_teachers(teacher_params)
        row['teacher_accuracy'] = float(jnp.mean(teacher_acc))
      # The headline: the global model, or the clients' own models without one.
      row['accuracy'] = row['student_accuracy'] if student else row[
          'teacher_accuracy']
      out.write(json.dumps(row) + '\n')
      out.flush()
      rows.append(row)
      bar.set_postfix(accuracy=f'{row["accuracy"]:.3f}')
  print(_format_table(rows))
  return rows
