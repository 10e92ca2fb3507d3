"""The device mesh: one axis, `clients`, over which cohorts are split."""

from collections.abc import Sequence
import functools
import threading

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from fedkd import algorithm
from fedkd import stopping
from fedkd.clients import CLIENTS_AXIS, ClientData
from fedkd.errors import FedkdError


def initialize_distributed(coordinator_address: str, num_processes: int,
                           process_id: int, timeout_s: float = 300) -> None:
  """Joins a multi-process (multi-host) run; call before any other JAX use.

  Each process then sees every process's devices in `jax.devices()`, and the
  `clients` mesh spans them all: each process computes its devices' share of
  the cohort, and the weighted mean over clients becomes a cross-process
  reduction.

  If the coordinator cannot be reached, or not every process joins, within
  `timeout_s`, the process ends with one `error:` line and exit code 2. (At
  its own deadline XLA aborts the process with a stack trace, which Python
  cannot catch, so a timer here comes first.)
  """
  if num_processes == 1:
    return
  # CPU processes need an explicit collectives backend to reduce across.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  timer = threading.Timer(timeout_s, stopping.exit_now, args=(
      f'error: the {num_processes} processes did not all join within '
      f'coordinator_timeout={timeout_s:g} s (this is process {process_id}, '
      f'coordinator_address={coordinator_address}); start every process, '
      'check the address and that process 0 runs there, or raise '
      'coordinator_timeout', 2))
  timer.daemon = True
  timer.start()
  try:
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes,
        process_id=process_id, initialization_timeout=int(timeout_s) + 60)
  finally:
    timer.cancel()


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh over the first `num_devices` devices (0 means all of them)."""
  if not jax.config.jax_threefry_partitionable:
    # Its default since JAX 0.5; off, random bits depend on the sharding.
    raise FedkdError('jax_threefry_partitionable is off, so a sharded run '
                     'would draw other random numbers than an unsharded one; '
                     'leave it at its default (True)')
  devices = jax.devices()
  if num_devices > len(devices):
    raise FedkdError(f'num_devices={num_devices} but only {len(devices)} '
                     'devices are visible; lower num_devices (0 = all)')
  return Mesh(devices[:num_devices or len(devices)], (CLIENTS_AXIS,))


def device_split_hint(backend: str, devices: int, cores: int) -> str:
  """A line suggesting one XLA device per core where a CPU run has all its
  cores in one device; '' otherwise.

  On CPU, XLA runs most of a round's ops one after another, each on one
  core: with a device per core each device trains its own clients (README,
  Speed: conv rounds 1.3x, the default run's and 1000 MLP clients' 1.5x
  faster; a 10-client MLP round a millisecond slower).
  """
  if backend != 'cpu' or devices != 1 or cores < 2:
    return ''
  return (f'note: the {cores} CPU cores run as one XLA device; '
          f'XLA_FLAGS=--xla_force_host_platform_device_count={cores} makes '
          'a device of each, for faster rounds of conv models and large '
          'cohorts (README, Speed)')


def cohort_sharding(mesh: Mesh) -> NamedSharding:
  """Client-stacked arrays: split along their leading axis."""
  return NamedSharding(mesh, P(CLIENTS_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Server state and shared data: a full copy on every device."""
  return NamedSharding(mesh, P())


def state_sharding(state, mesh: Mesh):
  """Shardings for a `ServerState`: per-client state split, the rest copied.

  The stacked per-client state ([num_clients, ...], e.g. 10,000 private
  teachers) is split over the `clients` axis where the client count (of
  its client group) divides evenly by the device count, so each device holds
  its share; otherwise it is replicated like the server's model.
  """
  rep = replicated(mesh)
  clients = jax.tree.map(
      lambda x: cohort_sharding(mesh) if x.shape[0] % mesh.size == 0 else rep,
      state.clients)
  return jax.tree.map(lambda _: rep, state.replace(clients=())).replace(
      clients=clients)


def data_sharding(data: ClientData, mesh: Mesh) -> ClientData:
  """Shardings for `ClientData`: the examples (`x`, `y`) split by rows over
  the `clients` axis where `data.split_rows`, else copied to every device;
  the rest (offsets, sizes, public data) replicated."""
  rep = replicated(mesh)
  rows = cohort_sharding(mesh) if data.split_rows else rep
  return jax.tree.map(lambda _: rep, data).replace(x=rows, y=rows)


def place_data(data: ClientData, mesh: Mesh,
               split: bool = True) -> ClientData:
  """`data` (numpy leaves) on `mesh`, its examples split by rows over the
  devices (`split`, on more than one device) or copied to each.

  Split, each device holds 1/D of the examples (rows padded with zeros, which
  no client owns, to a multiple of D). Rows are not aligned with clients:
  the round gathers its cohort's rows once (`ClientData.cohort_rows`, by
  `clients.take_rows`: each device receives its own slots' rows), after
  which every local step reads the rows of the client it trains on its own
  device. Copied, clients read each step's batch from the flat arrays, as
  on one device (faster where every device has room for all the data).
  """
  split = split and mesh.size > 1
  if split:  # copied examples are placed as they are, without a host copy
    pad = -len(data.y) % mesh.size
    padded = lambda a: np.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
    data = data.replace(x=padded(np.asarray(data.x)),
                        y=padded(np.asarray(data.y)))
  data = data.replace(split_rows=split)
  return jax.device_put(data, data_sharding(data, mesh))


def jit_round(apply, mesh: Mesh, state_shardings=None, data_shardings=None,
              **jit_options):
  """A round `apply(state, data, cohort, rng)` jitted for `mesh`: the cohort
  split over the `clients` axis, the state as `state_shardings` (default
  replicated; `state_sharding` splits per-client state), the client data as
  `data_shardings` (default replicated; `data_sharding` for `place_data`), rng
  and metrics replicated. `jit_options` go to `jax.jit` (`donate_argnums`);
  on CPU, with `_CPU_ROUND_OPTIONS` among its `compiler_options`.
  `apply` is traced with `mesh` set, so `clients.take_rows` gathers the
  cohort's split rows by reduce-scatter."""
  rep = replicated(mesh)
  state_shardings = rep if state_shardings is None else state_shardings
  data_shardings = rep if data_shardings is None else data_shardings
  if mesh.devices.flat[0].platform == 'cpu':
    jit_options['compiler_options'] = dict(
        _CPU_ROUND_OPTIONS, **jit_options.get('compiler_options', {}))
  return jax.jit(_on_mesh(apply, mesh),
                 in_shardings=(state_shardings, data_shardings,
                               cohort_sharding(mesh), rep),
                 out_shardings=(state_shardings, rep), **jit_options)


# XLA:CPU's default copy insertion copies parameters carried by the
# local-step loop at every step (each client's 6.4 MB first Dense kernel
# of mnist_cnn, read then rewritten); its region analysis sees that the
# step's reads of the old values come before the update and drops the
# copies. Same results, bit for bit; mnist_cnn FedAvg on 2 CPU devices in
# chunks of 2 (`experiments.benchmark --workload=cnn_fedavg`), in one
# process, alternating: 2.18-2.26 s a round against 2.46-2.55 s.
_CPU_ROUND_OPTIONS = {'xla_cpu_copy_insertion_use_region_analysis': True}


def jit_init(init, mesh: Mesh):
  """`init` (`(*args) -> ServerState`, e.g. `algorithm.init(params, rng,
  data)`) jitted to compute the state where `state_sharding` places it.

  Each device builds (for fedmd, also trains) only its share of the
  per-client state. Jitted without placement, every device built all of
  it, and trained every client's fedmd transfer learning, before the
  state was split.
  """

  def placed(*args):
    state = init(*args)
    return jax.lax.with_sharding_constraint(state,
                                            state_sharding(state, mesh))

  return jax.jit(_on_mesh(placed, mesh))


def _on_mesh(fn, mesh: Mesh):
  """`fn` traced with `mesh` set: `clients.map_clients` then ties the
  client axis to the mesh's, and `clients.take_rows` finds it."""

  @functools.wraps(fn)
  def on_mesh(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)

  return on_mesh


# On CPU, a chunk whose clients' trained parameters and activations fill
# about this much per device stays in cache through the local steps, where
# a whole cohort's are streamed from memory at every step. One process,
# rounds alternating (`experiments.benchmark` workloads): the mlp round of
# 1000 clients (36 KB of teacher and student and 38 KB of activations a
# client step) took 0.061-0.066 s in chunks of 100 or 200 against
# 0.081-0.089 s unchunked, 0.066-0.070 s in chunks of 50 and 0.071 s in
# chunks of 500; mnist_cnn's (6.7 MB of parameters a client) ran fastest
# one client per device (one device: 2.98-3.12 s against 3.33-3.52 s in
# chunks of 5 and 3.72-3.81 s in chunks of 10), and so did ResNet-8's (0.3 MB
# of parameters, 60 MB of activations at batch 10; two devices: 0.44 s
# against 0.52-0.53 s in one chunk).
_CHUNK_BYTES_PER_DEVICE = 8 * 2**20


def chunk_for(client_bytes: int, clients_per_round: int, devices: int) -> int:
  """`clients_per_chunk` for clients of `client_bytes` each on CPU: as few
  chunks as keep `_CHUNK_BYTES_PER_DEVICE` a device (at least one client
  each), equal in size; 0 (the whole cohort) when one is enough."""
  per_device = max(1, _CHUNK_BYTES_PER_DEVICE // max(client_bytes, 1))
  chunks = -(-clients_per_round // (per_device * devices))
  return -(-clients_per_round // chunks) if chunks > 1 else 0


def auto_chunk(state, num_clients: int, clients_per_round: int, mesh: Mesh,
               step_bytes: int = 0) -> int:
  """`clients_per_chunk` when a run leaves it unset: on CPU, `chunk_for`
  the bytes each client trains (the global `params`, plus its share of the
  stacked per-client state) and `step_bytes`, the activations of one of its
  local steps (`metrics.step_bytes`); 0 (the whole cohort) on accelerators,
  whose parallelism wants every client at once. `state` may be abstract
  (`jax.eval_shape`).
  """
  if mesh.devices.flat[0].platform != 'cpu':
    return 0
  client_bytes = (algorithm.tree_bytes(state.params)
                  + algorithm.tree_bytes(state.clients) // num_clients)
  return chunk_for(client_bytes + step_bytes, clients_per_round, mesh.size)


def cohort_layout(clients_per_round: int, mesh: Mesh,
                  clients_per_chunk: int = 0, *,
                  quota: Sequence[int] = ()) -> tuple[int, int]:
  """Cohort slots and chunk size for a round on `mesh`.

  Both are rounded up to a multiple of the device count (padding slots have
  weight 0), and the cohort to a whole number of chunks. With client groups
  (`quota`: each group's clients per round, `clients.group_quota`), every
  group gets the slots of the largest quota, and both are multiples of the
  number of groups times the device count.

  Returns:
    (cohort_size, chunk); chunk is 0 when the cohort runs as one chunk.
  """
  k = len(quota) or 1
  unit = k * mesh.size
  round_up = lambda n, m: -(-n // m) * m
  size = round_up(k * max(quota, default=clients_per_round), unit)
  if 0 < clients_per_chunk < size:
    chunk = round_up(clients_per_chunk, unit)
    if chunk < size:
      return round_up(size, chunk), chunk
  return size, 0
