"""Server-side reductions over the leading client axis of a cohort."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedkd.typing import OptState, Params, PyTree


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
