"""FedMD: Li & Wang, "FedMD: Heterogenous Federated Learning via Model
Distillation", NeurIPS 2019 Workshop on Federated Learning, arXiv:1910.03581.

No parameters are exchanged. Every client keeps its own model (stacked in
`ServerState.clients`; with k architectures, client i's is `model[i % k]`, the
paper's heterogeneous setting). The server's state is the consensus: the mean
over reporting clients (each weighs 1, all architectures together) of their
logits on the public data (`ClientData.public_x`, [P, K]), and a flag set once
some client reported; a round without reports keeps both (`adopt_reported`).

Before the collaboration, `init` runs the paper's transfer learning on every
client (given the data): `transfer_epochs` passes of cross-entropy on the
labelled public data (`ClientData.public_y`), then `private_epochs` on its
private data (official code: 20 epochs, batch 128, then 25, batch 32). A
round, per client: 1. digest: `digest_epochs` passes over the public data
regressing the consensus with the mean absolute error (the authors' loss),
skipped while there is none; 2. revisit: `epochs` passes of cross-entropy on
its private data; 3. upload its logits on the public data.

This is the paper's communicate / digest / revisit loop, each upload moved
to the end of the previous round (one round, one communication). Evaluation
uses the clients' models. Differences from the official code (diogenes0319/
FedMD_clean): the transfer phase uses the clients' optimizer and batch sizes
(official: Adam at 1e-3), no early stopping on test accuracy; the public
data, held out of the private dataset, is used whole every round.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedkd import aggregation
from fedkd import algorithm
from fedkd import clients
from fedkd import communication
from fedkd import losses
from fedkd.typing import Params, PRNGKey


def fedmd(*, model: nn.Module | Sequence[nn.Module], input_shape,
          num_clients: int, num_public: int, num_classes: int,
          client_tx: optax.GradientTransformation, epochs: int,
          batch_size: int, digest_epochs: int, public_batch_size: int,
          transfer_epochs: int = 0,
          private_epochs: int = 0) -> algorithm.FederatedAlgorithm:
  """Builds FedMD with one private `model` per client.

  Args:
    model: every client's model, or one per architecture (client i's is
      `model[i % k]`).
    input_shape: shape of one example, to initialise the models.
    num_clients: how many private models to keep.
    num_public: P, the number of public examples.
    num_classes: K.
    client_tx: the local optimizer (its state persists per client).
    epochs: revisit passes over each client's private data per round.
    batch_size: private minibatch size.
    digest_epochs: passes over the public data per round.
    public_batch_size: public minibatch size (digest and upload).
    transfer_epochs: transfer-learning passes over the labelled public data.
    private_epochs: then transfer-learning passes over the private data.
  """
  models = algorithm.groups_of(model)
  k = len(models)
  train_ce = lambda model: clients.loss_step(
      lambda params, batch: losses.cross_entropy(model.apply(params, batch.x),
                                                 batch.y),
      client_tx, 'student_loss_sum')

  def transfer(model, data, rng, client_id, client_state, own_rows):
    """One client's transfer learning: public labels, then private data
    (`own_rows`: its `ClientData.cohort_rows`)."""
    data = data.own(own_rows)
    public_rng, private_rng = jax.random.split(
        jax.random.fold_in(rng, client_id))
    state, _ = clients.public_training(
        train_ce(model), client_state, data.public_x, public_rng,
        epochs=transfer_epochs, batch_size=public_batch_size,
        public_y=data.public_y)
    state, _ = clients.local_training(
        train_ce(model), state, data, client_id, data.num_examples[client_id],
        private_rng, epochs=private_epochs, batch_size=batch_size)
    return state

  def init(params: Params, rng: PRNGKey,
           data: clients.ClientData | None = None) -> algorithm.ServerState:
    """Round 0's state, after the transfer learning (which needs `data`)."""
    del params  # There is no global model: the global state is the consensus.
    model_rng, transfer_rng = jax.random.split(rng)
    if (transfer_epochs or private_epochs) and (
        data is None or data.public_y.shape != (num_public,)):
      raise ValueError(
          'fedmd transfer learning needs the data with the public labels: '
          f'init(params, rng, data) with public_y of shape ({num_public},)')

    def group_state(g, model):
      state = clients.init_models(model, client_tx, input_shape, num_clients,
                                  model_rng, group=g, groups=k)
      if transfer_epochs or private_epochs:
        ids = jnp.arange(g, num_clients, k)
        # Split examples are gathered once, as a round gathers its cohort's,
        # not each step's batch across devices.
        state = clients.map_clients(
            lambda shared, *own: transfer(model, *shared, *own))(
                (data, transfer_rng), ids, state, data.cohort_rows(ids))
      return state

    return algorithm.server_init(
        optax.identity(), (jnp.zeros((num_public, num_classes)), jnp.zeros(())),
        algorithm.per_group([group_state(g, m) for g, m in enumerate(models)]))

  def client_update_of(model):
    """One client's round with `model`."""

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
      digest_sums = jax.tree.map(lambda v: v * has_consensus, digest_sums)
      state, sums = clients.local_training(
          train_ce(model), state, data, client_id, num_examples, local_rng,
          epochs=epochs, batch_size=batch_size)
      logits = clients.predict_in_batches(model, state[0], data.public_x,
                                          batch_size=public_batch_size)
      # The flag says that this client reported; only the logits are sent.
      return clients.ClientOutput(
          upload=aggregation.Pooled((logits, jnp.ones(()))),
          weight=jnp.ones(()), state=state, metrics=dict(
              sums, **digest_sums, upload_bytes=communication.fixed(
                  1, algorithm.tree_bytes(logits))))

    return client_update

  def server_update(state, mean_upload, data, rng):
    state, metrics = algorithm.adopt_reported(
        state, algorithm.pooled(mean_upload, k), data, rng)
    # The flag is the server's bookkeeping: clients receive the logits.
    return state, dict(metrics, download_bytes=communication.fixed(
        1, algorithm.tree_bytes(state.params[0])))

  return algorithm.build(init, algorithm.per_group(
      [client_update_of(m) for m in models]), server_update)
