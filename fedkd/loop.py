"""Per-client Python-loop execution, the way FedJAX-style simulators run.

The same one-client function the vmapped round maps is jitted for a single
client and called once per cohort slot. This is the reference the vmapped
round is tested against, and baseline (b) of `experiments/benchmark.py`.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fedkd import algorithm


def python_map(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Like `clients.map_clients`, but a Python loop over jitted calls."""
  jitted = jax.jit(fn)

  def mapped(shared, *stacked):
    size = jax.tree.leaves(stacked)[0].shape[0]
    outs = [jitted(shared, *jax.tree.map(lambda a, i=i: a[i], stacked))
            for i in range(size)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

  return mapped


def loop_apply(alg: algorithm.FederatedAlgorithm):
  """`alg.apply` with clients run one at a time (call it unjitted)."""
  return algorithm.with_round(alg, map_fn=python_map).apply
