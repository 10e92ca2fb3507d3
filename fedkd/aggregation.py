"""How a cohort's uploads become the server's mean: the aggregator chain,
and the reductions over the leading client axis it runs on.

An `Aggregator` is one stage, as optax's `GradientTransformation` is one
stage of an update: `chain(compression.svd_stage(energy), mean())` is
FedKD's, `privacy.private(chain, dp)` the same with DP-FedAvg's clipping and
noise. Each stage may change one client's upload, its weight and the bytes
it really sends; the chain's last stage reduces the sums to means.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedkd import communication
from fedkd.typing import Array, Metrics, OptState, Params, PRNGKey, PyTree

Encoded = tuple[PyTree, Array, communication.Bytes, Metrics]


class Aggregator(NamedTuple):
  """One stage of the aggregator chain (see the module docstring).

  Attributes:
    encode: `(upload, weight, sent, round) -> (upload, weight, sent,
      metrics)` for ONE client, inside the vmapped round, on what its client
      update returned and before the weighted sum over clients: `sent` is
      the `communication.Bytes` the client uploads, which a compressing
      stage replaces; `metrics` are summed over the reporting clients.
    reduce: `(totals, weights, rng) -> means`, once per round, on each
      client group's weighted sum of uploads and sum of weights (tuples, one
      entry per group); None for a stage that only encodes.
  """
  encode: Callable[[PyTree, Array, communication.Bytes, Array], Encoded]
  reduce: Callable[[tuple[PyTree, ...], tuple[Array, ...], PRNGKey],
                   tuple[PyTree, ...]] | None = None


def chain(*stages: Aggregator) -> Aggregator:
  """The stages' encodes in order, then the last stage's reduce."""
  if not stages or stages[-1].reduce is None or any(
      s.reduce is not None for s in stages[:-1]):
    raise ValueError('an aggregator chain ends in its one reducing stage '
                     '(aggregation.mean() or privacy.private)')

  def encode(upload, weight, sent, round_index):
    metrics = {}
    for stage in stages:
      upload, weight, sent, more = stage.encode(upload, weight, sent,
                                                round_index)
      metrics.update(more)
    return upload, weight, sent, metrics

  return Aggregator(encode, stages[-1].reduce)


def mean(weighted: bool = True) -> Aggregator:
  """Each group's mean upload (`group_means`), clients weighted by their
  client update's weight (FedAvg's example counts) or, with `weighted=False`,
  all alike."""

  def encode(upload, weight, sent, round_index):
    del round_index  # The same every round.
    return upload, weight if weighted else jnp.ones_like(weight), sent, {}

  return Aggregator(encode, lambda totals, weights, rng: group_means(
      totals, weights))


def weighted_sum(tree: PyTree, weights: jax.Array) -> PyTree:
  """Sum over axis 0 of every leaf, each client's slice scaled by its weight."""
  return jax.tree.map(
      lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), tree)


class Summed(NamedTuple):
  """An upload part the server receives as the weighted sum, not the mean.

  Counts need it: a mean is the same for n clients as for 2n copies of them,
  so it cannot give back how many clients sent an entry. Not for DP rounds
  (their noised mean divides every leaf by the expected cohort).
  """
  value: PyTree


class Pooled(NamedTuple):
  """An upload part averaged over the round's clients of every client group
  together (logits and other messages that do not depend on a client's
  architecture); the other parts are averaged within each group. With one
  group, the plain mean.
  """
  value: PyTree


def _pooled(node) -> bool:
  return isinstance(node, (Summed, Pooled))


def group_means(totals: tuple[PyTree, ...],
                weights: tuple[jax.Array, ...]) -> tuple[PyTree, ...]:
  """Each client group's mean upload, from sums over clients or chunks.

  A part is `total / weight` of its group, `Pooled` parts the sum over all
  groups by the total weight, `Summed` parts the sum over all groups. Padded
  clients carry weight 0, so they change neither numerator nor denominator;
  a zero total weight gives zeros.

  Args:
    totals: per group, the weighted sum of its clients' uploads.
    weights: per group, the sum of its clients' weights.
  """
  div = lambda tree, w: jax.tree.map(
      lambda t: t / jnp.maximum(w, 1e-12).astype(t.dtype), tree)
  flat = [jax.tree.flatten(total, is_leaf=_pooled) for total in totals]
  shared = [[node for node in leaves if _pooled(node)] for leaves, _ in flat]
  if len({jax.tree.structure(nodes) for nodes in shared}) > 1:
    raise ValueError('the Pooled and Summed upload parts of every client '
                     'group must have the same types and shapes')
  combined = [
      n._replace(value=div(n.value, sum(weights))) if isinstance(n, Pooled)
      else n for n in jax.tree.map(lambda *xs: sum(xs), *shared)]
  means = []
  for (leaves, treedef), w in zip(flat, weights):
    nodes = iter(combined)
    means.append(treedef.unflatten(
        [next(nodes) if _pooled(leaf) else div(leaf, w) for leaf in leaves]))
  return tuple(means)


def server_updates(params: Params, opt_state: OptState, mean_delta: Params,
                   tx: optax.GradientTransformation) -> tuple[Params, OptState]:
  """FedOpt (Reddi et al. 2021): the averaged client delta is -gradient.

  Returns:
    (the update to add to `params`, the new optimizer state); with
    `optax.sgd(1.0)` the update is `mean_delta` itself.
  """
  pseudo_grad = jax.tree.map(jnp.negative, mean_delta)
  return tx.update(pseudo_grad, opt_state, params)


def server_step(params: Params, opt_state: OptState, mean_delta: Params,
                tx: optax.GradientTransformation) -> tuple[Params, OptState]:
  """`server_updates` applied. With `optax.sgd(1.0)` this is FedAvg's plain
  weighted average of client models."""
  updates, opt_state = server_updates(params, opt_state, mean_delta, tx)
  return optax.apply_updates(params, updates), opt_state
