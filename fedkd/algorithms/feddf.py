"""FedDF: Lin, Kong, Stich & Jaggi, "Ensemble Distillation for Robust Model
Fusion in Federated Learning", NeurIPS 2020, arXiv:2006.07242.

Clients train the global model on cross-entropy as in FedAvg and upload their
parameters (the delta). The server averages them (through the server
optimizer, FedOpt), then distills the ensemble of the client models into the
averaged model on unlabeled proxy data (`ClientData.public_x`): `distill_epochs`
passes of `distill_tx` steps on `T^2 * KL(softmax(ensemble / T) ||
softmax(global / T))`, the ensemble's mean logits detached (the paper: T = 1,
Adam at 1e-3, early stopping on a validation set, which is not implemented).

The ensemble's mean logits are the example-weighted mean of the client models'
logits on the proxy data (the paper averages uniformly). In this simulation
each client computes its model's proxy logits and they are averaged with the
deltas; only the parameters count as uploaded bytes, since the real server
would evaluate the received models itself.

Not implemented: a server model of another architecture than the clients'
(the paper's heterogeneous setting).
"""

import flax.linen as nn
import jax.numpy as jnp
import optax

from fedkd import aggregation
from fedkd import algorithm
from fedkd import clients
from fedkd import losses
from fedkd.typing import Params, PRNGKey


def feddf(*, model: nn.Module, client_tx: optax.GradientTransformation,
          server_tx: optax.GradientTransformation,
          distill_tx: optax.GradientTransformation, epochs: int,
          batch_size: int, distill_epochs: int, public_batch_size: int,
          temperature: float) -> algorithm.FederatedAlgorithm:
  """Builds FedDF over `model` (clients' and server's).

  Args:
    model: the global model every client trains.
    client_tx: the local optimizer, fresh every round.
    server_tx: applied to the mean client delta before distillation.
    distill_tx: the server's distillation optimizer, fresh every round.
    epochs: local passes over each client's data per round.
    batch_size: local minibatch size.
    distill_epochs: server passes over the proxy data per round.
    public_batch_size: proxy minibatch size (logits and distillation).
    temperature: distillation temperature T.
  """

  def init(params: Params, rng: PRNGKey) -> algorithm.ServerState:
    del rng  # FedDF keeps no per-client state.
    return algorithm.server_init(server_tx, params)

  ce = lambda params, batch: losses.cross_entropy(
      model.apply(params, batch.x), batch.y)

  def client_update(server, client_state, data, client_id, num_examples,
                    rng):
    params, sums = clients.train_from(
        ce, server.params, data, client_id, num_examples, rng, tx=client_tx,
        epochs=epochs, batch_size=batch_size)
    out = clients.delta_output(server.params, params, num_examples,
                               client_state, sums, epochs=epochs)
    logits = clients.predict_in_batches(model, params, data.public_x,
                                        batch_size=public_batch_size)
    return out._replace(
        upload=dict(delta=out.upload, logits=logits),
        metrics=dict(out.metrics,
                     upload_bytes=jnp.int32(algorithm.tree_bytes(out.upload))))

  def server_update(state, mean_upload, data, rng):
    params, opt_state = aggregation.server_step(
        state.params, state.opt_state, mean_upload['delta'], server_tx)
    ensemble = mean_upload['logits']
    kd = lambda p, batch: losses.distillation(
        model.apply(p, batch.x), ensemble[batch.index], temperature)
    (params, _), sums = clients.public_training(
        clients.loss_step(kd, distill_tx, 'server_distill_loss_sum'),
        (params, distill_tx.init(params)), data.public_x, rng,
        epochs=distill_epochs, batch_size=public_batch_size)
    num_public = data.public_x.shape[0]
    metrics = {'server_distill_loss':
               sums['server_distill_loss_sum'] / (distill_epochs * num_public)}
    return state.replace(params=params, opt_state=opt_state), metrics

  return algorithm.build(init, client_update, server_update)
