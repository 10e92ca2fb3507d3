"""`FederatedAlgorithm` and the generic round every algorithm shares.

An algorithm is a factory that closes over its hyperparameters and returns
pure functions (like optax's `GradientTransformation`):

* `init(params, rng) -> ServerState`
* `apply(state, data, cohort, rng) -> (state, metrics)`: one round, to be
  jitted once by the caller;
* `client_update(server, client_state, data, client_id, num_examples,
  rng) -> ClientOutput` for ONE client, which `apply` maps over the cohort;
  `server` is the `ServerState` without the stacked client states;
* `aggregator`: the chain (`fedkd.aggregation`) that turns the clients'
  uploads into the means the server update receives;
* `server_update(state, mean_upload, data, rng) -> (state, metrics)`.

Communication is counted exactly, in bytes, per round, as
`communication.Bytes` (int32 counts times static units, multiplied out on the
host in Python ints, so no size overflows). Each reporting client uploads its
whole `upload` pytree, unless its client update reports other `upload_bytes`
(parameters, when its `upload` also carries simulation-only values) or a
stage of the aggregator replaces them (SVD factors). Each sampled client
downloads the global `params`, unless the server update reports the
per-client `download_bytes` it broadcasts instead. A server that broadcasts
compressed updates keeps a per-client `ServerState.backlog` and reports each
round's `update_floats` (see `make_round`).

`client_update`, `aggregator` and `server_update` are exposed so the
per-client Python loop (`fedkd.loop`) runs the very same code the vmapped
round runs.
"""

from collections.abc import Callable, Sequence
import functools
import operator
from typing import Any, NamedTuple

from flax import struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from fedkd import aggregation
from fedkd import communication
from fedkd import privacy
from fedkd.clients import CLIENTS_AXIS
from fedkd.clients import ClientData, ClientOutput, Cohort, map_clients
from fedkd.clients import put_rows
from fedkd.clients import rows_held_here
from fedkd.clients import splitting_mesh
from fedkd.clients import take_rows
from fedkd.typing import Array, Metrics, OptState, Params, PRNGKey, PyTree


class ServerState(struct.PyTreeNode):
  """Everything that persists between rounds.

  Attributes:
    params: the global (shared) model.
    opt_state: the server optimizer's state.
    round: number of rounds applied so far.
    clients: per-client persistent state stacked over all clients
      ([num_clients, ...] leaves, e.g. private teachers); `()` when none.
    backlog: [num_clients] int32 where the server broadcasts compressed
      updates: how many float32 values each client must download to hold
      the current `params`, the updates it missed capped at the whole model
      (which a client that never took part needs); `()` where clients
      download the whole model every round.
  """
  params: Params
  opt_state: OptState
  round: Array
  clients: PyTree
  backlog: PyTree = ()


ClientUpdate = Callable[..., ClientOutput]
ServerUpdate = Callable[[ServerState, PyTree, ClientData, PRNGKey],
                        tuple[ServerState, Metrics]]
MapFn = Callable[[Callable[..., ClientOutput]], Callable[..., ClientOutput]]


class FederatedAlgorithm(NamedTuple):
  init: Callable[[Params, PRNGKey], ServerState]
  apply: Callable[[ServerState, ClientData, Cohort, PRNGKey],
                  tuple[ServerState, Metrics]]
  client_update: ClientUpdate
  server_update: ServerUpdate
  aggregator: aggregation.Aggregator = aggregation.mean()


def tree_bytes(tree: PyTree) -> int:
  """Bytes of every leaf of `tree` as stored (float32 parameters: 4 each)."""
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


class Faults(NamedTuple):
  """Simulated client failures, drawn per (round, client id).

  Attributes:
    dropout_rate: probability that a client of the cohort trains but never
      reports: it neither contributes nor keeps its new state.
    straggler_rate: probability that a client completes only a uniformly
      drawn fraction of its local steps; it still reports that partial work.
  """
  dropout_rate: float = 0.0
  straggler_rate: float = 0.0


def _one_client(client_update: ClientUpdate,
                aggregator: aggregation.Aggregator, faults: Faults, shared,
                client_id, num_examples, client_state,
                own_rows) -> tuple[ClientOutput, Array]:
  """One client's round, its upload encoded, plus its failure draw:
  (output, dropped). `shared` is (server, data, round rng); `own_rows` the
  client's `ClientData.cohort_rows`."""
  server, data, rng = shared
  data = data.own(own_rows)
  # Client randomness depends on (round rng, client id) only, never on the
  # client's slot in the cohort or on the device layout.
  train_rng, fault_rng = jax.random.split(jax.random.fold_in(rng, client_id))
  drop_u, straggle_u, fraction = jax.random.uniform(fault_rng, (3,))
  straggler = straggle_u < faults.straggler_rate
  out = client_update(
      server, client_state,
      data.replace(work_fraction=jnp.where(straggler, fraction, 1.0)),
      client_id, num_examples, train_rng)
  metrics = dict(out.metrics, stragglers=straggler.astype(jnp.int32))
  sent = metrics.pop('upload_bytes', None)
  upload, weight, sent, more = aggregator.encode(
      out.upload, out.weight, communication.fixed(
          1, tree_bytes(out.upload)) if sent is None else sent, server.round)
  return out._replace(upload=upload, weight=weight, metrics=dict(
      metrics, **more, upload_bytes=sent)), drop_u < faults.dropout_rate


def _all_finite(tree: PyTree) -> Array:
  """[C] bool: whether every value of each client's slice is finite."""
  return functools.reduce(jnp.logical_and, [
      jnp.all(jnp.isfinite(x).reshape(x.shape[0], -1), axis=1)
      for x in jax.tree.leaves(tree)])


def _per_client(flags: Array, x: Array) -> Array:
  """Broadcasts [C] `flags` against a [C, ...] leaf."""
  return flags.reshape(flags.shape + (1,) * (x.ndim - 1))


def _leading(tree: PyTree) -> int:
  """The leading (client) axis of a stacked state; 0 for an empty one."""
  leaves = jax.tree.leaves(tree)
  return leaves[0].shape[0] if leaves else 0


def _by_device(reduce: Callable[..., PyTree], *args: PyTree) -> PyTree:
  """`reduce` (a sum over the leading client axis of `args`) of each
  device's own clients: [D, ...] for the D devices the `clients` mesh axis
  splits them over, [1, ...] off a mesh or where they do not divide.

  The round sums these over D once, after its chunks. Summed over devices in
  each chunk, as XLA partitions a plain sum, every chunk ended in an
  all-reduce of the uploads (a model's size). On 2 CPU devices, ResNet-8
  FedAvg in chunks of 2: 758 ms of ops a round against 937 ms.
  """
  mesh = splitting_mesh(_leading(args))
  one = lambda *a: jax.tree.map(lambda r: r[None], reduce(*a))
  if mesh is None:
    return one(*args)
  split = P(CLIENTS_AXIS)
  return jax.shard_map(one, mesh=mesh, in_specs=split, out_specs=split)(*args)


def _safe_ids(ids: Array, data: ClientData) -> Array:
  """Cohort slot ids in range: padded slots read client num_clients - 1's
  rows but train on 0 examples, and their state writes drop."""
  return jnp.minimum(ids, data.num_clients - 1)


def _examples_up_front(data: ClientData, ids: Array):
  """The whole cohort's `cohort_rows`, gathered before its chunks run, or
  None (each chunk gathers its own).

  Each gather across devices synchronises them. Once a round instead of
  once a chunk, mnist_cnn FedAvg on 2 CPU devices in chunks of 2
  (`experiments.benchmark --workload=cnn_fedavg`, alternating) took 2.17
  and 2.07 s a round against 2.41 and 2.22 s. Only where the cohort's padded
  rows take no more room than the examples themselves (not for skewed
  client sizes), since chunks are there to bound memory.
  """
  if not data.split_rows or ids.shape[0] * data.max_examples > data.x.shape[0]:
    return None
  return data.cohort_rows(_safe_ids(ids, data))


def _compensated_add(total: PyTree, lost: PyTree,
                     value: PyTree) -> tuple[PyTree, PyTree]:
  """`total + value` leafwise, float leaves with Neumaier's compensation:
  `lost` gathers what each float addition rounded off (add it to the total
  at the end); integer leaves add exactly and keep their `lost` (zeros).

  The round's metric sums (loss sums) add one chunk at a time. Plain
  float32 additions of 125,000 chunks of 8 clients (10^6 clients of 100
  examples) put a mean loss of 2.30021 at 2.30019. A sum that is no longer
  finite gathers nothing, so it ends inf as an unchunked sum does, not NaN.
  """
  def add(t, c, v):
    if not jnp.issubdtype(t.dtype, jnp.floating):
      return t + v, c
    s = t + v
    lost = jnp.where(jnp.abs(t) >= jnp.abs(v), (t - s) + v, (v - s) + t)
    return s, c + jnp.where(jnp.isfinite(s), lost, 0)
  leaves, treedef = jax.tree.flatten(total)
  sums, losts = zip(*map(add, leaves, treedef.flatten_up_to(lost),
                         treedef.flatten_up_to(value))) if leaves else ((), ())
  return treedef.unflatten(sums), treedef.unflatten(losts)


def _add_metrics(a: Metrics, b: Metrics) -> Metrics:
  """Sums two groups' metrics (`Bytes` of different units concatenate)."""
  return {k: a[k] + b[k] if k in a and k in b else a.get(k, b.get(k))
          for k in {**a, **b}}


def make_round(client_update: ClientUpdate | tuple[ClientUpdate, ...],
               server_update: ServerUpdate, *,
               aggregator: aggregation.Aggregator = aggregation.mean(),
               map_fn: MapFn = map_clients, clients_per_chunk: int = 0,
               faults: Faults = Faults()):
  """Builds `apply`: run the cohort's clients, aggregate their uploads,
  update the server.

  A client whose upload holds NaN or inf is left out of the average (and its
  state is not written back); `metrics['nonfinite_clients']` counts them.

  Client groups (one architecture each): with a tuple of k client updates,
  client i belongs to group i % k, `ServerState.clients` is a tuple of the
  groups' stacked states (client i in row i // k of its group's), cohort
  slot s serves group s % k (`clients.sample_cohort`), and `server_update`
  receives a tuple of the groups' mean uploads (`aggregation.group_means`:
  `Pooled` parts averaged over every group). Each group is vmapped on its
  own, all in the same jitted round.

  Args:
    client_update: one client's local round, or one per client group.
    server_update: turns the averaged upload (its `aggregation.Summed`
      parts summed) into the next server state. Where the server sends each
      group something else, its `download_bytes` metric is a tuple of each
      group's per-client bytes.
    aggregator: encodes each client's upload inside the mapped round and
      reduces the groups' sums to the means `server_update` receives
      (`fedkd.aggregation`; `privacy.private` adds client-level DP).
    map_fn: how a one-client function of `((server, data, rng), client_id,
      num_examples, client_state, own_rows)` is mapped over the stacked
      arguments after the shared first one: `map_clients` (vmap, the
      default) or a per-client loop (`fedkd.loop.python_map`) for reference
      runs.
    clients_per_chunk: if > 0 and smaller than the cohort, clients run in
      chunks of this many (a `lax.scan` over chunks, each vmapped) and only
      running weighted sums are kept, so memory is bounded by the chunk. The
      cohort size must be a multiple of it, and it of the number of groups.
    faults: simulated client failures.

  Returns:
    `apply(state, data, cohort, rng) -> (state, metrics)`.
  """
  grouped = isinstance(client_update, tuple)
  updates = groups_of(client_update)
  k = len(updates)
  mapped = [map_fn(functools.partial(_one_client, u, aggregator, faults))
            for u in updates]

  def run_group(mapped, state, data, rng, clients, ids, mask, examples):
    """Trains one group's slots; returns their reduced contribution.
    `examples`: the slots' `cohort_rows` where gathered already, else None."""
    rows = _leading(clients)
    safe_ids = _safe_ids(ids, data)
    num_examples = jnp.where(mask, data.num_examples[safe_ids], 0)
    own = jnp.where(mask, ids // k, rows)
    read = jnp.minimum(own, rows - 1)
    # Without per-client state (rows == 0) nothing is read or written.
    held_here = rows_held_here(read, rows) if rows else None
    chunk_states = jax.tree.map(lambda s: take_rows(s, read, held_here),
                                clients)
    if examples is None:
      examples = data.cohort_rows(safe_ids)
    out, dropped = mapped((state.replace(clients=()), data, rng), safe_ids,
                          num_examples, chunk_states, examples)
    dropped &= mask
    finite = _all_finite(out.upload)
    reported = mask & ~dropped & finite
    # 0 * NaN is NaN: zero the uploads left out rather than only weighing 0.
    upload = jax.tree.map(lambda u: jnp.where(_per_client(reported, u), u, 0),
                          out.upload)
    weights = reported * out.weight
    metrics = jax.tree.map(
        lambda v: jnp.where(_per_client(reported, v), v, 0), out.metrics)
    metrics.update(clients=reported.astype(jnp.int32),
                   dropped_clients=dropped.astype(jnp.int32),
                   nonfinite_clients=(mask & ~dropped & ~finite).astype(
                       jnp.int32),
                   sampled=mask.astype(jnp.int32))
    totals, weight, sums = _by_device(
        lambda u, w, m: (aggregation.weighted_sum(u, w), jnp.sum(w),
                         jax.tree.map(lambda v: jnp.sum(v, axis=0), m)),
        upload, weights, metrics)
    # The others' states are dropped (written past the table).
    write = jnp.where(reported, own, rows)
    clients = jax.tree.map(
        lambda s, new: put_rows(s, write, new, held_here), clients, out.state)
    return totals, weight, sums, clients

  def run_chunk(state, data, rng, clients, ids, mask, examples=None):
    """Trains one chunk of slots, group by group (slot s: group s % k)."""
    of_group = lambda a, g: a.reshape(-1, k, *a.shape[1:])[:, g]
    by_group = [run_group(m, state, data, rng, c, of_group(ids, g),
                          of_group(mask, g),
                          jax.tree.map(lambda a: of_group(a, g), examples))
                for g, (m, c) in enumerate(zip(mapped, clients))]
    return tuple(zip(*by_group))

  def apply(state: ServerState, data: ClientData, cohort: Cohort,
            rng: PRNGKey) -> tuple[ServerState, Metrics]:
    client_rng, server_rng, noise_rng = jax.random.split(rng, 3)
    # Groups without per-client state (feddf's) hold `()` for them all.
    stateless = grouped and state.clients == ()
    states = ((),) * k if stateless else (
        state.clients if grouped else (state.clients,))
    size = cohort.client_ids.shape[0]
    chunk = clients_per_chunk if 0 < clients_per_chunk < size else size
    if size % chunk:
      raise ValueError(f'cohort size {size} is not a multiple of '
                       f'clients_per_chunk={chunk}')
    if chunk % k:
      raise ValueError(f'{chunk} clients at once (cohort or chunk) is not a '
                       f'multiple of the {k} client groups')
    if chunk == size:
      totals, weights, sums, states = run_chunk(
          state, data, client_rng, states, cohort.client_ids,
          cohort.client_mask)
    else:
      # Chunk j holds slots j, j + n, j + 2n, ... of each group: it stays
      # split across the devices of the cohort and keeps slot s in group
      # s % k.
      n = size // chunk
      chunked = jax.tree.map(lambda a: a.reshape(
          chunk // k, n, k, *a.shape[1:]).swapaxes(0, 1).reshape(
              n, chunk, *a.shape[1:]), (
                  cohort.client_ids, cohort.client_mask,
                  _examples_up_front(data, cohort.client_ids)))

      def body(carry, slots):
        totals, weights, sums, lost, states = carry
        new_totals, new_weights, new_sums, states = run_chunk(
            state, data, client_rng, states, *slots)
        add = lambda a, b: jax.tree.map(jnp.add, a, b)
        sums, lost = _compensated_add(sums, lost, new_sums)
        return (add(totals, new_totals), add(weights, new_weights), sums,
                lost, states), None

      shapes = jax.eval_shape(lambda: run_chunk(
          state, data, client_rng, states,
          *jax.tree.map(lambda a: a[0], chunked)))
      init = jax.tree.map(lambda z: jnp.zeros(z.shape, z.dtype), shapes[:3])
      (totals, weights, sums, lost, states), _ = jax.lax.scan(
          body, (*init, init[2], states), chunked)
      sums = jax.tree.map(jnp.add, sums, lost)
    totals, weights, sums = jax.tree.map(lambda a: jnp.sum(a, axis=0),
                                         (totals, weights, sums))
    means = aggregator.reduce(totals, weights, noise_rng)
    new_state, server_metrics = server_update(
        state, means if grouped else means[0], data, server_rng)
    sampled = [s.pop('sampled') for s in sums]  # each group's, for downloads
    metrics = dict(functools.reduce(_add_metrics, sums), **server_metrics)
    # Every sampled client downloads, dropped and non-finite ones included.
    if isinstance(state.backlog, tuple):
      download = metrics.get('download_bytes', communication.fixed(
          1, tree_bytes(state.params)))
      if not isinstance(download, tuple):
        download = (download,) * k
      metrics['download_bytes'] = functools.reduce(operator.add, [
          d.times(n) for d, n in zip(download, sampled)])
    else:
      metrics['download_bytes'], new_state = _catch_up(
          new_state, cohort, metrics.pop('update_floats'))
    metrics['params_finite'] = jnp.all(_all_finite(
        jax.tree.map(lambda p: p[None], new_state.params)))
    return new_state.replace(clients=() if stateless else (
        states if grouped else states[0]),
                             round=state.round + 1), metrics

  return apply


def _catch_up(state: ServerState, cohort: Cohort,
              update_floats: Array) -> tuple[communication.Bytes, ServerState]:
  """Charges the cohort its backlog, then adds this round's update to all.

  A sampled client downloads the updates it missed since it last took part,
  or the whole model when that is smaller (always, the first time); then
  every client misses the update this round applied. Exact while the model
  has fewer than 2^30 float32 values (the int32 backlog stays below 2^31).
  """
  owed = jnp.where(cohort.client_mask, state.backlog[cohort.client_ids], 0)
  synced = state.backlog.at[cohort.client_ids].set(0, mode='drop')
  backlog = jnp.minimum(synced + update_floats,
                        _model_floats(state.params)).astype(jnp.int32)
  return communication.summed(owed), state.replace(backlog=backlog)


def with_backlog(state: ServerState, num_clients: int) -> ServerState:
  """`state` whose clients download compressed updates, none yet in sync."""
  return state.replace(backlog=jnp.full(
      (num_clients,), _model_floats(state.params), jnp.int32))


def _model_floats(params: Params) -> int:
  """The float32 values a client downloads to hold the whole `params`."""
  return tree_bytes(params) // communication.FLOAT_BYTES


def averaging_server_update(tx) -> ServerUpdate:
  """Server update for algorithms whose upload is the model delta (FedOpt)."""

  def server_update(state: ServerState, mean_delta: Params, data, rng):
    del data, rng  # Averaging needs neither.
    params, opt_state = aggregation.server_step(
        state.params, state.opt_state, mean_delta, tx)
    return state.replace(params=params, opt_state=opt_state), {}

  return server_update


def adopt_reported(state: ServerState, upload: PyTree, data, rng):
  """Server update adopting the averaged or summed `(values, presence)`
  upload (FD, FedMD).

  Every client weighs 1 and sends `presence` (1 per entry it reports, 0
  elsewhere), so the mean or sum of presence is 0 exactly where no reporting
  client had the entry: there the previous `(values, presence)` are kept, so
  a round that misses a label, or in which every client drops out, does not
  wipe what earlier rounds learnt. `values` is a pytree of arrays of
  `presence`'s shape plus trailing axes.
  """
  del data, rng  # Nothing is trained on the server.
  values, presence = upload
  old_values, old_presence = state.params
  reported = presence > 0
  adopt = lambda new, old: jnp.where(reported.reshape(
      reported.shape + (1,) * (new.ndim - reported.ndim)), new, old)
  return state.replace(params=(jax.tree.map(adopt, values, old_values),
                               adopt(presence, old_presence))), {}


def groups_of(items: Any) -> tuple[Any, ...]:
  """Per-group items (models, client updates) as a tuple: `items` itself for
  several groups (client i's is `items[i % k]`), else a 1-tuple of it; the
  inverse of `per_group`."""
  return tuple(items) if isinstance(items, Sequence) else (items,)


def per_group(items: Sequence[Any]) -> Any:
  """What `make_round` and `ServerState.clients` take for per-group items:
  the item itself for one group (the plain round), the tuple for several."""
  return items[0] if len(items) == 1 else tuple(items)


def pooled(mean_upload: Any, groups: int) -> PyTree:
  """The value of a `Pooled` or `Summed` upload, alike in every group's mean
  (`mean_upload` is their tuple with several groups)."""
  return (mean_upload[0] if groups > 1 else mean_upload).value


def build(init, client_update: ClientUpdate, server_update: ServerUpdate,
          aggregator: aggregation.Aggregator = aggregation.mean()
          ) -> FederatedAlgorithm:
  """Assembles a `FederatedAlgorithm` around the generic vmapped round."""
  return FederatedAlgorithm(
      init=init, apply=make_round(client_update, server_update,
                                  aggregator=aggregator),
      client_update=client_update, server_update=server_update,
      aggregator=aggregator)


def with_round(alg: FederatedAlgorithm, *,
               dp: privacy.DpSettings | None = None,
               **options) -> FederatedAlgorithm:
  """`alg` whose `apply` is its round with `make_round`'s `options` (chunks,
  faults, a per-client loop) and, with `dp`, client-level DP added to its
  aggregator (`privacy.private`): the round a run jits and calls."""
  aggregator = (alg.aggregator if dp is None
                else privacy.private(alg.aggregator, dp))
  return alg._replace(apply=make_round(
      alg.client_update, alg.server_update, aggregator=aggregator, **options),
                      aggregator=aggregator)


def server_init(tx, params: Params, clients: PyTree = ()) -> ServerState:
  """A round-0 `ServerState` for global `params` and stacked client state."""
  return ServerState(params=params, opt_state=tx.init(params),
                     round=jnp.zeros((), jnp.int32), clients=clients)

