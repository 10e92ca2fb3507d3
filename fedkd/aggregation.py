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


def mean_from_sums(total: PyTree, weight: jax.Array) -> PyTree:
  """`total / weight` leafwise, from sums accumulated over clients or chunks.

  Padded clients carry weight 0, so they change neither numerator nor
  denominator; a round whose total weight is 0 gives zeros. `Summed` parts
  stay sums.
  """
  summed = lambda t: isinstance(t, Summed)
  return jax.tree.map(
      lambda t: t if summed(t) else t / jnp.maximum(weight, 1e-12).astype(
          t.dtype), total, is_leaf=summed)


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
