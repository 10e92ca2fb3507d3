"""Client-side execution: one client's code, mapped over a stacked cohort.

Client code is written for a single client. `map_clients` is the one `vmap`
over clients in fedkd; everything ragged (clients of different sizes, the last
partial batch, padded cohort slots) is handled with masks, so one compiled
round serves every cohort.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from fedkd import communication
from fedkd import losses
from fedkd.errors import FedkdError
from fedkd.typing import Array, Params, PRNGKey, PyTree

CLIENTS_AXIS = 'clients'


def splitting_mesh(*sizes: int) -> jax.sharding.AbstractMesh | None:
  """The mesh set by `sharding.jit_round` (or `jit_init`) when its `clients`
  axis has several devices and their count divides every one of `sizes`
  (leading axes split over it); None otherwise."""
  mesh = jax.sharding.get_abstract_mesh()
  d = 1 if mesh.empty else dict(mesh.shape).get(CLIENTS_AXIS, 1)
  return mesh if d > 1 and not any(n % d for n in sizes) else None


def _per_device(mesh: jax.sharding.AbstractMesh, rows: int) -> int:
  """Rows each device holds of `rows` split over `mesh`'s `clients` axis."""
  return rows // dict(mesh.shape)[CLIENTS_AXIS]


def _from_here(index: Array, per_device: int) -> Array:
  """`index` counted from this device's first row of a table split by rows
  over the `clients` axis (inside `shard_map`)."""
  return index - jax.lax.axis_index(CLIENTS_AXIS) * per_device


def take_rows(table: Array, index: Array,
              held_here: Array | None = None) -> Array:
  """`table[index]`, for `index` ([C, ...], in range) split over the
  `clients` axis like a cohort and `table` split by rows over it (per-client
  state, split client examples), inside a round jitted by
  `sharding.jit_round`.

  Each device gathers the rows it holds (zeros for the others) and one
  reduce-scatter sums them onto the devices of the slots that asked: each
  device receives 1/D of the result. XLA's partitioner would all-reduce the
  whole result to every device, or all-gather the whole table; with private
  teachers on 8 CPU devices (`experiments.benchmark --workload=mlp`), that
  round took 1.7-2.4x as long with cohorts of 1,000 of 10,000 clients and
  1.5x with all 1,000 clients each round. Where `held_here`
  (`rows_held_here`) is true, every device already holds the rows its slots
  ask for and gathers them without any exchange. Plain indexing where no
  mesh is set, on one device, where the row or slot counts do not divide by
  the devices, and for non-numeric tables.
  """
  mesh = splitting_mesh(table.shape[0], index.shape[0])
  if mesh is None or not jnp.issubdtype(table.dtype, jnp.number):
    return table[index]
  per_device = _per_device(mesh, table.shape[0])

  def local(table, index):
    index = _from_here(index, per_device)
    held = (index >= 0) & (index < per_device)
    rows = table[jnp.clip(index, 0, per_device - 1)]
    rows = jnp.where(held.reshape(held.shape + (1,) * (table.ndim - 1)),
                     rows, 0)
    return jax.lax.psum_scatter(rows, CLIENTS_AXIS, tiled=True)

  def own(table, index):  # index: this device's slots only
    return table[_from_here(index, per_device)]

  split = P(CLIENTS_AXIS)
  take = lambda fn, index_spec: jax.shard_map(
      fn, mesh=mesh, in_specs=(split, index_spec), out_specs=split)(
          table, index)
  if held_here is None:
    return take(local, P())
  return jax.lax.cond(held_here, lambda: take(own, split),
                      lambda: take(local, P()))


def put_rows(table: Array, index: Array, values: Array,
             held_here: Array | None = None) -> Array:
  """`table.at[index].set(values, mode='drop')`, split as in `take_rows`.

  XLA's partitioner all-gathers `values` to every device, each keeping its
  rows: any exchange of static shape must leave room for every slot to land
  on any device, so moves as much. Where `held_here` (`rows_held_here` of
  the same rows, out-of-range indices aside) is true, each device writes its
  own slots' rows in place instead.
  """
  mesh = splitting_mesh(table.shape[0], index.shape[0])
  everywhere = lambda: table.at[index].set(values, mode='drop')
  if mesh is None or held_here is None:
    return everywhere()
  per_device = _per_device(mesh, table.shape[0])

  def own(table, index, values):
    # Indices past the table (dropped slots) stay past this device's rows.
    return table.at[_from_here(index, per_device)].set(values, mode='drop')

  split = P(CLIENTS_AXIS)
  return jax.lax.cond(held_here, lambda: jax.shard_map(
      own, mesh=mesh, in_specs=(split, split, split), out_specs=split)(
          table, index, values), everywhere)


def rows_held_here(index: Array, rows: int) -> Array | None:
  """Whether each device holds the rows that its slots of `index` ask for,
  of a table of `rows` rows split over the `clients` axis (a replicated
  bool; one small all-reduce), or None where `take_rows` would not split
  the table. True for a whole population trained every round: cohorts are
  sorted (`sample_cohort`), so each device's slots hold its own clients.
  """
  mesh = splitting_mesh(rows, index.shape[0])
  if mesh is None:
    return None
  per_device = _per_device(mesh, rows)

  def held(index):
    here = jnp.all(index // per_device == jax.lax.axis_index(CLIENTS_AXIS))
    return jax.lax.pmin(here.astype(jnp.int32), CLIENTS_AXIS) > 0

  return jax.shard_map(held, mesh=mesh, in_specs=P(CLIENTS_AXIS),
                       out_specs=P())(index)


class ClientData(struct.PyTreeNode):
  """Every client's examples, stored back to back.

  Flat storage keeps memory proportional to the number of examples, however
  skewed the client sizes (power-law or Dirichlet partitions); only the local
  step schedule is padded, to `max_examples`. Where the rows are split over
  devices, a client's update sees its own rows only (`own`).

  Attributes:
    x: [total_examples, ...] features, client after client.
    y: [total_examples] integer labels.
    offsets: [num_clients] int32, the row where each client's examples start.
    num_examples: [num_clients] int32, how many rows each client has.
    max_examples: the largest client's size (static: it sets the number of
      local steps per epoch).
    public_x: [num_public, ...] unlabeled public (proxy) features every
      client and the server can read (FedDF, FedMD); [0] when the run holds
      none out. A jit argument like the rest, never a closed-over constant.
    public_y: [num_public] int32 labels of the public data, held only for
      an algorithm that trains on them (FedMD's transfer learning); [0]
      otherwise, so FedDF's proxy data stays unlabeled.
    work_fraction: the share of its local steps a client completes (1.0);
      the round sets it per client to simulate stragglers.
    split_rows: whether `x` and `y` are split by rows over several devices
      (`sharding.place_data`); the round then gathers each client's rows
      once (`cohort_rows`) instead of every step's batch across devices.
  """
  x: Array
  y: Array
  offsets: Array
  num_examples: Array
  max_examples: int = struct.field(pytree_node=False)
  public_x: Array = struct.field(
      default_factory=lambda: np.zeros((0,), np.float32))
  public_y: Array = struct.field(
      default_factory=lambda: np.zeros((0,), np.int32))
  work_fraction: Array = struct.field(
      default_factory=lambda: np.ones((), np.float32))
  split_rows: bool = struct.field(pytree_node=False, default=False)

  @property
  def num_clients(self) -> int:
    return self.num_examples.shape[0]

  def rows_of(self, client_ids: Array) -> tuple[Array, Array]:
    """(x, y) of each client's first `max_examples` rows, [C, max_examples,
    ...] and [C, max_examples] (past a client's own rows: other clients'
    rows, which its masks leave out)."""
    rows = jnp.minimum(self.offsets[client_ids][:, None]
                       + jnp.arange(self.max_examples), self.x.shape[0] - 1)
    return take_rows(self.x, rows), take_rows(self.y, rows)

  def cohort_rows(self, client_ids: Array) -> tuple[Array, Array] | None:
    """What the round hands each of `client_ids` besides the shared data:
    with `split_rows`, its `rows_of`, which split over the `clients` axis
    like the cohort keep each local step's batch on the device that trains
    the client (one gather a round, not one across devices a step); else
    None, and clients read the flat arrays."""
    return self.rows_of(client_ids) if self.split_rows else None

  def own(self, rows: tuple[Array, Array] | None) -> 'ClientData':
    """The data as one client's update sees it, given its `cohort_rows`:
    with rows, `x` and `y` are those rows (so every offset is 0)."""
    if rows is None:
      return self
    return self.replace(x=rows[0], y=rows[1], split_rows=False,
                        offsets=jnp.zeros_like(self.offsets))


class Cohort(NamedTuple):
  """The clients sampled for one round, padded to a fixed size.

  Attributes:
    client_ids: [cohort_size] int32; padded slots hold `num_clients`, an id
      past the end, so writing their state back is dropped.
    client_mask: [cohort_size] bool, False for padded slots.
  """
  client_ids: Array
  client_mask: Array


class Batch(NamedTuple):
  """One local step's minibatch of one client (or of the public data)."""
  x: Array  # [batch, ...]
  y: Array | None  # [batch] labels; None for unlabeled public data
  example_mask: Array  # [batch], False for padding
  index: Array  # [batch] rows of the batch in its source array


class ClientOutput(NamedTuple):
  """What one client's local round returns.

  Attributes:
    upload: the pytree the server averages (e.g. the student's delta).
    weight: this client's aggregation weight (its number of examples).
    state: the client's new persistent state (same structure as its input).
    metrics: sums over the client's examples, reduced by summing over clients.
  """
  upload: PyTree
  weight: Array
  state: PyTree
  metrics: dict[str, Array]


def map_clients(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Maps one-client `fn(shared, *per_client)` over a leading client axis
  (the vmap of fedkd): `mapped(shared, *stacked)`.

  `shared` (one pytree: server model, stacked data, round rng) is the same
  for every client; each of `stacked` has the clients on its leading axis.
  `spmd_axis_name` ties the mapped axis to the `clients` mesh axis, so under a
  sharded jit every per-client intermediate is split across devices too.
  """
  def mapped(shared, *stacked):
    return jax.vmap(lambda s, c: fn(s, *c), in_axes=(None, 0),
                    spmd_axis_name=CLIENTS_AXIS)(shared, stacked)
  return mapped


def num_steps(num_examples: int, *, epochs: int, batch_size: int) -> int:
  """Steps of `epochs` passes over `num_examples` (the last batch partial)."""
  return epochs * -(-num_examples // batch_size)


# A shuffle sorts positions by 23 random bits each (those of which
# `jax.random.uniform` makes a float32 in [0, 1)), ties in position order.
_KEY_BITS = 23


def _shuffled(key: PRNGKey, num_real: Array, size: int) -> Array:
  """Positions 0..size-1: the first `num_real` in random order, then the
  rest in order (int32)."""
  position = jnp.arange(size, dtype=jnp.uint32)
  keys = jax.random.bits(key, (size,), jnp.uint32) >> (32 - _KEY_BITS)
  # The largest key, with the largest positions: after every real row.
  keys = jnp.where(position < num_real, keys, (1 << _KEY_BITS) - 1)
  index_bits = max(size - 1, 1).bit_length()
  if _KEY_BITS + index_bits > 32:
    return jnp.argsort(keys, stable=True).astype(jnp.int32)
  # Key and position packed in one uint32 sort the same way, and XLA:CPU
  # sorts one operand much faster than argsort's two (100 rows of 500:
  # 1.7 ms against 10 ms).
  mask = (1 << index_bits) - 1
  return (jnp.sort(keys << index_bits | position) & mask).astype(jnp.int32)


def local_batches(rng: PRNGKey, num_examples: Array, max_examples: int, *,
                  epochs: int, batch_size: int) -> tuple[Array, Array]:
  """Shuffled example indices for `epochs` passes over one client's data.

  Each epoch is a fresh permutation of the client's `num_examples` real rows
  followed by padding, cut into ceil(max_examples / batch_size) batches, so
  every client gets the same [steps, batch_size] shape whatever its size.

  Returns:
    (indices, example_mask), both [epochs * steps_per_epoch, batch_size].
  """
  steps_per_epoch = num_steps(max_examples, epochs=1, batch_size=batch_size)
  slots = steps_per_epoch * batch_size

  def one_epoch(key):
    order = _shuffled(key, num_examples, max_examples)
    return jnp.pad(order, (0, slots - max_examples))

  indices = jax.lax.map(one_epoch, jax.random.split(rng, epochs))
  mask = jnp.broadcast_to(jnp.arange(slots) < num_examples, (epochs, slots))
  shape = (epochs * steps_per_epoch, batch_size)
  return indices.reshape(shape), mask.reshape(shape)


def tree_where(condition: Array, new: PyTree, old: PyTree) -> PyTree:
  """Leafwise `jnp.where` with a scalar condition."""
  return jax.tree.map(lambda a, b: jnp.where(condition, a, b), new, old)


def _scan_batches(step, carry, idx: Array, mask: Array,
                  gather: Callable[[Array, Array], Batch]):
  """Runs `step` over [steps, batch] index/mask arrays with `lax.scan`.

  A step whose batch is all padding keeps the carry unchanged, so sources of
  every size share one [steps, batch_size] schedule.
  """
  def body(carry, step_idx_mask):
    step_idx, step_mask = step_idx_mask
    # Gathering each minibatch inside the step, not all steps up front, saves
    # materialising (and, under vmap, transposing) a copy of the data.
    new_carry, out = step(carry, gather(step_idx, step_mask))
    return tree_where(step_mask.any(), new_carry, carry), out

  carry, outs = jax.lax.scan(body, carry, (idx, mask))
  return carry, jax.tree.map(lambda o: jnp.sum(o, axis=0), outs)


def _straggle(mask: Array, work_fraction: Array | float) -> Array:
  """`mask` cut after the first `work_fraction` of its real steps."""
  real = mask.any(axis=1)
  budget = jnp.floor(work_fraction * jnp.sum(real))
  return mask & (jnp.cumsum(real) <= budget)[:, None]


def _rows(data: ClientData, client_id: Array, slots: Array) -> Array:
  """The rows of `data.x` behind a client's example slots; padding slots
  (masked wherever they are read) read some valid row."""
  return jnp.minimum(data.offsets[client_id] + slots, data.x.shape[0] - 1)


def client_logits(model: nn.Module, params: Params, data: ClientData,
                  client_id: Array, *, batch_size: int) -> Array:
  """`model`'s logits on each of a client's `max_examples` example slots
  ([max_examples, classes], by `Batch.index`), `batch_size` rows at a time
  as a local step reads them (a padding slot's are some valid row's)."""
  # Not `predict_in_batches` of the client's rows: each batch gathers its
  # own, as `local_training` does, instead of copying all of them first.
  steps = -(-data.max_examples // batch_size)
  logits = jax.lax.map(
      lambda slots: model.apply(params, data.x[_rows(data, client_id, slots)]),
      jnp.arange(steps * batch_size).reshape(steps, batch_size))
  return logits.reshape(-1, logits.shape[-1])[:data.max_examples]


def local_training(
    step: Callable[[PyTree, Batch], tuple[PyTree, dict[str, Array]]],
    carry: PyTree, data: ClientData, client_id: Array, num_examples: Array,
    rng: PRNGKey, *, epochs: int,
    batch_size: int) -> tuple[PyTree, dict[str, Array]]:
  """Runs `step` over one client's shuffled minibatches with `lax.scan`.

  A straggler stops after the first `data.work_fraction` of its real steps.

  Returns:
    The final carry and `step`'s metric sums summed over steps, plus
    `train_examples`: the examples actually trained on (a straggler's share
    only), which its loss sums are normalised by, as a
    `communication.counted` (a cohort's sum passes 2^31: 10^6 clients x 100
    examples x 22 epochs; `int()` of it is exact).
  """
  idx, mask = local_batches(rng, num_examples, data.max_examples,
                            epochs=epochs, batch_size=batch_size)
  mask = _straggle(mask, data.work_fraction)

  def gather(step_idx, step_mask):
    rows = _rows(data, client_id, step_idx)
    return Batch(x=data.x[rows], y=data.y[rows], example_mask=step_mask,
                 index=step_idx)

  carry, sums = _scan_batches(step, carry, idx, mask, gather)
  return carry, dict(sums, train_examples=communication.counted(
      jnp.sum(mask, dtype=jnp.int32)))


def public_training(step: Callable[[PyTree, Batch], tuple[PyTree, PyTree]],
                    carry: PyTree, public_x: Array, rng: PRNGKey, *,
                    epochs: int, batch_size: int,
                    work_fraction: Array | float = 1.0,
                    public_y: Array | None = None) -> tuple[PyTree, PyTree]:
  """`local_training` over the shared public data.

  A client passes its `work_fraction`, so a straggler also completes only
  that share of its public steps; the server trains them all. Batches carry
  `public_y[index]` as labels where given, else `y` is None.
  """
  n = public_x.shape[0]
  idx, mask = local_batches(rng, n, n, epochs=epochs, batch_size=batch_size)
  mask = _straggle(mask, work_fraction)
  return _scan_batches(step, carry, idx, mask, lambda i, m: Batch(
      x=public_x[i], y=None if public_y is None else public_y[i],
      example_mask=m, index=i))


def predict_in_batches(model: nn.Module, params: Params, x: Array, *,
                       batch_size: int) -> Array:
  """`model`'s logits on every row of `x`, `batch_size` rows at a time."""
  n = x.shape[0]
  steps = -(-n // batch_size)
  padded = jnp.pad(x, [(0, steps * batch_size - n)] + [(0, 0)] * (x.ndim - 1))
  logits = jax.lax.map(lambda b: model.apply(params, b),
                       padded.reshape(steps, batch_size, *x.shape[1:]))
  return logits.reshape(steps * batch_size, -1)[:n]


def sgd_train(loss_fn: Callable[..., tuple[Array, Any]],
              tx: optax.GradientTransformation, params: Params,
              opt_state: PyTree, *args) -> tuple[Params, PyTree, Array, Any]:
  """One optimizer step on `loss_fn(params, *args) -> (loss, aux)`."""
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *args)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss, aux


# A per-example loss of the trained parameters on one batch.
PerExampleLoss = Callable[[Params, Batch], Array]


def loss_step(per_example_loss: PerExampleLoss,
              tx: optax.GradientTransformation, metric: str):
  """A `local_training` step: one `tx` step on the masked mean loss.

  The carry is (params, opt_state); the step reports the loss summed over the
  batch's real examples as `metric`.
  """
  def loss_fn(params, batch):
    per_example = per_example_loss(params, batch)
    return losses.masked_mean(per_example, batch.example_mask), per_example

  def step(carry, batch):
    params, opt_state, _, per_example = sgd_train(loss_fn, tx, *carry, batch)
    return (params, opt_state), {
        metric: jnp.sum(per_example * batch.example_mask)}

  return step


def train_from(per_example_loss: PerExampleLoss, params: Params,
               data: ClientData, client_id: Array, num_examples: Array,
               rng: PRNGKey, *, tx: optax.GradientTransformation, epochs: int,
               batch_size: int,
               metric: str = 'student_loss_sum') -> tuple[Params, PyTree]:
  """Trains `params` on the client's data with a fresh `tx` state.

  Returns:
    The trained parameters and the summed step metrics.
  """
  (params, _), sums = local_training(
      loss_step(per_example_loss, tx, metric), (params, tx.init(params)),
      data, client_id, num_examples, rng, epochs=epochs,
      batch_size=batch_size)
  return params, sums


def init_models(model: nn.Module, tx: optax.GradientTransformation,
                input_shape, num_clients: int, rng: PRNGKey, *,
                group: int = 0, groups: int = 1) -> PyTree:
  """(params, opt_state) of one private `model` per client, stacked.

  With client groups, only group `group`'s clients g, g + k, ...; each
  client's model depends on (rng, its id) alone.
  """
  def one(unused_shared, client_id):
    params = model.init(jax.random.fold_in(rng, client_id),
                        jnp.zeros((1, *input_shape)))
    return params, tx.init(params)
  return map_clients(one)((), jnp.arange(group, num_clients, groups))


def delta_output(server_params: Params, params: Params, num_examples: Array,
                 state: PyTree, sums: dict[str, Array]) -> ClientOutput:
  """`ClientOutput` uploading the model delta, weighted by example count.

  `sums` are `local_training`'s, `train_examples` included.
  """
  delta = jax.tree.map(jnp.subtract, params, server_params)
  return ClientOutput(upload=delta, weight=num_examples.astype(jnp.float32),
                      state=state, metrics=sums)


def train_beside(step, client_state: tuple, server_params: Params,
                 data: ClientData, client_id: Array, num_examples: Array,
                 rng: PRNGKey, *, tx: optax.GradientTransformation,
                 epochs: int, batch_size: int) -> ClientOutput:
  """Trains a client's private state beside a fresh copy of the global model.

  `step` runs over the carry `(*client_state, params, opt_state)` (e.g. a
  private teacher's parameters and optimizer state, then the global model's
  with a fresh `tx` state).

  Returns:
    `delta_output` of the global model, the private state the client's new
    state.
  """
  carry = (*client_state, server_params, tx.init(server_params))
  (*private, params, _), sums = local_training(
      step, carry, data, client_id, num_examples, rng, epochs=epochs,
      batch_size=batch_size)
  return delta_output(server_params, params, num_examples, tuple(private),
                      sums)


def delta_client_update(
    per_example_loss: Callable[[Params, Any, Batch], Array], *,
    tx: optax.GradientTransformation, epochs: int, batch_size: int,
    prepare: Callable[[Params, ClientData, Array], Any] | None = None):
  """`client_update` of the FedAvg family: train the global model, upload Δ.

  Args:
    per_example_loss: `(params, server_params, batch) -> [batch]` losses; the
      server parameters are there for regularisers.
    tx: the local optimizer, fresh every round.
    epochs: local passes over the client's data.
    batch_size: local minibatch size.
    prepare: `(server_params, data, client_id) -> context`, run once a round
      before the client's local steps; `per_example_loss` then gets
      `context` in place of the server parameters (FedNTD: the global
      model's logits on the client's examples, `client_logits`).
  """
  def client_update(server, client_state, data, client_id, num_examples,
                    rng):
    context = (server.params if prepare is None
               else prepare(server.params, data, client_id))
    params, sums = train_from(
        lambda p, batch: per_example_loss(p, context, batch),
        server.params, data, client_id, num_examples, rng, tx=tx,
        epochs=epochs, batch_size=batch_size)
    return delta_output(server.params, params, num_examples, client_state,
                        sums)

  return client_update


def stack_clients(x, y, parts) -> ClientData:
  """Lays a partition (one index array per client) out as `ClientData`.

  Args:
    x: [num_examples, ...] features (numpy).
    y: [num_examples] labels.
    parts: one index array per client.

  Returns:
    `ClientData` with numpy leaves.

  Raises:
    FedkdError: the parts hold 2^31 examples or more: the rows are
      numbered in int32 (offsets, and each local step's row indices),
      which would wrap.
  """
  total = sum(len(p) for p in parts)
  if total >= 2**31:
    raise FedkdError(f'{total:,} client examples: rows are numbered in '
                     'int32, so at most 2**31 - 1 fit; train on a subset')
  counts = np.array([len(p) for p in parts], np.int32)
  order = np.concatenate(parts).astype(np.int64)
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
  return ClientData(x=x[order], y=y[order].astype(np.int32), offsets=offsets,
                    num_examples=counts, max_examples=int(counts.max()))


def group_sizes(num_clients: int, groups: int) -> list[int]:
  """How many clients each group holds: group g has clients g, g + k, ..."""
  return [len(range(g, num_clients, groups)) for g in range(groups)]


def group_quota(num_clients: int, clients_per_round: int,
                groups: int) -> list[int]:
  """Each group's clients per round: proportional to its size, remainders to
  the largest fractions (then the lower group), so they add up."""
  sizes = group_sizes(num_clients, groups)
  exact = [clients_per_round * n / num_clients for n in sizes]
  quota = [int(e) for e in exact]
  by_fraction = sorted(range(groups), key=lambda g: (quota[g] - exact[g], g))
  for g in by_fraction[:clients_per_round - sum(quota)]:
    quota[g] += 1
  return quota


def inclusion_probability(num_clients: int, clients_per_round: int,
                          groups: int = 1) -> float:
  """The largest chance any client has of being in a round's cohort: its
  group's quota over its group's size (stratified sampling), which rounding
  the quotas can put above clients_per_round / num_clients. DP accounting
  must use this bound."""
  return max(q / n for q, n in zip(
      group_quota(num_clients, clients_per_round, groups),
      group_sizes(num_clients, groups)))


def sample_cohort(rng: np.random.Generator, num_clients: int,
                  clients_per_round: int, cohort_size: int,
                  groups: int = 1) -> Cohort:
  """Samples `clients_per_round` distinct clients, padded to `cohort_size`.

  With client groups, each group's `group_quota` is sampled from its own
  clients (stratified, so every round has the same mix of architectures)
  into slots g, g + k, ... (`algorithm.make_round`); `cohort_size` must be
  a multiple of `groups`.

  Raises:
    FedkdError: a cohort that does not fit: more clients a round than the
      federation has, or than `cohort_size` (each group's) slots hold.
  """
  if not 0 < clients_per_round <= num_clients:
    raise FedkdError(f'clients_per_round={clients_per_round} must be in [1, '
                     f'num_clients={num_clients}]')
  if cohort_size % groups:
    raise FedkdError(f'cohort_size={cohort_size} must be a multiple of the '
                     f'{groups} groups')
  quota = group_quota(num_clients, clients_per_round, groups)
  if max(quota) > cohort_size // groups:
    raise FedkdError(
        f'cohort_size={cohort_size} cannot hold clients_per_round='
        f'{clients_per_round} ({max(quota)} in a group of '
        f'{cohort_size // groups} slots); pass cohort_size >= '
        f'{max(quota) * groups}')
  ids = np.full((cohort_size // groups, groups), num_clients, np.int32)
  for g, count in enumerate(quota):
    members = np.arange(g, num_clients, groups)
    ids[:count, g] = np.sort(rng.choice(members, count, replace=False))
  ids = ids.reshape(-1)
  return Cohort(client_ids=ids, client_mask=ids < num_clients)
