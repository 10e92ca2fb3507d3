"""Server-side reductions over the leading client axis of a cohort."""

import jax
import jax.numpy as jnp
import optax

from fedkd.typing import OptState, Params, PyTree


def weighted_sum(tree: PyTree, weights: jax.Array) -> PyTree:
  """Sum over axis 0 of every leaf, each client's slice scaled by its weight."""
  return jax.tree.map(
      lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), tree)


def weighted_mean(tree: PyTree, weights: jax.Array) -> PyTree:
  """Weighted mean over axis 0; a cohort of zero total weight gives zeros.

  Padded clients carry weight 0, so they change neither numerator nor
  denominator.
  """
  total = jnp.sum(weights)
  return jax.tree.map(lambda s: s / jnp.maximum(total, 1e-12).astype(s.dtype),
                      weighted_sum(tree, weights))


def server_step(params: Params, opt_state: OptState, mean_delta: Params,
                tx: optax.GradientTransformation) -> tuple[Params, OptState]:
  """FedOpt (Reddi et al. 2021): the averaged client delta is -gradient.

  With `optax.sgd(1.0)` this is FedAvg's plain weighted average of client
  models.
  """
  pseudo_grad = jax.tree.map(jnp.negative, mean_delta)
  updates, opt_state = tx.update(pseudo_grad, opt_state, params)
  return optax.apply_updates(params, updates), opt_state
