"""FD (federated distillation, "FedDistill"): Jeong, Oh, Kim, Park, Bennis &
Kim, "Communication-Efficient On-Device Machine Learning: Federated
Distillation and Augmentation under Non-IID Private Data", NeurIPS 2018
Workshop on Machine Learning on the Phone and other Consumer Devices,
arXiv:1811.11479.

No parameters are exchanged. Every client keeps its own model (stacked in
`ServerState.clients`) and, during local training, accumulates the logits it
produced for each label (before each step's update); it uploads the per-label
mean logits [K, K] and a [K] presence indicator. The server's state is the
global table: the mean over the reporting clients of their per-label means,
per label over the clients that saw it (each client weighs 1, so the ratio of
the averaged table and presence is that mean). A label no reporting client
saw keeps its previous entry (`algorithm.adopt_reported`), so partial
participation and dropped rounds do not wipe it.

Local loss per example: `(1 - w) * CE + w * T^2 * KL(softmax(g_y / T) ||
softmax(student / T))`, with `g_y` the global mean logits of the example's
label (teacher, a constant); examples whose label no client reported yet get
CE only. Unlike the paper, a client's own contribution is not subtracted from
the global table. Evaluation uses the clients' own models.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedkd import algorithm
from fedkd import clients
from fedkd import losses
from fedkd.typing import Params, PRNGKey


def fd(*, model: nn.Module, input_shape, num_clients: int, num_classes: int,
       client_tx: optax.GradientTransformation, epochs: int, batch_size: int,
       temperature: float, distill_weight: float
       ) -> algorithm.FederatedAlgorithm:
  """Builds FD with one private `model` per client.

  Args:
    model: every client's model.
    input_shape: shape of one example, to initialise the models.
    num_clients: how many private models to keep.
    num_classes: K, the size of the logit table.
    client_tx: the local optimizer (its state persists per client).
    epochs: local passes over each client's data per round.
    batch_size: local minibatch size.
    temperature: distillation temperature T.
    distill_weight: w, the weight of the distillation term.
  """

  def init(params: Params, rng: PRNGKey) -> algorithm.ServerState:
    del params  # There is no global model: the global state is the table.
    table = (jnp.zeros((num_classes, num_classes)), jnp.zeros(num_classes))
    return algorithm.server_init(optax.identity(), table, clients.init_models(
        model, client_tx, input_shape, num_clients, rng))

  def loss_fn(params, batch, targets, has_target):
    logits = model.apply(params, batch.x)
    kd = losses.distillation(logits, targets[batch.y], temperature)
    per_example = ((1.0 - distill_weight) * losses.cross_entropy(
        logits, batch.y) + distill_weight * has_target[batch.y] * kd)
    return (losses.masked_mean(per_example, batch.example_mask),
            (per_example, logits))

  def client_update(server, client_state, data, client_id, num_examples,
                    rng):
    table, presence = server.params
    targets = table / jnp.maximum(presence, 1e-12)[:, None]

    def step(carry, batch):
      params, opt_state, _, (per_example, logits) = clients.sgd_train(
          loss_fn, client_tx, *carry, batch, targets, presence > 0)
      onehot = (jax.nn.one_hot(batch.y, num_classes) *
                batch.example_mask[:, None])
      return (params, opt_state), {
          'student_loss_sum': jnp.sum(per_example * batch.example_mask),
          'label_logits': onehot.T @ logits, 'label_counts': onehot.sum(0)}

    state, sums = clients.local_training(
        step, client_state, data, client_id, num_examples, rng,
        epochs=epochs, batch_size=batch_size)
    counts = sums.pop('label_counts')
    means = sums.pop('label_logits') / jnp.maximum(counts, 1.0)[:, None]
    seen = (counts > 0).astype(jnp.float32)
    return clients.ClientOutput(
        upload=(means * seen[:, None], seen), weight=jnp.ones(()),
        state=state, metrics=sums)

  return algorithm.build(init, client_update, algorithm.adopt_reported)
