"""Seconds per federated round: fedkd's vmapped round against per-client loops.

    python -m experiments.benchmark [--workload=mlp,cnn_fedavg,cnn_kd,resnet8,
        feddf_hetero]
        [--clients=...] [--rounds=...] [--epochs=E] [--torch_threads=1,2]
        [--clients_per_chunk=N] [--shard_data=false] [--population=N]

Workloads (E=1 unless `--epochs` says otherwise, B=10, 10 classes, SGD at
0.05, random data; local KD with T=2, w=0.5 and the teacher's SGD at 0.05):

  mlp         local KD, seed teacher -> seed student (MLPs), 50 examples of
              8x8x1 per client, 10, 100 and 1000 clients;
  cnn_fedavg  FedAvg of McMahan et al.'s CNN, 50 clients x 80 of 28x28x1;
  cnn_kd      local KD, teacher `mnist_cnn` -> student `mnist_2nn`, same data;
  resnet8     FedAvg of ResNet-8 with GroupNorm (FedDF's), 10 clients x 50
              of 32x32x3;
  feddf_hetero  FedDF with three architectures (client i trains
              seed_student, seed_teacher or mnist_2nn by i % 3), 300 clients
              x 50 of 8x8x1, 500 public examples (server: Adam 1e-3, one
              pass of batch 50); no PyTorch arm.
  mlp_ALG     every algorithm of fedkd (mlp_fedavg, mlp_fedprox, mlp_fedntd,
              mlp_local_kd, mlp_fedkd, mlp_feddf, mlp_fd, mlp_fedmd; all of
              them: `--workload=algorithms`), built by `experiments/builder`
              from `experiments/configs/default.py` as `experiments/main.py`
              builds it, with the settings above and the seed MLPs (the
              seed teacher as private teacher or mentor), 100 clients x 50
              of 8x8x1, 500 public examples for feddf and fedmd (labelled,
              as the CLI keeps them for those two; fedmd without its
              transfer learning, which precedes the rounds); no PyTorch arm.
  cnn_ALG     the same at cnn_fedavg's shape (cnn_fd, cnn_feddf, cnn_fedkd,
              cnn_fedmd, cnn_fedntd, cnn_fedprox; `--workload=cnn_algorithms`
              adds cnn_fedavg and cnn_kd for fedavg and local_kd):
              `mnist_cnn` is the shared model, or with local_kd and fedkd
              the private teacher (mentor) of a `mnist_2nn` student
              (`experiments.fedkd_cost` times cnn_fedkd beside FedAvg and
              local KD).

Each is run three ways in one process:

  (a) fedkd: one jitted call, the clients vmapped (in chunks as a run
             chunks them unless `--clients_per_chunk` says otherwise);
  (b) loop:  a Python loop over clients, each calling the same one-client
             update jitted for a single client (FedJAX's execution model;
             with several architectures, each one's update jitted once).
             Per-client state, keys and ids are prepared outside the timing;
  (c) torch: a plain PyTorch loop over clients on the CPU
             (`experiments/torch_baseline`), when torch is installed (the
             `bench` extra). On a GPU host (a) and (b) run on the GPU and (c)
             still on the CPU (labelled so); `--torch=false` skips it.

It prints, per workload, a table of the median seconds per round over
`--rounds` rounds (default: 5 for mlp, 3 for feddf_hetero and mlp_ALG, 1
for the conv workloads, so that everything runs in about 10 minutes on 2
CPU cores), the arms taking turns round by
round (so a slow spell of a shared machine slows them alike), the ratios
(b)/(a) and (c)/(a), and
achieved GFLOP/s of (a) against the matmul peak of device 0; then one JSON
line with every row (`--json_only`: only that line, which
`experiments/scaling.py` reads). Compilation is not timed: (a) is compiled
ahead of time (its compile seconds are reported), (b) first runs one client
and the server step, (c) one client. (a)'s first round is timed with whatever
a first execution costs once: a median over 3 or more rounds leaves that out,
and beside a CNN round it does not matter. (a) uses all visible devices, the
client examples split over them (`--shard_data=false`: copied to each) and
per-client state split as a run splits it; (b) and (c) one, (b) adding each
client's weighted upload to a running sum.
Every client trains every round, unless `--population` holds more clients
than `--clients`: the arms then train the same random cohort of them each
round, as runs with clients_per_round < num_clients do.
`--torch_threads` takes a list: (c) is timed with each thread count (each
an arm of its own, taking its turn) and the fastest is reported (on the
shared 2-core CPU, 1 thread, the default, was the faster for the MLP, 2 for
the conv workloads). Timings are noisy; only ratios measured side by side
in one run mean much.

FLOPs are those of (a)'s round, counted from its jaxpr (`round_flops`,
`experiments/flops.py`) and the same for every arm: every matmul and
convolution, a multiply-add being 2 FLOPs, kernel taps on padding not
counted (as XLA counts them), each local step and epoch counted as often as
it runs, padded client slots not counted. So each algorithm's own work
counts: FedDF's proxy logits and server distillation (and its validation
at every server step, where it runs every `distill_eval_every`: an upper
bound), FedMD's digest of the public data, FedNTD's global model, the
weighted mean of the uploads; FedKD's SVD approximately (its loop over
blocks of eigenvectors counted once); the table marks such guesses with ~
(the JSON row's `flops_exact`). Activations, norms, pooling, losses
and optimizer updates are left out: `tests/flops_test.py` checks that XLA's
cost analysis of one training step, lowered with XLA's own dot and
convolution ops, counts at most 10% more. XLA's count of the whole round
cannot be used: it visits each `lax.scan` body once, however many local
steps it runs (4.6 MFLOP for the 10-client mlp round, 20.4 counted here).
"""

from collections.abc import Callable, Sequence
import functools
import json
import math
import os
import resource
import statistics
import sys
import time
from typing import Any, NamedTuple

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

# pylint: disable=g-import-not-at-top,wrong-import-position
# The repository root, however the script is started.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import builder
from experiments import cli
from experiments import flops
from experiments.configs import default as default_config
from fedkd import algorithm
from fedkd import algorithms
from fedkd import clients
from fedkd import communication
from fedkd import metrics
from fedkd import models
from fedkd import npzfile
from fedkd import sharding
from fedkd import train
from fedkd.algorithms import fedavg
from fedkd.algorithms import feddf
from fedkd.algorithms import local_kd
from fedkd.errors import FedkdError
# pylint: enable=g-import-not-at-top,wrong-import-position


class Workload(NamedTuple):
  """One benchmarked round.

  Attributes:
    description: a line for the table's title.
    student: the shared model (`fedkd.models` name); several, comma
      separated, for FedDF with client groups (client i trains name i % k).
    teacher: each client's private teacher for local KD; None for FedAvg.
    input_shape: one example, channels last.
    clients: default cohort sizes.
    examples: examples per client.
    rounds: default timed rounds per arm.
    algorithm: an algorithm of `fedkd.algorithms`, built from the default
      run config; '' for the ones above (FedAvg, local KD, FedDF).
    epochs: local passes over each client's examples a round.
  """
  description: str
  student: str
  teacher: str | None
  input_shape: tuple[int, int, int]
  clients: tuple[int, ...]
  examples: int
  rounds: int
  algorithm: str = ''
  epochs: int = 1


def _cnn_algorithm(name: str) -> Workload:
  """Algorithm `name` at cnn_fedavg's shape: the CNN is the shared model,
  or the private teacher (mentor) of a 2NN where the algorithm has one."""
  if name in algorithms.PRIVATE_TEACHERS:
    return Workload(f'{name}, CNN teacher -> 2NN student', 'mnist_2nn',
                    'mnist_cnn', (28, 28, 1), (50,), 80, 1, name)
  return Workload(f'{name}, McMahan et al. CNN', 'mnist_cnn', None,
                  (28, 28, 1), (50,), 80, 1, name)


WORKLOADS = {
    'mlp': Workload('local KD, seed MLP teacher -> seed MLP student',
                    'seed_student', 'seed_teacher', (8, 8, 1),
                    (10, 100, 1000), 50, 5),
    'cnn_fedavg': Workload('FedAvg, McMahan et al. CNN', 'mnist_cnn', None,
                           (28, 28, 1), (50,), 80, 1),
    'cnn_kd': Workload('local KD, CNN teacher -> 2NN student', 'mnist_2nn',
                       'mnist_cnn', (28, 28, 1), (50,), 80, 1),
    'resnet8': Workload('FedAvg, ResNet-8 (GroupNorm)', 'resnet8_gn', None,
                        (32, 32, 3), (10,), 50, 1),
    'feddf_hetero': Workload(
        'FedDF, 3 architectures in one round', 'seed_student,seed_teacher,'
        'mnist_2nn', None, (8, 8, 1), (300,), 50, 3),
    **{f'mlp_{name}': Workload(
        f'{name}, seed MLPs', 'seed_student', 'seed_teacher'
        if name in algorithms.PRIVATE_TEACHERS else None, (8, 8, 1), (100,),
        50, 3, name) for name in algorithms.ALGORITHMS},
    **{f'cnn_{name}': _cnn_algorithm(name) for name in algorithms.ALGORITHMS
       if name not in ('fedavg', 'local_kd')},
}
# --workload names that stand for several workloads. cnn_fedavg and cnn_kd
# are the CNN family's fedavg and local_kd, built by hand for the PyTorch arm.
GROUPS = {
    'algorithms': [f'mlp_{name}' for name in algorithms.ALGORITHMS],
    'cnn_algorithms': [{'fedavg': 'cnn_fedavg', 'local_kd': 'cnn_kd'}.get(
        name, f'cnn_{name}') for name in algorithms.ALGORITHMS],
}
NUM_PUBLIC = 500

_WORKLOAD = flags.DEFINE_list(
    'workload', [w for w in WORKLOADS if not WORKLOADS[w].algorithm],
    f'Workloads to time, of {", ".join(WORKLOADS)}, or "algorithms" for '
    'every mlp_ALG, "cnn_algorithms" for every algorithm on the CNN.')
_CLIENTS = flags.DEFINE_list('clients', None, 'Cohort sizes to time, for '
                             'every workload (default: each its own).')
_POPULATION = flags.DEFINE_integer(
    'population', 0, 'Clients in the federation, each with its examples '
    '(and private teacher); every round trains a random cohort of --clients '
    'of them, as a run with clients_per_round < num_clients does (0: the '
    'cohort size, every client every round).', lower_bound=0)
_ROUNDS = flags.DEFINE_integer('rounds', None, 'Timed rounds per arm '
                               '(default: each workload its own).',
                               lower_bound=1)
_EPOCHS = flags.DEFINE_integer('epochs', None, 'Local epochs a round, for '
                               'every workload (default: each its own, 1).',
                               lower_bound=1)
_TORCH = flags.DEFINE_bool('torch', True, 'Time baseline (c) if torch is '
                           'installed.')
_LOOP = flags.DEFINE_bool('loop', True, 'Time baseline (b).')
_JSON_ONLY = flags.DEFINE_bool('json_only', False, 'Print only the JSON line '
                               '(used by experiments/scaling.py).')
_CHUNK = flags.DEFINE_integer(
    'clients_per_chunk', None, "(a)'s clients per chunk (the run config's "
    'clients_per_chunk, rounded up as a run rounds it; 0 = the whole cohort '
    'at once; unset: as a run chooses it, `sharding.auto_chunk`).',
    lower_bound=0)
_SHARD_DATA = flags.DEFINE_bool(
    'shard_data', True, "(a)'s client examples split by rows over the devices "
    "(the run config's shard_data; False copies them to every device).")
_TORCH_THREADS = flags.DEFINE_list(
    'torch_threads', ['1'], 'torch.set_num_threads values to time (c) with; '
    'the fastest is reported.')

NUM_CLASSES, BATCH = 10, 10
HPARAMS = dict(client_lr=0.05, teacher_lr=0.05, temperature=2.0,
               distill_weight=0.5)


_REWARM_S = 0.5


def median_seconds(arms: dict[Any, tuple[Callable[[], Any], Any]],
                   rounds: int) -> dict[Any, float]:
  """Median wall time of `rounds` calls of each arm's `one_round`, given as
  `{name: (one_round, warm_up or None)}`, after every `warm_up()`.

  The arms take turns, one round each, so that a slow spell of a shared
  machine slows them all alike and their ratios hold. (Timed one arm after
  the other, three runs of `--workload=cnn_fedavg` here gave (c)/(a) of 1.3x,
  1.6x and 2.0x.) Where an arm's first round took under `_REWARM_S`, each
  turn first runs one round untimed, in every arm alike: right after
  another arm's round, caches and idle threads are cold, which a short round
  feels (the 10-client mlp round, 1.3 ms back to back, took 3.4-4.9 ms right
  after a PyTorch round) and runs back to back do not.
  """
  for _, warm_up in arms.values():
    if warm_up:
      warm_up()
  times = {name: [] for name in arms}
  for _ in range(rounds):
    rewarm = any(t and t[0] < _REWARM_S for t in times.values())
    for name, (one_round, _) in arms.items():
      if rewarm:
        one_round()
      start = time.perf_counter()
      one_round()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def random_clients(workload: Workload, num_clients: int):
  """Every client's random examples: x [C, n, *input_shape], y [C, n]."""
  check_size(workload, num_clients)
  rng = np.random.default_rng(0)
  shape = (num_clients, workload.examples)
  x = rng.random((*shape, *workload.input_shape), np.float32)
  y = rng.integers(0, NUM_CLASSES, shape).astype(np.int32)
  return x, y


def check_size(workload: Workload, num_clients: int) -> None:
  """Fails unless `random_clients` fits in this machine's memory and a
  client's local steps in int32, as JAX counts a `lax.scan`'s length."""
  steps = clients.num_steps(workload.examples, epochs=workload.epochs,
                            batch_size=BATCH)
  if steps >= 2**31:
    raise FedkdError(f'--epochs={workload.epochs} makes {steps:,} local steps '
                     'a round; they must be < 2**31: lower --epochs')
  needed = (num_clients * workload.examples
            * (math.prod(workload.input_shape) + 1) * 4)  # float32, int32
  npzfile.check_memory(
      needed, f'{num_clients:,} clients x {workload.examples} random examples'
      f' of {"x".join(map(str, workload.input_shape))} need',
      'time fewer clients')


def _public(workload: Workload, labels: bool) -> dict:
  """NUM_PUBLIC random public examples (and labels), as `ClientData` fields."""
  rng = np.random.default_rng(1)
  public = dict(public_x=jnp.asarray(rng.random(
      (NUM_PUBLIC, *workload.input_shape), np.float32)))
  if labels:
    public['public_y'] = jnp.asarray(
        rng.integers(0, NUM_CLASSES, NUM_PUBLIC).astype(np.int32))
  return public


def _build_from_config(workload: Workload, num_clients: int, data):
  """(algorithm, state, data) of `workload.algorithm`, built from the
  default run config as `experiments/main.py` builds it."""
  config = default_config.get_config()
  config.update(dict(
      algorithm=workload.algorithm, student=workload.student,
      teacher=workload.teacher or config.teacher, num_clients=num_clients,
      clients_per_round=num_clients, local_epochs=workload.epochs,
      batch_size=BATCH,
      public_examples=NUM_PUBLIC, **HPARAMS,
      # FedMD's transfer learning runs once, in `init`, not in the rounds
      # timed here; at CNN size it would take minutes.
      fedmd_transfer_epochs=0, fedmd_private_epochs=0))
  built = builder.build(config, workload.input_shape, NUM_CLASSES, NUM_PUBLIC)
  if workload.algorithm in algorithms.PUBLIC_DATA:
    data = data.replace(**_public(workload, builder.public_labels(config)))
  params = built.init_params and jax.jit(built.init_params)(
      jax.random.PRNGKey(0))
  return (built.algorithm,
          jax.jit(built.init)(params, jax.random.PRNGKey(1), data), data)


def build(workload: Workload, num_clients: int):
  """The workload's algorithm, initial server state and stacked data."""
  x, y = random_clients(workload, num_clients)
  data = jax.tree.map(jnp.asarray, clients.stack_clients(
      x.reshape(-1, *workload.input_shape), y.reshape(-1),
      np.arange(x.shape[0] * x.shape[1]).reshape(x.shape[:2])))
  if workload.algorithm:
    return _build_from_config(workload, num_clients, data)
  modules = [models.get_model(n, NUM_CLASSES)
             for n in workload.student.split(',')]
  common = dict(client_tx=optax.sgd(HPARAMS['client_lr']),
                server_tx=optax.sgd(1.0), epochs=workload.epochs,
                batch_size=BATCH)
  if len(modules) > 1:
    alg = feddf(model=tuple(modules), distill_tx=optax.adam(1e-3),
                distill_epochs=1, public_batch_size=50, temperature=1.0,
                **common)
    data = data.replace(**_public(workload, labels=False))
  elif workload.teacher:
    alg = local_kd(
        teacher=models.get_model(workload.teacher, NUM_CLASSES),
        student=modules[0], input_shape=workload.input_shape,
        num_clients=num_clients, teacher_tx=optax.sgd(HPARAMS['teacher_lr']),
        temperature=HPARAMS['temperature'],
        distill_weight=HPARAMS['distill_weight'], **common)
  else:
    alg = fedavg(model=modules[0], **common)
  # Jitted: op-by-op initialisation of a ResNet takes minutes on 2 cores.
  params = algorithm.per_group([
      jax.jit(m.init)(jax.random.PRNGKey(0),
                      jnp.zeros((1, *workload.input_shape)))
      for m in modules])
  return alg, jax.jit(alg.init)(params, jax.random.PRNGKey(1)), data


def sampled_cohort(alg, num_clients: int, clients_per_round: int,
                   mesh, clients_per_chunk: int = 0):
  """(the round's cohort of `clients_per_round` of `num_clients` clients,
  clients per chunk), laid out as a run lays them out
  (`sharding.cohort_layout`: the cohort padded and `clients_per_chunk`
  rounded up to a multiple of the client groups times the devices); the
  same clients whatever the mesh."""
  groups = len(algorithm.groups_of(alg.client_update))
  size, chunk = sharding.cohort_layout(
      clients_per_round, mesh, clients_per_chunk,
      quota=clients.group_quota(num_clients, clients_per_round, groups)
      if groups > 1 else ())
  return clients.sample_cohort(np.random.default_rng(0), num_clients,
                               clients_per_round, size, groups), chunk


def client_step_bytes(workload: Workload) -> int:
  """`metrics.step_bytes` of a client of `workload`: one of its students,
  and its teacher where it has one."""
  example = jnp.zeros((1, *workload.input_shape))
  kinds = [workload.student.split(',')]
  if workload.teacher:
    kinds.append([workload.teacher])
  return metrics.step_bytes(
      [[(m, jax.eval_shape(m.init, jax.random.PRNGKey(0), example))
        for m in (models.get_model(n, NUM_CLASSES) for n in kind)]
       for kind in kinds],
      jax.ShapeDtypeStruct(workload.input_shape, jnp.float32), BATCH)


def compiled_round(alg, state, data, shard_data: bool = True,
                   clients_per_chunk: int | None = None,
                   clients_per_round: int = 0, step_bytes: int = 0):
  """(a)'s round compiled ahead of time for `sampled_cohort`'s
  `clients_per_round` clients of `data` (0: every client), sharded over all
  visible devices as a run shards it: per-client state split where its
  client count divides by the devices (`sharding.state_sharding`), the
  examples split by rows (`shard_data`) or copied to each. `step_bytes`
  (`client_step_bytes`) helps choose the chunks where `clients_per_chunk`
  is None.

  Returns:
    (run, compiled, compile seconds, clients per chunk; 0 = all at once):
    `run()` runs one round and waits for it; `compiled` is the
    `jax.stages.Compiled` round.
  """
  mesh = sharding.make_mesh()
  clients_per_round = clients_per_round or data.num_clients
  if clients_per_chunk is None:
    clients_per_chunk = sharding.auto_chunk(
        state, data.num_clients, clients_per_round, mesh, step_bytes)
  cohort, chunk = sampled_cohort(alg, data.num_clients, clients_per_round,
                                 mesh, clients_per_chunk)
  alg = algorithm.with_round(alg, clients_per_chunk=chunk)
  cohort = jax.device_put(cohort, sharding.cohort_sharding(mesh))
  # Placed as a run places them: per-client state split where it divides.
  state_shardings = sharding.state_sharding(state, mesh)
  state = jax.device_put(state, state_shardings)
  data = sharding.place_data(data, mesh, shard_data)
  rng = jax.random.PRNGKey(2)
  start = time.perf_counter()
  compiled = sharding.jit_round(
      alg.apply, mesh, state_shardings, sharding.data_sharding(data, mesh),
      donate_argnums=0).lower(state, data, cohort, rng).compile()
  compile_seconds = time.perf_counter() - start
  train.check_fits(compiled, mesh, 'in the round',
                   'time fewer clients or epochs, or fewer clients per chunk')
  carry = [jax.tree.map(jnp.copy, state)]  # the round donates its input

  def run():
    carry[0], _ = compiled(carry[0], data, cohort, rng)
    jax.block_until_ready(carry[0])

  return run, compiled, compile_seconds, chunk


def round_flops(alg, state, data, cohort) -> flops.Count:
  """Matmul and conv FLOPs (`experiments.flops.Count`) of a round of
  `cohort` (`sampled_cohort` on one device, all clients at once), traced on
  one device: the padded client slots that a round split over devices or
  chunks computes too are not counted. (Clients of several architectures
  get as many slots each as the most numerous, as in every round: there
  that padding counts.)"""
  mesh = sharding.make_mesh(1)
  alg = algorithm.with_round(alg, clients_per_chunk=0)
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                        (state, data, cohort, jax.random.PRNGKey(2)))
  return flops.of_jaxpr(
      sharding.jit_round(alg.apply, mesh).trace(*shapes).jaxpr)


def examples_mib_per_device(data, devices: int, shard_data: bool) -> float:
  """MiB of client examples (`x`, `y`) each device holds in (a)."""
  return (algorithm.tree_bytes((data.x, data.y))
          / (devices if shard_data else 1) / 2**20)


def loop_arm(alg, state, data, client_ids=None):
  """(b): a Python loop of single-client jitted updates, FedJAX style, each
  upload through the algorithm's aggregator chain as in the round, over
  `client_ids` (default: every client of `data`). Returns `median_seconds`'
  (one_round, warm_up)."""
  groups = algorithm.groups_of(alg.client_update)
  client_ids = [int(i) for i in (range(data.num_clients) if client_ids is None
                                 else client_ids)]
  group = [i % len(groups) for i in client_ids]
  encode = alg.aggregator.encode

  def encoded(update, server, *args):
    """One client's update, its upload through the algorithm's chain."""
    out = update(server, *args)
    upload, weight, _, _ = encode(out.upload, out.weight, communication.fixed(
        1, algorithm.tree_bytes(out.upload)), server.round)
    return out._replace(upload=upload, weight=weight)

  client_updates = [jax.jit(functools.partial(encoded, u)) for u in groups]

  @jax.jit
  def accumulate(acc, upload, weight):
    """A group's running (weighted sum of uploads, sum of weights), added to
    client by client as a loop simulator aggregates."""
    total, weights = acc
    return jax.tree.map(lambda t, u: t + weight.astype(u.dtype) * u, total,
                        upload), weights + weight

  means = jax.jit(alg.aggregator.reduce)
  server_update = jax.jit(alg.server_update)
  reduce_key, server_key = jax.random.split(jax.random.PRNGKey(3))
  # A loop simulator keeps each client's state and inputs apart, ready to use
  # (client i in row i // g of its group's state).
  stacked = state.clients if len(groups) > 1 else (state.clients,)
  states = [jax.tree.map(lambda s, i=i: s[i // len(groups)],
                         stacked[g] if stacked else ())
            for i, g in zip(client_ids, group)]
  state = state.replace(clients=())  # clients see the server state alone
  ids = [jnp.int32(i) for i in client_ids]
  sizes = [data.num_examples[i] for i in client_ids]
  keys = [jax.random.fold_in(jax.random.PRNGKey(2), i) for i in client_ids]
  carry = [state]
  zeros = []  # each group's empty (sums, weight), set by the warm-up

  def server_step(server, sums):
    mean = means(*zip(*sums), reduce_key)
    server, _ = server_update(server, algorithm.per_group(mean), data,
                              server_key)
    return jax.block_until_ready(server)

  def one_round():
    sums = list(zeros)
    for i, g in enumerate(group):
      out = client_updates[g](carry[0], states[i], data, ids[i], sizes[i],
                              keys[i])
      states[i] = out.state
      sums[g] = accumulate(sums[g], out.upload, out.weight)
    carry[0] = server_step(carry[0], sums)

  def warm_up():
    """Compiles every function: one client of each group, the server step."""
    outs = [client_updates[g](state, states[i], data, ids[i], sizes[i],
                              keys[i])
            for g, i in enumerate(map(group.index, range(len(groups))))]
    zeros[:] = [jax.tree.map(jnp.zeros_like, (o.upload, o.weight))
                for o in outs]
    server_step(state, [accumulate(z, o.upload, o.weight)
                        for z, o in zip(zeros, outs)])

  return one_round, warm_up


def torch_arm(workload: Workload, num_clients: int, threads: int):
  """(c): a plain PyTorch loop over clients on the CPU, on `threads` threads.
  Returns `median_seconds`' (one_round, warm_up)."""
  import torch  # pylint: disable=g-import-not-at-top
  from experiments import torch_baseline  # pylint: disable=g-import-not-at-top
  x, y = random_clients(workload, num_clients)
  x = np.moveaxis(x, -1, 2)  # channels first: [C, n, channels, h, w]
  builder = lambda name: lambda: torch_baseline.get_model(
      name, x.shape[2:], NUM_CLASSES)
  distillation = torch_baseline.Distillation(
      builder(workload.teacher), HPARAMS['teacher_lr'],
      HPARAMS['temperature'],
      HPARAMS['distill_weight']) if workload.teacher else None
  sim = torch_baseline.TorchFederated(
      list(x), list(y), builder(workload.student),
      client_lr=HPARAMS['client_lr'], epochs=workload.epochs,
      batch_size=BATCH,
      distillation=distillation, num_threads=threads)
  cohort = list(range(num_clients))

  def one_round(clients=cohort):
    torch.set_num_threads(threads)  # process-wide: other arms may change it
    sim.run_round(clients)

  # One client warms up torch's kernels (oneDNN primitives, allocator).
  return one_round, lambda: one_round(cohort[:1])


def _torch_installed() -> bool:
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def matmul_peak_gflop_s(size: int = 2048, repeats: int = 5) -> float:
  """Achieved GFLOP/s of one large float32 matmul on device 0: the machine's
  practical peak, against which the rounds' GFLOP/s are read."""
  a = jax.device_put(jnp.ones((size, size), jnp.float32), jax.devices()[0])
  matmul = jax.jit(lambda a: a @ a)
  run = lambda: matmul(a).block_until_ready()
  seconds = median_seconds({'matmul': (run, run)}, repeats)['matmul']
  return 2 * size**3 / seconds / 1e9


def benchmark(name: str, workload: Workload, num_clients: int, *,
              rounds: int, peak: float, loop: bool,
              torch_threads: Sequence[int],
              clients_per_chunk: int | None = None,
              shard_data: bool = True, population: int = 0) -> dict:
  """Times the arms of `workload`; returns its JSON row.

  Args:
    name: the workload's name, for the row.
    workload: what to time.
    num_clients: cohort size.
    rounds: timed rounds per arm, the arms taking turns (`median_seconds`).
    peak: the matmul peak in GFLOP/s, for the row.
    loop: whether to time (b).
    torch_threads: thread counts to time (c) with, if torch is installed;
      empty skips (c).
    clients_per_chunk: (a)'s clients per chunk, rounded up as
      `compiled_round` says; 0 = all at once; None = as a run chooses it
      (`sharding.auto_chunk`). The row has the one used.
    shard_data: (a)'s client examples split over the devices, or copied.
    population: clients in the federation, of which each round trains the
      same random `num_clients` in every arm ((c) trains as many, on data of
      the same shape); at most `num_clients` (the default) trains them all.
  """
  population = max(population, num_clients)
  alg, state, data = build(workload, population)
  # Compiled ahead of time: no warm-up needed, the first round is timed too.
  run, _, compile_s, chunk = compiled_round(
      alg, state, data, shard_data, clients_per_chunk, num_clients,
      client_step_bytes(workload))
  arms = {'vmapped': (run, None)}
  cohort, _ = sampled_cohort(alg, population, num_clients,
                             sharding.make_mesh(1))
  # Counted before the timing, which an uncountable round would waste.
  counted = round_flops(alg, state, data, cohort)
  gflops = counted.flops / 1e9
  if loop:
    arms['loop'] = loop_arm(
        alg, jax.device_put(state, jax.devices()[0]),
        jax.device_put(data, jax.devices()[0]),
        cohort.client_ids[cohort.client_mask])
  # The PyTorch loop has FedAvg and local KD only.
  if (torch_threads and _torch_installed() and ',' not in workload.student
      and not workload.algorithm):
    arms.update({threads: torch_arm(workload, num_clients, threads)
                 for threads in torch_threads})
  seconds = median_seconds(arms, rounds)
  vmapped, looped = seconds.pop('vmapped'), seconds.pop('loop', None)
  torch_by_threads = seconds
  torch_s = min(torch_by_threads.values(), default=None)
  return dict(
      workload=name, clients=num_clients, population=population,
      devices=jax.device_count(),
      clients_per_chunk=chunk, shard_data=shard_data,
      examples_mib_per_device=examples_mib_per_device(
          data, jax.device_count(), shard_data),
      backend=jax.default_backend(), rounds=rounds, epochs=workload.epochs,
      vmapped_s=vmapped,
      compile_s=compile_s, clients_per_s=num_clients / vmapped,
      loop_s=looped or None, torch_s=torch_s,
      torch_threads=min(torch_by_threads, key=torch_by_threads.get,
                        default=None),
      torch_s_by_threads=torch_by_threads,
      loop_over_vmapped=looped and looped / vmapped,
      torch_over_vmapped=torch_s and torch_s / vmapped,
      gflops_per_round=gflops, vmapped_gflop_s=gflops / vmapped,
      flops_exact=counted.exact,
      matmul_peak_gflop_s=peak,
      # ru_maxrss is in KiB on Linux; the peak so far in this process.
      peak_host_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
      / 1024)


def markdown_table(rows: list[dict]) -> str:
  """One workload's rows as a markdown table."""
  lines = ['| clients | (a) vmapped s | compile s | (b) loop s | (c) torch s '
           '| (b)/(a) | (c)/(a) | GFLOP/round | GFLOP/s (a) | % of peak |',
           '| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: '
           '| ---: |']
  # Two decimals: 1.46x must not print as the 1.5x it falls short of.
  ratio = lambda x: f'{x:.2f}x' if x else '-'
  for r in rows:
    about = '' if r['flops_exact'] else '~'  # `experiments.flops.Count`
    loop_s = f'{r["loop_s"]:.4f}' if r['loop_s'] else '-'
    torch_s = (f'{r["torch_s"]:.4f} ({r["torch_threads"]}t)' if r['torch_s']
               else '-')
    lines.append(
        f'| {r["clients"]} | {r["vmapped_s"]:.4f} | {r["compile_s"]:.2f} | '
        f'{loop_s} | {torch_s} | '
        f'{ratio(r["loop_over_vmapped"])} | {ratio(r["torch_over_vmapped"])} '
        f'| {about}{r["gflops_per_round"]:.2f} | '
        f'{about}{r["vmapped_gflop_s"]:.1f} | {about}'
        f'{100 * r["vmapped_gflop_s"] / r["matmul_peak_gflop_s"]:.1f}% |')
  return '\n'.join(lines)


def check_workloads(names: Sequence[str]) -> list[str]:
  """The workloads `names` stand for (`GROUPS` expanded, each once, in
  order); fails before timing anything if a workload or one of its models
  is unknown."""
  names = list(dict.fromkeys(w for name in names
                             for w in GROUPS.get(name, [name])))
  unknown = set(names) - set(WORKLOADS)
  if unknown or not names:
    problem = (f'unknown workloads {sorted(unknown)}' if unknown
               else '--workload names none')
    raise FedkdError(f'{problem}; choose from {", ".join(WORKLOADS)}')
  for name in names:
    workload = WORKLOADS[name]
    for model in filter(None, [*workload.student.split(','),
                               workload.teacher]):
      models.get_model(model, NUM_CLASSES)
  return names


def planned_runs(names: Sequence[str]) -> list[tuple[str, Workload,
                                                     list[int]]]:
  """(name, workload, cohort sizes) of each workload `names` stand for, with
  `--epochs` and `--clients` applied; fails before timing anything on an
  unknown workload or a setting that cannot run (`check_size`)."""
  runs = []
  for name in check_workloads(names):
    workload = WORKLOADS[name]._replace(
        epochs=_EPOCHS.value or WORKLOADS[name].epochs)
    sizes = (workload.clients if _CLIENTS.value is None
             else cli.positive_ints('clients', _CLIENTS.value))
    for size in sizes:
      check_size(workload, max(size, _POPULATION.value))
    runs.append((name, workload, sizes))
  return runs


def main(argv):
  del argv
  runs = planned_runs(_WORKLOAD.value)
  torch_threads = cli.positive_ints('torch_threads', _TORCH_THREADS.value)
  # More threads only oversubscribe the cores; 10**5 fail to start.
  if max(torch_threads) > os.cpu_count():
    raise FedkdError(f'--torch_threads={",".join(_TORCH_THREADS.value)}: at '
                     f'most the {os.cpu_count()} CPU cores')
  peak = matmul_peak_gflop_s()
  if not _TORCH.value:
    torch_note = '(c) not timed (--torch=false)'
  elif not _torch_installed():
    torch_note = ("(c) not timed: torch is not installed (pip install -e "
                  "'.[bench]')")
  else:
    torch_note = '(c) torch on the CPU'
  if not _JSON_ONLY.value:
    print(f'backend: {jax.default_backend()}, devices: {jax.device_count()} '
          f'x {jax.devices()[0].device_kind}; {torch_note}; matmul '
          f'peak (2048^3 float32 on one device): {peak:.1f} GFLOP/s')
  results = []
  for name, workload, sizes in runs:
    rows = [benchmark(name, workload, num_clients,
                      rounds=_ROUNDS.value or workload.rounds, peak=peak,
                      loop=_LOOP.value,
                      torch_threads=torch_threads if _TORCH.value else [],
                      clients_per_chunk=_CHUNK.value,
                      shard_data=_SHARD_DATA.value,
                      population=_POPULATION.value)
            for num_clients in sizes]
    results += rows
    if not _JSON_ONLY.value:
      print(f'\n{name}: {workload.description}, {workload.examples} '
            f'examples of {"x".join(map(str, workload.input_shape))} per '
            f'client, E={workload.epochs}, B={BATCH}; median of '
            f'{rows[0]["rounds"]} round(s); (a)\'s clients per chunk: '
            + ', '.join(
                f'{r["clients_per_chunk"] or "all"} of {r["clients"]}'
                for r in rows) + '\n')
      print(markdown_table(rows), flush=True)
  print(json.dumps(results))


if __name__ == '__main__':
  cli.run(main)
