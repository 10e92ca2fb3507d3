"""FedAvg: McMahan, Moore, Ramage, Hampson & Aguera y Arcas, "Communication-
Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017,
arXiv:1602.05629.

Each client runs `epochs` passes of minibatch training of the global model on
its cross-entropy; the server takes the example-weighted mean of the client
deltas through a server optimizer (`optax.sgd(1.0)` is the paper's plain
average; others give FedOpt, Reddi et al., ICLR 2021). Only the student model
is used: this is the baseline the distillation algorithms are measured against.
"""

import flax.linen as nn
import jax.numpy as jnp
import optax

from fedkd import algorithm
from fedkd import clients
from fedkd import losses
from fedkd.typing import Params, PRNGKey


def fedavg(*, model: nn.Module, client_tx: optax.GradientTransformation,
           server_tx: optax.GradientTransformation, epochs: int,
           batch_size: int) -> algorithm.FederatedAlgorithm:
  """Builds FedAvg over `model` (the shared student)."""

  def init(params: Params, rng: PRNGKey) -> algorithm.ServerState:
    del rng  # FedAvg keeps no per-client state.
    return algorithm.server_init(server_tx, params)

  def loss_fn(params, batch):
    per_example = losses.cross_entropy(model.apply(params, batch.x), batch.y)
    return losses.masked_mean(per_example, batch.example_mask), per_example

  def client_update(server_params, client_state, data, client_id,
                    num_examples, rng):
    def step(carry, batch):
      params, opt_state, _, per_example = clients.sgd_train(
          loss_fn, client_tx, *carry, batch)
      return (params, opt_state), {
          'student_loss_sum': jnp.sum(per_example * batch.example_mask)}

    (params, _), sums = clients.local_training(
        step, (server_params, client_tx.init(server_params)), data,
        client_id, num_examples, rng, epochs=epochs, batch_size=batch_size)
    return clients.delta_output(server_params, params, num_examples,
                                client_state, sums, epochs=epochs)

  return algorithm.build(init, client_update,
                         algorithm.averaging_server_update(server_tx))
