"""FedKD: Wu, Wu, Lyu, Huang & Xie, "Communication-efficient federated
learning via knowledge distillation", Nature Communications 13, 2032 (2022),
arXiv:2108.13323.

Every client keeps a private mentor (stacked in `ServerState.clients`, with
its optimizer state) and trains it together with a copy of the shared mentee
on each minibatch, by adaptive mutual distillation:

* mentor: `CE_t + KL(p_s || p_t) / (CE_t + CE_s)`;
* mentee: `CE_s + KL(p_t || p_s) / (CE_t + CE_s)`;

per example, each KL as `losses.distillation` at T = 1 (KL(other || self)),
the other model detached, and the adaptive scale `1 / (CE_t + CE_s)` detached
too (it weighs the terms; it is not meant to be minimised) and floored at
1e-6 in the denominator, so two perfectly confident models give 0, not NaN.
Both models use the logits of the step's forward pass, before either update.
The paper's hidden-state and attention losses are not implemented: no model
here exposes hidden states.

The mentee's update is SVD-compressed (`compression.svd_compress`) keeping a
fraction T_t of each matrix's singular-value energy, T_t linear from
`energy_start` to `energy_end` over `num_rounds` (paper: 0.95 to 0.98). The
server averages the compressed updates by example count, compresses the mean
the same way for the download, and applies it through the server optimizer.
Both directions count the bytes of the factors actually sent, or of the
matrix where the factors would be larger.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedkd import aggregation
from fedkd import algorithm
from fedkd import clients
from fedkd import compression
from fedkd import losses
from fedkd.typing import Params, PRNGKey


def fedkd(*, mentor: nn.Module, mentee: nn.Module, input_shape,
          num_clients: int, client_tx: optax.GradientTransformation,
          mentor_tx: optax.GradientTransformation,
          server_tx: optax.GradientTransformation, epochs: int,
          batch_size: int, energy_start: float,
          energy_end: float, num_rounds: int) -> algorithm.FederatedAlgorithm:
  """Builds FedKD.

  Args:
    mentor: each client's private model.
    mentee: the shared model the server aggregates.
    input_shape: shape of one example, to initialise the mentors.
    num_clients: how many private mentors to keep.
    client_tx: the mentee's local optimizer (fresh every round).
    mentor_tx: the mentors' optimizer (its state persists per client).
    server_tx: applied to the (compressed) mean mentee update.
    epochs: local passes over each client's data per round.
    batch_size: local minibatch size.
    energy_start: SVD energy threshold T_start of round 0.
    energy_end: SVD energy threshold T_end of the last round.
    num_rounds: rounds over which the threshold moves.
  """
  energy = compression.linear_schedule(energy_start, energy_end, num_rounds)

  def init(params: Params, rng: PRNGKey) -> algorithm.ServerState:
    return algorithm.server_init(server_tx, params, clients.init_models(
        mentor, mentor_tx, input_shape, num_clients, rng))

  def loss_fn(both, batch):
    mentor_logits = mentor.apply(both[0], batch.x)
    mentee_logits = mentee.apply(both[1], batch.x)
    ce_t = losses.cross_entropy(mentor_logits, batch.y)
    ce_s = losses.cross_entropy(mentee_logits, batch.y)
    scale = jax.lax.stop_gradient(1.0 / jnp.maximum(ce_t + ce_s, 1e-6))
    loss_t = ce_t + scale * losses.distillation(mentor_logits, mentee_logits,
                                                1.0)
    loss_s = ce_s + scale * losses.distillation(mentee_logits, mentor_logits,
                                                1.0)
    # Each distillation term detaches the other model, so the gradient of the
    # sum is (d loss_t / d mentor, d loss_s / d mentee).
    return (losses.masked_mean(loss_t + loss_s, batch.example_mask),
            (loss_t, loss_s))

  def step(carry, batch):
    mentor_params, mentor_opt, params, opt_state = carry
    (_, (loss_t, loss_s)), (g_t, g_s) = jax.value_and_grad(
        loss_fn, has_aux=True)((mentor_params, params), batch)
    updates, mentor_opt = mentor_tx.update(g_t, mentor_opt, mentor_params)
    mentor_params = optax.apply_updates(mentor_params, updates)
    updates, opt_state = client_tx.update(g_s, opt_state, params)
    params = optax.apply_updates(params, updates)
    mask = batch.example_mask
    return (mentor_params, mentor_opt, params, opt_state), {
        'teacher_loss_sum': jnp.sum(loss_t * mask),
        'student_loss_sum': jnp.sum(loss_s * mask)}

  def client_update(server, client_state, data, client_id, num_examples,
                    rng):
    carry = (*client_state, server.params, client_tx.init(server.params))
    (*mentor_state, params, _), sums = clients.local_training(
        step, carry, data, client_id, num_examples, rng, epochs=epochs,
        batch_size=batch_size)
    out = clients.delta_output(server.params, params, num_examples,
                               tuple(mentor_state), sums, epochs=epochs)
    upload, sent = compression.svd_compress(out.upload, energy(server.round))
    return out._replace(upload=upload,
                        metrics=dict(out.metrics, upload_bytes=sent))

  def server_update(state, mean_delta, data, rng):
    del data, rng  # Averaging needs neither.
    delta, sent = compression.svd_compress(mean_delta, energy(state.round))
    params, opt_state = aggregation.server_step(
        state.params, state.opt_state, delta, server_tx)
    return (state.replace(params=params, opt_state=opt_state),
            {'download_bytes': sent})

  return algorithm.build(init, client_update, server_update)
