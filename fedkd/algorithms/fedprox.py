"""FedProx: Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith, "Federated
Optimization in Heterogeneous Networks", MLSys 2020, arXiv:1812.06127.

FedAvg whose local objective adds the proximal term `mu / 2 * ||w - w_t||^2`
to every example's cross-entropy (so to the minibatch mean), with `w_t` the
global model the round started from. `mu = 0` is FedAvg. Any server optimizer
applies to the mean delta (FedOpt). The config's default `prox_mu = 1` is the
paper's best value on its Synthetic and MNIST data (grid {0.001, 0.01, 0.1,
1}) and FedNTD's official FedProx baseline (`config/fedprox.json`).

Difference from the paper: its inexact local solver runs a fixed number of
epochs; the paper's stragglers run fewer, which `straggler_rate` simulates.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedkd import algorithm
from fedkd import losses
from fedkd.algorithms.fedavg import averaging


def _squared_distance(a, b):
  return sum(jnp.sum(jnp.square(x - y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def fedprox(*, model: nn.Module, mu: float,
            client_tx: optax.GradientTransformation,
            server_tx: optax.GradientTransformation, epochs: int,
            batch_size: int) -> algorithm.FederatedAlgorithm:
  """Builds FedProx over `model` with proximal coefficient `mu`."""

  def per_example_loss(params, server_params, batch):
    ce = losses.cross_entropy(model.apply(params, batch.x), batch.y)
    return ce + 0.5 * mu * _squared_distance(params, server_params)

  return averaging(per_example_loss, client_tx=client_tx,
                   server_tx=server_tx, epochs=epochs, batch_size=batch_size)
