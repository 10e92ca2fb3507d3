"""FedMD: Li & Wang, "FedMD: Heterogenous Federated Learning via Model
Distillation", NeurIPS 2019 Workshop on Federated Learning, arXiv:1910.03581.

No parameters are exchanged. Every client keeps its own model (stacked in
`ServerState.clients`); the server's state is the consensus: the mean over
the reporting clients (each weighs 1) of their logits on the shared public
data (`ClientData.public_x`, [P, K]), with a flag set once some client has
reported; a round in which nobody reports keeps the previous consensus
(`algorithm.adopt_reported`). One round, per client:

1. digest: `digest_epochs` passes over the public data regressing the
   consensus logits with the mean absolute error (the loss of the authors'
   code), skipped while there is no consensus yet;
2. revisit: `epochs` passes of cross-entropy on its private data;
3. upload its logits on the public data.

This is the paper's communicate / digest / revisit loop with each round's
upload moved to the end of the previous round, so one round is one
communication. Not implemented: the initial transfer learning on a labeled
public dataset (the public data here is unlabeled) and the per-round random
subset of the public data (all of it is used). Evaluation uses the clients'
own models.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedkd import algorithm
from fedkd import clients
from fedkd import communication
from fedkd import losses
from fedkd.typing import Params, PRNGKey


def fedmd(*, model: nn.Module, input_shape, num_clients: int,
          num_public: int, num_classes: int,
          client_tx: optax.GradientTransformation, epochs: int,
          batch_size: int, digest_epochs: int,
          public_batch_size: int) -> algorithm.FederatedAlgorithm:
  """Builds FedMD with one private `model` per client.

  Args:
    model: every client's model.
    input_shape: shape of one example, to initialise the models.
    num_clients: how many private models to keep.
    num_public: P, the number of public examples.
    num_classes: K.
    client_tx: the local optimizer (its state persists per client).
    epochs: revisit passes over each client's private data per round.
    batch_size: private minibatch size.
    digest_epochs: passes over the public data per round.
    public_batch_size: public minibatch size (digest and upload).
  """

  def init(params: Params, rng: PRNGKey) -> algorithm.ServerState:
    del params  # There is no global model: the global state is the consensus.
    return algorithm.server_init(
        optax.identity(), (jnp.zeros((num_public, num_classes)), jnp.zeros(())),
        clients.init_models(model, client_tx, input_shape, num_clients, rng))

  def client_update(server, client_state, data, client_id, num_examples,
                    rng):
    digest_rng, local_rng = jax.random.split(rng)
    consensus, has_consensus = server.params
    has_consensus = has_consensus > 0
    digest_loss = lambda params, batch: jnp.mean(jnp.abs(
        model.apply(params, batch.x) - consensus[batch.index]), axis=-1)
    digested, digest_sums = clients.public_training(
        clients.loss_step(digest_loss, client_tx, 'digest_loss_sum'),
        client_state, data.public_x, digest_rng, epochs=digest_epochs,
        batch_size=public_batch_size, work_fraction=data.work_fraction)
    state = clients.tree_where(has_consensus, digested, client_state)
    digest_sums = {k: v * has_consensus for k, v in digest_sums.items()}
    ce = lambda params, batch: losses.cross_entropy(
        model.apply(params, batch.x), batch.y)
    state, sums = clients.local_training(
        clients.loss_step(ce, client_tx, 'student_loss_sum'), state, data,
        client_id, num_examples, local_rng, epochs=epochs,
        batch_size=batch_size)
    logits = clients.predict_in_batches(model, state[0], data.public_x,
                                        batch_size=public_batch_size)
    return clients.ClientOutput(
        upload=(logits, jnp.ones(())), weight=jnp.ones(()), state=state,
        metrics=dict(sums, **digest_sums,
                     upload_bytes=communication.fixed(
                         1, algorithm.tree_bytes(logits))))

  def server_update(state, mean_upload, data, rng):
    state, metrics = algorithm.adopt_reported(state, mean_upload, data, rng)
    # The flag is the server's bookkeeping: clients receive the logits.
    return state, dict(metrics, download_bytes=communication.fixed(
        1, algorithm.tree_bytes(state.params[0])))

  return algorithm.build(init, client_update, server_update)
