"""FD (federated distillation, "FedDistill"): Jeong, Oh, Kim, Park, Bennis &
Kim, "Communication-Efficient On-Device Machine Learning: Federated
Distillation and Augmentation under Non-IID Private Data", NeurIPS 2018
Workshop on Machine Learning on the Phone and other Consumer Devices,
arXiv:1811.11479.

No parameters are exchanged. Every client keeps its own model (stacked in
`ServerState.clients`; with k architectures, client i's is `model[i % k]`,
one table for all) and, during local training, accumulates the logits it
produced for each label (before each step's update); it uploads the per-label
mean logits [K, K] and a [K] presence indicator. The server receives them
summed over the reporting clients (`aggregation.Summed`), so its table holds,
per label, the sum of the clients' means, how many clients sent one, and the
round they were sent in. A label no reporting client saw keeps its entry
(`algorithm.adopt_reported`), so partial participation and dropped rounds do
not wipe it.

As in the paper's Algorithm 1, a client distils toward the average of the
other clients, its own logits excluded: `(sum - own) / (count - 1)` where the
entry holds its own upload, no target where it sent the entry alone, and
`sum / count` where the entry is from a round in which it did not report the
label. To tell which, every client keeps per label its last uploaded mean and
that upload's round: its upload is in the entry exactly when the rounds match.

Local loss per example: `(1 - w) * CE + w * T^2 * KL(softmax(g_y / T) ||
softmax(student / T))`, with `g_y` the target of the example's label (a
constant); examples whose label has no target get the CE term alone, `(1 - w)
* CE` (not rescaled to CE). Evaluation uses the clients' own models.

Where this differs from the paper, whose devices all report every round:
cohorts, dropouts and labels only one client holds are handled as above, and
the exclusion runs on the client, so a sampled client downloads K x K logit
sums plus K counts and K rounds, where the paper's payload is K x K logits
(its Table 1).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedkd import aggregation
from fedkd import algorithm
from fedkd import clients
from fedkd import losses
from fedkd.typing import Params, PRNGKey


def fd(*, model: nn.Module | Sequence[nn.Module], input_shape,
       num_clients: int, num_classes: int,
       client_tx: optax.GradientTransformation, epochs: int, batch_size: int,
       temperature: float, distill_weight: float
       ) -> algorithm.FederatedAlgorithm:
  """Builds FD with one private `model` per client.

  Args:
    model: every client's model, or one per client group (client i trains
      `model[i % k]`; the logit table is the same for all).
    input_shape: shape of one example, to initialise the models.
    num_clients: how many private models to keep.
    num_classes: K, the size of the logit table.
    client_tx: the local optimizer (its state persists per client).
    epochs: local passes over each client's data per round.
    batch_size: local minibatch size.
    temperature: distillation temperature T.
    distill_weight: w, the weight of the distillation term.
  """
  models = algorithm.groups_of(model)

  def init(params: Params, rng: PRNGKey) -> algorithm.ServerState:
    del params  # There is no global model: the global state is the table.
    table = ((jnp.zeros((num_classes, num_classes)),
              jnp.zeros(num_classes, jnp.int32)), jnp.zeros(num_classes))

    def group_state(g, m):
      private = clients.init_models(m, client_tx, input_shape, num_clients,
                                    rng, group=g, groups=len(models))
      n = clients.group_sizes(num_clients, len(models))[g]
      # Entries start at round 0 with count 0, own uploads at round -1:
      # none of them is in an entry yet.
      own = (jnp.zeros((n, num_classes, num_classes)),
             jnp.full((n, num_classes), -1, jnp.int32))
      return (*private, own)

    return algorithm.server_init(optax.identity(), table, algorithm.per_group(
        [group_state(g, m) for g, m in enumerate(models)]))

  def client_update_of(model):
    """One client's round with `model`."""

    def loss_fn(params, batch, targets, has_target):
      logits = model.apply(params, batch.x)
      kd = losses.distillation(logits, targets[batch.y], temperature)
      per_example = ((1.0 - distill_weight) * losses.cross_entropy(
          logits, batch.y) + distill_weight * has_target[batch.y] * kd)
      return (losses.masked_mean(per_example, batch.example_mask),
              (per_example, logits))

    def client_update(server, client_state, data, client_id, num_examples,
                      rng):
      (sums, rounds), counts = server.params
      params, opt_state, (own, own_rounds) = client_state
      # 1 where the entry holds this client's upload (module docstring).
      mine = (own_rounds == rounds).astype(sums.dtype)
      others = counts - mine
      targets = (sums - mine[:, None] * own) / jnp.maximum(others,
                                                           1.0)[:, None]

      def step(carry, batch):
        params, opt_state, _, (per_example, logits) = clients.sgd_train(
            loss_fn, client_tx, *carry, batch, targets, others > 0)
        onehot = (jax.nn.one_hot(batch.y, num_classes) *
                  batch.example_mask[:, None])
        return (params, opt_state), {
            'student_loss_sum': jnp.sum(per_example * batch.example_mask),
            'label_logits': onehot.T @ logits, 'label_counts': onehot.sum(0)}

      (params, opt_state), metrics = clients.local_training(
          step, (params, opt_state), data, client_id, num_examples, rng,
          epochs=epochs, batch_size=batch_size)
      label_counts = metrics.pop('label_counts')
      seen = label_counts > 0
      means = metrics.pop('label_logits') / jnp.maximum(label_counts,
                                                        1.0)[:, None]
      kept = (jnp.where(seen[:, None], means, own),
              jnp.where(seen, server.round, own_rounds))
      # Summed, not averaged: the server needs each label's client count.
      return clients.ClientOutput(
          upload=aggregation.Summed((means, seen.astype(jnp.float32))),
          weight=jnp.ones(()), state=(params, opt_state, kept),
          metrics=metrics)

    return client_update

  def server_update(state, upload, data, rng):
    logit_sums, counts = algorithm.pooled(upload, len(models))
    rounds = jnp.full(counts.shape, state.round)
    return algorithm.adopt_reported(state, ((logit_sums, rounds), counts),
                                    data, rng)

  return algorithm.build(init, algorithm.per_group(
      [client_update_of(m) for m in models]), server_update)
