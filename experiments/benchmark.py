"""Seconds per federated round: fedkd's vmapped round against per-client loops.

    python -m experiments.benchmark [--clients=10,100,1000] [--rounds=5]

On CPU, splitting the cores into several XLA devices lets (a) shard the cohort
over a `clients` mesh and run the shards in parallel:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 \
        python -m experiments.benchmark

For each cohort size, the same local-KD round (seed teacher and student, 50
examples of 8x8x1 per client, E=1, B=10, 10 classes) is run by

  (a) fedkd: one jitted call, all clients vmapped;
  (b) loop:  a Python loop over clients, each calling the same one-client
             update jitted for a single client (FedJAX's execution model).
             Per-client state, keys and ids are prepared outside the timing;
  (c) torch: a plain PyTorch loop over clients (`experiments/torch_baseline`),
             when torch is installed (the `bench` extra).

It prints the median seconds per round over `--rounds` rounds after a warm-up
round (compile time separately), the ratios, achieved GFLOP/s of (a) (the
matmul FLOPs of the round, counted from the layer shapes: the same work for
every arm) and one JSON line. (a) uses all visible devices; (b) and (c) one.
Timings are noisy; only ratios measured side by side in one run mean much.
"""

import json
import resource
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedkd import algorithm
from fedkd import clients
from fedkd import models
from fedkd import sharding
from fedkd.algorithms import local_kd

_CLIENTS = flags.DEFINE_list('clients', ['10', '100', '1000'],
                             'Cohort sizes to time.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Timed rounds per arm.')
_EXAMPLES = flags.DEFINE_integer('examples', 50, 'Examples per client.')
_TORCH = flags.DEFINE_bool('torch', True, 'Time baseline (c) if torch is '
                           'installed.')
_LOOP = flags.DEFINE_bool('loop', True, 'Time baseline (b).')
_JSON_ONLY = flags.DEFINE_bool('json_only', False, 'Print only the JSON line '
                               '(used by experiments/scaling.py).')
_TORCH_THREADS = flags.DEFINE_integer(
    'torch_threads', 1, 'torch.set_num_threads for (c); 1 is fastest here '
    'for these small models.')

INPUT_SHAPE, NUM_CLASSES, EPOCHS, BATCH = (8, 8, 1), 10, 1, 10
HPARAMS = dict(client_lr=0.05, teacher_lr=0.05, temperature=2.0,
               distill_weight=0.5)


def _median_seconds(fn, rounds):
  fn()  # warm-up
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _setup(num_clients):
  rng = np.random.default_rng(0)
  n = _EXAMPLES.value
  x = rng.random((num_clients, n, *INPUT_SHAPE), np.float32)
  y = rng.integers(0, NUM_CLASSES, (num_clients, n)).astype(np.int32)
  data = jax.tree.map(jnp.asarray, clients.stack_clients(
      x.reshape(-1, *INPUT_SHAPE), y.reshape(-1),
      np.arange(num_clients * n).reshape(num_clients, n)))
  student = models.get_model('seed_student', NUM_CLASSES)
  alg = local_kd(
      teacher=models.get_model('seed_teacher', NUM_CLASSES), student=student,
      input_shape=INPUT_SHAPE, num_clients=num_clients,
      client_tx=optax.sgd(HPARAMS['client_lr']),
      teacher_tx=optax.sgd(HPARAMS['teacher_lr']), server_tx=optax.sgd(1.0),
      epochs=EPOCHS, batch_size=BATCH,
      temperature=HPARAMS['temperature'],
      distill_weight=HPARAMS['distill_weight'])
  params = student.init(jax.random.PRNGKey(0), jnp.zeros((1, *INPUT_SHAPE)))
  state = alg.init(params, jax.random.PRNGKey(1))
  return alg, state, data, (x, y)


def _matmul_flops(params, train: bool) -> int:
  """FLOPs of one example through an MLP: forward, plus backward if `train`.

  Per [in, out] kernel: 2*in*out forward, 2*in*out for its gradient and
  2*in*out for the input gradient, which the first layer does not need.
  """
  kernels = [p for p in jax.tree.leaves(params) if p.ndim == 2]
  forward = sum(2 * k.size for k in kernels)
  return forward if not train else 2 * forward + forward - 2 * kernels[0].size


def round_flops(state, num_clients) -> float:
  """Matmul FLOPs of one local-KD round of the benchmark's cohort."""
  teacher = jax.tree.map(lambda t: t[0], state.clients[0])
  per_example = (_matmul_flops(teacher, train=True) +
                 _matmul_flops(state.params, train=True))
  return float(per_example * _EXAMPLES.value * EPOCHS * num_clients)


def time_vmapped(alg, state, data, rounds):
  """(a): returns (seconds per round, compile seconds), sharded over all
  visible devices."""
  mesh = sharding.make_mesh()
  rep, split = sharding.replicated(mesh), sharding.cohort_sharding(mesh)
  k = data.num_clients
  size, _ = sharding.cohort_layout(k, mesh)
  cohort = jax.device_put(clients.Cohort(
      client_ids=jnp.where(jnp.arange(size) < k, jnp.arange(size), k),
      client_mask=jnp.arange(size) < k), split)
  state, data = jax.device_put((state, data), rep)
  rng = jax.random.PRNGKey(2)
  start = time.perf_counter()
  compiled = jax.jit(
      alg.apply, donate_argnums=0, in_shardings=(rep, rep, split, rep),
      out_shardings=rep).lower(state, data, cohort, rng).compile()
  compile_seconds = time.perf_counter() - start
  carry = [jax.tree.map(jnp.copy, state)]  # the round donates its input

  def one_round():
    carry[0], _ = compiled(carry[0], data, cohort, rng)
    jax.block_until_ready(carry[0])

  return _median_seconds(one_round, rounds), compile_seconds


def time_loop(alg, state, data, rounds):
  """(b): a Python loop of single-client jitted updates, FedJAX style."""
  k = data.num_clients
  client_update = jax.jit(alg.client_update)
  mean = jax.jit(lambda uploads, w: jax.tree.map(
      lambda u: jnp.tensordot(w, u, axes=1) / jnp.sum(w), uploads))
  server_update = jax.jit(alg.server_update)
  server_key = jax.random.PRNGKey(3)
  # A loop simulator keeps each client's state and inputs apart, ready to use.
  states = [jax.tree.map(lambda s, i=i: s[i], state.clients) for i in range(k)]
  state = state.replace(clients=())  # clients see the server state alone
  ids = [jnp.int32(i) for i in range(k)]
  sizes = [data.num_examples[i] for i in range(k)]
  keys = [jax.random.fold_in(jax.random.PRNGKey(2), i) for i in range(k)]
  carry = [state]

  def one_round():
    server = carry[0]
    uploads, weights = [], []
    for i in range(k):
      out = client_update(server, states[i], data, ids[i], sizes[i], keys[i])
      states[i] = out.state
      uploads.append(out.upload)
      weights.append(out.weight)
    stacked = jax.tree.map(lambda *u: jnp.stack(u), *uploads)
    carry[0], _ = server_update(server, mean(stacked, jnp.stack(weights)),
                                data, server_key)
    jax.block_until_ready(carry[0])

  return _median_seconds(one_round, rounds)


def time_torch(arrays, rounds):
  """(c): plain PyTorch loop over clients, or None without torch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return None
  from experiments import torch_baseline  # pylint: disable=g-import-not-at-top
  x, y = arrays
  sim = torch_baseline.TorchLocalKD(
      list(x), list(y.astype(np.int64)), NUM_CLASSES, epochs=EPOCHS,
      batch_size=BATCH, num_threads=_TORCH_THREADS.value, **HPARAMS)
  cohort = list(range(len(x)))
  return _median_seconds(lambda: sim.run_round(cohort), rounds)


def matmul_peak_gflop_s(size: int = 2048, repeats: int = 5) -> float:
  """Achieved GFLOP/s of one large float32 matmul on device 0: the machine's
  practical peak, against which the rounds' GFLOP/s are read."""
  a = jax.device_put(jnp.ones((size, size), jnp.float32), jax.devices()[0])
  matmul = jax.jit(lambda a: a @ a)
  seconds = _median_seconds(lambda: matmul(a).block_until_ready(), repeats)
  return 2 * size**3 / seconds / 1e9


def main(argv):
  del argv
  if not _JSON_ONLY.value:
    print(f'backend: {jax.default_backend()}, devices: {jax.device_count()} '
          f'x {jax.devices()[0].device_kind}')
  peak = matmul_peak_gflop_s()
  results = []
  for num_clients in map(int, _CLIENTS.value):
    alg, state, data, arrays = _setup(num_clients)
    vmapped, compile_s = time_vmapped(alg, state, data, _ROUNDS.value)
    flops = round_flops(state, num_clients)
    looped = _LOOP.value and time_loop(
        alg, jax.device_put(state, jax.devices()[0]),
        jax.device_put(data, jax.devices()[0]), _ROUNDS.value)
    torch_s = (time_torch(arrays, _ROUNDS.value) if _TORCH.value else None)
    results.append(dict(
        clients=num_clients, devices=jax.device_count(), vmapped_s=vmapped,
        compile_s=compile_s, clients_per_s=num_clients / vmapped,
        loop_s=looped or None, torch_s=torch_s,
        loop_over_vmapped=looped and looped / vmapped,
        torch_over_vmapped=torch_s and torch_s / vmapped,
        gflops_per_round=flops / 1e9, vmapped_gflop_s=flops / 1e9 / vmapped,
        matmul_peak_gflop_s=peak,
        # ru_maxrss is in KiB on Linux; the peak so far in this process.
        peak_host_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        / 1024))
  if _JSON_ONLY.value:
    print(json.dumps(results))
    return
  print(f'matmul peak (2048^3 float32 on one device): {peak:.1f} GFLOP/s')
  header = ('clients | vmapped s | compile s | loop s | torch s | loop/vmapped'
            ' | torch/vmapped | GFLOP/s (a)')
  print(header)
  print('-' * len(header))
  for r in results:
    loop_s, loop_x = ((f'{r["loop_s"]:.4f}', f'{r["loop_over_vmapped"]:.1f}x')
                      if r['loop_s'] else ('-', '-'))
    torch_s, torch_x = (
        (f'{r["torch_s"]:.4f}', f'{r["torch_over_vmapped"]:.1f}x')
        if r['torch_s'] else ('-', '-'))
    print(f'{r["clients"]:7d} | {r["vmapped_s"]:9.4f} | {r["compile_s"]:9.2f}'
          f' | {loop_s:>6} | {torch_s:>7} | {loop_x:>12} | {torch_x:>13} | '
          f'{r["vmapped_gflop_s"]:11.2f}')
  print(json.dumps(results))


if __name__ == '__main__':
  app.run(main)
