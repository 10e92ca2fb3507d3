"""FedNTD: Lee, Jeong, Kim, Yun & Park, "Preservation of the Global Knowledge
by Not-True Distillation in Federated Learning", NeurIPS 2022,
arXiv:2106.03097.

FedAvg whose local loss is `CE(local, y) + beta * NTD(global, local)`: the
not-true distillation (`losses.not_true_distillation`) runs from the frozen
global model of the round start (teacher, detached) to the local model
(student) over the classes other than the label, KL(global || local) at
temperature T with the T^2 factor of the authors' code
(github.com/Lee-Gihun/FedNTD, `algorithms/fedntd/criterion.py`: KL with
'batchmean' reduction, the global model's logits under `no_grad`). The paper's
and `config/fedntd.json`'s values, tau = 1 and beta = 1, are the config's
defaults (`ntd_tau`, `ntd_beta`). That config also trains locally with SGD
momentum 0.9 and weight decay 1e-5 and decays the local learning rate by 0.99
a round; here the client optimizer is the run's (`client_optimizer`).
"""

import flax.linen as nn
import optax

from fedkd import algorithm
from fedkd import losses
from fedkd.algorithms.fedavg import averaging


def fedntd(*, model: nn.Module, beta: float, temperature: float,
           client_tx: optax.GradientTransformation,
           server_tx: optax.GradientTransformation, epochs: int,
           batch_size: int) -> algorithm.FederatedAlgorithm:
  """Builds FedNTD over `model`."""

  def per_example_loss(params, server_params, batch):
    logits = model.apply(params, batch.x)
    global_logits = model.apply(server_params, batch.x)
    return (losses.cross_entropy(logits, batch.y) + beta *
            losses.not_true_distillation(logits, global_logits, batch.y,
                                         temperature))

  return averaging(per_example_loss, client_tx=client_tx,
                   server_tx=server_tx, epochs=epochs, batch_size=batch_size)
