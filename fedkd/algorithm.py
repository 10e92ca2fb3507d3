"""`FederatedAlgorithm` and the generic round every algorithm shares.

An algorithm is a factory that closes over its hyperparameters and returns
pure functions (like optax's `GradientTransformation`):

* `init(params, rng) -> ServerState`
* `apply(state, data, cohort, rng) -> (state, metrics)`: one round, to be
  jitted once by the caller;
* `client_update(server_params, client_state, data, client_id, num_examples,
  rng) -> ClientOutput` for ONE client, which `apply` maps over the cohort;
* `server_update(state, mean_upload) -> state`.

`client_update` and `server_update` are exposed so the per-client Python loop
(`fedkd.loop`) runs the very same code the vmapped round runs.
"""

from collections.abc import Callable
import functools
from typing import NamedTuple

from flax import struct
import jax
import jax.numpy as jnp

from fedkd import aggregation
from fedkd.clients import ClientData, ClientOutput, Cohort, map_clients
from fedkd.typing import Array, Metrics, OptState, Params, PRNGKey, PyTree


class ServerState(struct.PyTreeNode):
  """Everything that persists between rounds.

  Attributes:
    params: the global (shared) model.
    opt_state: the server optimizer's state.
    round: number of rounds applied so far.
    clients: per-client persistent state stacked over all clients
      ([num_clients, ...] leaves, e.g. private teachers); `()` when none.
  """
  params: Params
  opt_state: OptState
  round: Array
  clients: PyTree


ClientUpdate = Callable[..., ClientOutput]
ServerUpdate = Callable[[ServerState, PyTree], ServerState]
MapFn = Callable[[Callable[..., ClientOutput]], Callable[..., ClientOutput]]


class FederatedAlgorithm(NamedTuple):
  init: Callable[[Params, PRNGKey], ServerState]
  apply: Callable[[ServerState, ClientData, Cohort, PRNGKey],
                  tuple[ServerState, Metrics]]
  client_update: ClientUpdate
  server_update: ServerUpdate


def _tree_bytes(tree: PyTree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _one_client(client_update: ClientUpdate, server_params, data, rng,
                client_id, num_examples, client_state) -> ClientOutput:
  # Client randomness depends on (round rng, client id) only, never on the
  # client's slot in the cohort or on the device layout.
  return client_update(server_params, client_state, data, client_id,
                       num_examples, jax.random.fold_in(rng, client_id))


def make_round(client_update: ClientUpdate, server_update: ServerUpdate, *,
               map_fn: MapFn = map_clients):
  """Builds `apply`: run the cohort's clients, average uploads, update server.

  Args:
    client_update: one client's local round.
    server_update: turns the weighted-mean upload into the next server state.
    map_fn: how a one-client function of `(server_params, data, rng,
      client_id, num_examples, client_state)` is mapped over the last three
      (stacked) arguments: `map_clients` (vmap, the default) or a per-client
      loop (`fedkd.loop.python_map`) for reference runs.

  Returns:
    `apply(state, data, cohort, rng) -> (state, metrics)`.
  """

  mapped = map_fn(functools.partial(_one_client, client_update), 3)

  def apply(state: ServerState, data: ClientData, cohort: Cohort,
            rng: PRNGKey) -> tuple[ServerState, Metrics]:
    # Padded slots read client num_clients - 1's rows but train on 0 examples.
    ids = jnp.minimum(cohort.client_ids, data.num_clients - 1)
    num_examples = jnp.where(cohort.client_mask, data.num_examples[ids], 0)
    cohort_states = jax.tree.map(lambda s: s[ids], state.clients)
    out = mapped(state.params, data, rng, ids, num_examples, cohort_states)
    weights = out.weight * cohort.client_mask
    new_state = server_update(
        state, aggregation.weighted_mean(out.upload, weights))
    clients = jax.tree.map(
        lambda s, new: s.at[cohort.client_ids].set(new, mode='drop'),
        state.clients, out.state)
    num_reporting = jnp.sum(cohort.client_mask)
    upload = jax.tree.map(lambda u: u[0], out.upload)
    metrics = {name: jnp.sum(jnp.where(cohort.client_mask, value, 0))
               for name, value in out.metrics.items()}
    metrics['clients'] = num_reporting
    metrics['upload_bytes'] = num_reporting * _tree_bytes(upload)
    metrics['download_bytes'] = num_reporting * _tree_bytes(state.params)
    return new_state.replace(clients=clients, round=state.round + 1), metrics

  return apply


def averaging_server_update(tx) -> ServerUpdate:
  """Server update for algorithms whose upload is the model delta (FedOpt)."""

  def server_update(state: ServerState, mean_delta: Params) -> ServerState:
    params, opt_state = aggregation.server_step(
        state.params, state.opt_state, mean_delta, tx)
    return state.replace(params=params, opt_state=opt_state)

  return server_update


def build(init, client_update: ClientUpdate,
          server_update: ServerUpdate) -> FederatedAlgorithm:
  """Assembles a `FederatedAlgorithm` around the generic vmapped round."""
  return FederatedAlgorithm(
      init=init, apply=make_round(client_update, server_update),
      client_update=client_update, server_update=server_update)


def server_init(tx, params: Params, clients: PyTree = ()) -> ServerState:
  """A round-0 `ServerState` for global `params` and stacked client state."""
  return ServerState(params=params, opt_state=tx.init(params),
                     round=jnp.zeros((), jnp.int32), clients=clients)

