"""Local KD: every client keeps a private teacher and distills it into the
shared student, which is all that reaches the server.

The teacher/student split follows Hinton, Vinyals & Dean, "Distilling the
Knowledge in a Neural Network", 2015, arXiv:1503.02531; the federated use of a
private teacher beside a shared student follows FedKD (Wu et al., Nature
Communications 2022, arXiv:2108.13323) without its mutual distillation and
compression, which `fedkd` (the algorithm) adds.

Per local step, on the same minibatch:

* teacher: one optimizer step on cross-entropy against the labels;
* student: one step on `(1 - w) * CE + w * T^2 * KL(softmax(teacher / T) ||
  softmax(student / T))`, with the teacher's logits from that step's forward
  pass (before its update) and frozen (`stop_gradient`).

The teachers (parameters and optimizer state) persist per client across rounds;
the student starts each round from the global model and its delta is averaged
by example count on the server, as in FedAvg. Teachers may differ in
architecture: with k of them, client i's is `teacher[i % k]` (client groups
of `algorithm.make_round`; the student deltas average over all).
"""

from collections.abc import Sequence
import functools

import flax.linen as nn
import jax.numpy as jnp
import optax

from fedkd import aggregation
from fedkd import algorithm
from fedkd import clients
from fedkd import losses
from fedkd.typing import Params, PRNGKey


def local_kd(*, teacher: nn.Module | Sequence[nn.Module],
             student: nn.Module, input_shape, num_clients: int,
             client_tx: optax.GradientTransformation,
             teacher_tx: optax.GradientTransformation,
             server_tx: optax.GradientTransformation, epochs: int,
             batch_size: int, temperature: float,
             distill_weight: float) -> algorithm.FederatedAlgorithm:
  """Builds local KD.

  Args:
    teacher: each client's private model, or one per architecture.
    student: the shared model the server aggregates.
    input_shape: shape of one example, to initialise the teachers.
    num_clients: how many private teachers to keep.
    client_tx: the student's local optimizer (fresh every round).
    teacher_tx: the teachers' optimizer (its state persists per client).
    server_tx: the server optimizer applied to the mean student delta.
    epochs: local passes over each client's data per round.
    batch_size: local minibatch size.
    temperature: distillation temperature T.
    distill_weight: w, the weight of the distillation term.
  """

  teachers = algorithm.groups_of(teacher)
  k = len(teachers)

  def init(params: Params, rng: PRNGKey) -> algorithm.ServerState:
    return algorithm.server_init(server_tx, params, algorithm.per_group([
        clients.init_models(t, teacher_tx, input_shape, num_clients, rng,
                            group=g, groups=k)
        for g, t in enumerate(teachers)]))

  def teacher_loss(teacher, params, batch):
    logits = teacher.apply(params, batch.x)
    per_example = losses.cross_entropy(logits, batch.y)
    return (losses.masked_mean(per_example, batch.example_mask),
            (per_example, logits))

  def student_loss(params, batch, teacher_logits):
    logits = student.apply(params, batch.x)
    per_example = (
        (1.0 - distill_weight) * losses.cross_entropy(logits, batch.y)
        + distill_weight * losses.distillation(logits, teacher_logits,
                                               temperature))
    return losses.masked_mean(per_example, batch.example_mask), per_example

  def client_update_of(teacher):
    """One client's round with a private `teacher`."""

    def client_update(server, client_state, data, client_id,
                      num_examples, rng):
      def step(carry, batch):
        teacher_params, teacher_opt, params, opt_state = carry
        teacher_params, teacher_opt, _, (teacher_ex, teacher_logits) = (
            clients.sgd_train(functools.partial(teacher_loss, teacher),
                              teacher_tx, teacher_params, teacher_opt, batch))
        params, opt_state, _, student_ex = clients.sgd_train(
            student_loss, client_tx, params, opt_state, batch, teacher_logits)
        mask = batch.example_mask
        return (teacher_params, teacher_opt, params, opt_state), {
            'teacher_loss_sum': jnp.sum(teacher_ex * mask),
            'student_loss_sum': jnp.sum(student_ex * mask)}

      out = clients.train_beside(
          step, client_state, server.params, data, client_id, num_examples,
          rng, tx=client_tx, epochs=epochs, batch_size=batch_size)
      # Every group trains the same student: its deltas average over all.
      return out._replace(upload=aggregation.Pooled(out.upload))

    return client_update

  average = algorithm.averaging_server_update(server_tx)
  return algorithm.build(
      init, algorithm.per_group([client_update_of(t) for t in teachers]),
      lambda state, mean, data, rng: average(
          state, algorithm.pooled(mean, k), data, rng))
