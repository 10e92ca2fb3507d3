"""Client-side execution: one client's code, mapped over a stacked cohort.

Client code is written for a single client. `map_clients` is the one `vmap`
over clients in fedkd; everything ragged (clients of different sizes, the last
partial batch, padded cohort slots) is handled with masks, so one compiled
round serves every cohort.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedkd.typing import Array, Params, PRNGKey, PyTree

CLIENTS_AXIS = 'clients'


class ClientData(struct.PyTreeNode):
  """Every client's examples, stored back to back.

  Flat storage keeps memory proportional to the number of examples, however
  skewed the client sizes (power-law or Dirichlet partitions); only the local
  step schedule is padded, to `max_examples`.

  Attributes:
    x: [total_examples, ...] features, client after client.
    y: [total_examples] integer labels.
    offsets: [num_clients] int32, the row where each client's examples start.
    num_examples: [num_clients] int32, how many rows each client has.
    max_examples: the largest client's size (static: it sets the number of
      local steps per epoch).
  """
  x: Array
  y: Array
  offsets: Array
  num_examples: Array
  max_examples: int = struct.field(pytree_node=False)

  @property
  def num_clients(self) -> int:
    return self.num_examples.shape[0]


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
  """One local step's minibatch of one client."""
  x: Array  # [batch, ...]
  y: Array  # [batch]
  example_mask: Array  # [batch], False for padding


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


def map_clients(fn: Callable[..., Any],
                num_shared: int = 0) -> Callable[..., Any]:
  """Maps one-client `fn` over a leading client axis (the vmap of fedkd).

  Args:
    fn: a function written for one client.
    num_shared: how many leading arguments are the same for every client
      (server model, stacked data, round rng); the rest are client-stacked.

  `spmd_axis_name` ties the mapped axis to the `clients` mesh axis, so under a
  sharded jit every per-client intermediate is split across devices too.
  """
  def mapped(*args):
    in_axes = (None,) * num_shared + (0,) * (len(args) - num_shared)
    return jax.vmap(fn, in_axes=in_axes, spmd_axis_name=CLIENTS_AXIS)(*args)
  return mapped


def local_batches(rng: PRNGKey, num_examples: Array, max_examples: int, *,
                  epochs: int, batch_size: int) -> tuple[Array, Array]:
  """Shuffled example indices for `epochs` passes over one client's data.

  Each epoch is a fresh permutation of the client's `num_examples` real rows
  followed by padding, cut into ceil(max_examples / batch_size) batches, so
  every client gets the same [steps, batch_size] shape whatever its size.

  Returns:
    (indices, example_mask), both [epochs * steps_per_epoch, batch_size].
  """
  steps_per_epoch = -(-max_examples // batch_size)
  slots = steps_per_epoch * batch_size
  position = jnp.arange(max_examples)

  def one_epoch(key):
    # Real rows get keys in [0, 1), padding sorts after them.
    keys = jnp.where(position < num_examples,
                     jax.random.uniform(key, (max_examples,)), 2.0)
    order = jnp.argsort(keys)
    return jnp.pad(order, (0, slots - max_examples))

  indices = jax.lax.map(one_epoch, jax.random.split(rng, epochs))
  mask = jnp.broadcast_to(jnp.arange(slots) < num_examples, (epochs, slots))
  shape = (epochs * steps_per_epoch, batch_size)
  return indices.reshape(shape), mask.reshape(shape)


def tree_where(condition: Array, new: PyTree, old: PyTree) -> PyTree:
  """Leafwise `jnp.where` with a scalar condition."""
  return jax.tree.map(lambda a, b: jnp.where(condition, a, b), new, old)


def local_training(step: Callable[[PyTree, Batch], tuple[PyTree, PyTree]],
                   carry: PyTree, data: ClientData, client_id: Array,
                   num_examples: Array, rng: PRNGKey, *, epochs: int,
                   batch_size: int) -> tuple[PyTree, PyTree]:
  """Runs `step` over one client's shuffled minibatches with `lax.scan`.

  A step whose batch is all padding keeps the carry unchanged, so clients of
  every size share one [steps, batch_size] schedule.

  Returns:
    The final carry and `step`'s second outputs summed over steps.
  """
  idx, mask = local_batches(rng, num_examples, data.max_examples,
                            epochs=epochs, batch_size=batch_size)
  last_row = data.x.shape[0] - 1

  def body(carry, step_idx_mask):
    step_idx, step_mask = step_idx_mask
    # Gathering each minibatch inside the step, not all steps up front, saves
    # materialising (and, under vmap, transposing) a copy of the client data.
    # Padding slots read some valid row; their mask is False.
    rows = jnp.minimum(data.offsets[client_id] + step_idx, last_row)
    batch = Batch(x=data.x[rows], y=data.y[rows], example_mask=step_mask)
    new_carry, out = step(carry, batch)
    return tree_where(step_mask.any(), new_carry, carry), out

  carry, outs = jax.lax.scan(body, carry, (idx, mask))
  return carry, jax.tree.map(lambda o: jnp.sum(o, axis=0), outs)


def sgd_train(loss_fn: Callable[..., tuple[Array, Any]],
              tx: optax.GradientTransformation, params: Params,
              opt_state: PyTree, *args) -> tuple[Params, PyTree, Array, Any]:
  """One optimizer step on `loss_fn(params, *args) -> (loss, aux)`."""
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *args)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss, aux


def delta_output(server_params: Params, params: Params, num_examples: Array,
                 state: PyTree, sums: dict[str, Array], *,
                 epochs: int) -> ClientOutput:
  """`ClientOutput` uploading the model delta, weighted by example count."""
  delta = jax.tree.map(jnp.subtract, params, server_params)
  metrics = dict(sums, train_examples=num_examples * epochs)
  return ClientOutput(upload=delta, weight=num_examples.astype(jnp.float32),
                      state=state, metrics=metrics)


def stack_clients(x, y, parts) -> ClientData:
  """Lays a partition (one index array per client) out as `ClientData`.

  Args:
    x: [num_examples, ...] features (numpy).
    y: [num_examples] labels.
    parts: one index array per client.

  Returns:
    `ClientData` with numpy leaves.
  """
  counts = np.array([len(p) for p in parts], np.int32)
  order = np.concatenate(parts).astype(np.int64)
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
  return ClientData(x=x[order], y=y[order].astype(np.int32), offsets=offsets,
                    num_examples=counts, max_examples=int(counts.max()))


def sample_cohort(rng: np.random.Generator, num_clients: int,
                  clients_per_round: int, cohort_size: int) -> Cohort:
  """Samples `clients_per_round` distinct clients, padded to `cohort_size`."""
  ids = np.full(cohort_size, num_clients, np.int32)
  ids[:clients_per_round] = np.sort(
      rng.choice(num_clients, clients_per_round, replace=False))
  return Cohort(client_ids=ids, client_mask=ids < num_clients)
