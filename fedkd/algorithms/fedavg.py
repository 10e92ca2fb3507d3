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
import optax

from fedkd import algorithm
from fedkd import clients
from fedkd import losses
from fedkd.typing import Params, PRNGKey


def averaging(per_example_loss, *, client_tx: optax.GradientTransformation,
              server_tx: optax.GradientTransformation, epochs: int,
              batch_size: int, prepare=None) -> algorithm.FederatedAlgorithm:
  """The FedAvg family: local training on `per_example_loss`, FedOpt server.

  Args:
    per_example_loss: `(params, server_params, batch) -> [batch]` losses of
      the global model's local copy.
    client_tx: the local optimizer, fresh every round.
    server_tx: applied to the mean client delta (`optax.sgd(1.0)`: FedAvg).
    epochs: local passes over each client's data per round.
    batch_size: local minibatch size.
    prepare: `clients.delta_client_update`'s: what `per_example_loss` gets
      instead of the server parameters, computed once a round per client.
  """

  def init(params: Params, rng: PRNGKey) -> algorithm.ServerState:
    del rng  # The FedAvg family keeps no per-client state.
    return algorithm.server_init(server_tx, params)

  return algorithm.build(
      init, clients.delta_client_update(per_example_loss, tx=client_tx,
                                        epochs=epochs, batch_size=batch_size,
                                        prepare=prepare),
      algorithm.averaging_server_update(server_tx))


def fedavg(*, model: nn.Module, client_tx: optax.GradientTransformation,
           server_tx: optax.GradientTransformation, epochs: int,
           batch_size: int) -> algorithm.FederatedAlgorithm:
  """Builds FedAvg over `model` (the shared student)."""
  return averaging(
      lambda params, _, batch: losses.cross_entropy(
          model.apply(params, batch.x), batch.y),
      client_tx=client_tx, server_tx=server_tx, epochs=epochs,
      batch_size=batch_size)
