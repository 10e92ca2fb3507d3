"""FedKD: Wu, Wu, Lyu, Huang & Xie, "Communication-efficient federated
learning via knowledge distillation", Nature Communications 13, 2032 (2022),
arXiv:2108.13323. Official code: github.com/wuch15/FedKD (`model_bert.py`,
`run.py`).

Every client keeps a private mentor (stacked in `ServerState.clients`, with
its optimizer state) and trains it together with a copy of the shared mentee
on each minibatch, by adaptive mutual distillation, both models from the
logits of the step's forward pass, before either update. `loss_scale`:

* `'batch'` (default, the official code): one loss per minibatch,
  `CE_t + CE_s + (KL(p_s || p_t) + KL(p_t || p_s)) / (K (CE_t + CE_s))`, the
  CEs and KLs batch means (the KLs as `nn.KLDivLoss()`'s 'mean' reduction,
  which also divides by the K classes), and, as there, nothing detached: the
  gradient reaches both models through both KL terms and the denominator;
* `'example'`: per example, mentor `CE_t + KL(p_s || p_t) / (CE_t + CE_s)`,
  mentee `CE_s + KL(p_t || p_s) / (CE_t + CE_s)` (the paper's equations read
  per example), each KL `losses.distillation` at T = 1 with the other model
  detached and the scale detached too.

Either denominator is floored at 1e-6, so two perfectly confident models give
0, not NaN. The mentee's update is SVD-compressed
(`compression.svd_compress`) keeping a fraction T_r of each matrix's
singular-value energy, `T_r = energy_start + (r + 1) / R (energy_end -
energy_start)` in round r of R as in the official `run.py` (paper: 0.95 to
0.98). The server averages the compressed updates, uniformly as the official
`np.mean` (`weighting='uniform'`, default) or by example count
(`'examples'`), passes the mean through the server optimizer and compresses
the update it applies (`new - old`: the mean itself with `sgd(1.0)`) the same
way, so clients that receive it hold exactly the server's mentee. Both
directions count the bytes of the factors actually sent, or of the matrix
where the factors would not be smaller. A sampled client downloads the
compressed updates it missed since it last took part, or the whole mentee
when that is smaller (always, the first time): `ServerState.backlog`.

Differences from the official code: the hidden-state and attention losses
(MSE between the mentee's hidden states and attention maps and every third
layer of the mentor's, divided by the same task-loss sum) are not
implemented, as no model here exposes intermediate layers; mentor and mentee
have separate optimizers (official: one Adam over both, lr 3e-6) and the
mentee's restarts every round; the rank keeps the smallest r whose energy
reaches T_r (official: exceeds T_r on the upload, and sends nothing when only
the full rank would), and clients may be sampled (official: all every round).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedkd import aggregation
from fedkd import algorithm
from fedkd import clients
from fedkd import communication
from fedkd import compression
from fedkd import losses
from fedkd.typing import Params, PRNGKey


def fedkd(*, mentor: nn.Module, mentee: nn.Module, input_shape,
          num_clients: int, client_tx: optax.GradientTransformation,
          mentor_tx: optax.GradientTransformation,
          server_tx: optax.GradientTransformation, epochs: int,
          batch_size: int, energy_start: float,
          energy_end: float, num_rounds: int, loss_scale: str = 'batch',
          weighting: str = 'uniform') -> algorithm.FederatedAlgorithm:
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
    num_rounds: R, the rounds over which the threshold moves.
    loss_scale: `'batch'` (official) or `'example'` (see the module).
    weighting: `'uniform'` (official) or `'examples'`: the clients' weights
      in the server's mean.
  """
  if loss_scale not in LOSS_SCALES:
    raise ValueError(f'loss_scale must be one of {LOSS_SCALES}, got '
                     f'{loss_scale!r}')
  if weighting not in WEIGHTINGS:
    raise ValueError(f'weighting must be one of {WEIGHTINGS}, got '
                     f'{weighting!r}')
  energy = energy_schedule(energy_start, energy_end, num_rounds)

  def init(params: Params, rng: PRNGKey) -> algorithm.ServerState:
    return algorithm.with_backlog(algorithm.server_init(
        server_tx, params, clients.init_models(
            mentor, mentor_tx, input_shape, num_clients, rng)), num_clients)

  def example_loss(mentor_logits, mentee_logits, ce_t, ce_s, mask):
    scale = jax.lax.stop_gradient(1.0 / jnp.maximum(ce_t + ce_s, 1e-6))
    loss_t = ce_t + scale * losses.distillation(mentor_logits, mentee_logits,
                                                1.0)
    loss_s = ce_s + scale * losses.distillation(mentee_logits, mentor_logits,
                                                1.0)
    # Each distillation term detaches the other model, so the gradient of the
    # sum is (d loss_t / d mentor, d loss_s / d mentee).
    return (losses.masked_mean(loss_t + loss_s, mask),
            (jnp.sum(loss_t * mask), jnp.sum(loss_s * mask)))

  def batch_loss(mentor_logits, mentee_logits, ce_t, ce_s, mask):
    mean = lambda v: losses.masked_mean(v, mask)
    k = mentor_logits.shape[-1]
    ce_t, ce_s = mean(ce_t), mean(ce_s)
    scale = 1.0 / (k * jnp.maximum(ce_t + ce_s, 1e-6))
    loss_t = ce_t + scale * mean(losses.mutual_kl(mentee_logits,
                                                  mentor_logits))
    loss_s = ce_s + scale * mean(losses.mutual_kl(mentor_logits,
                                                  mentee_logits))
    real = jnp.sum(mask)
    return loss_t + loss_s, (loss_t * real, loss_s * real)

  loss = batch_loss if loss_scale == 'batch' else example_loss

  def loss_fn(both, batch):
    mentor_logits = mentor.apply(both[0], batch.x)
    mentee_logits = mentee.apply(both[1], batch.x)
    return loss(mentor_logits, mentee_logits,
                losses.cross_entropy(mentor_logits, batch.y),
                losses.cross_entropy(mentee_logits, batch.y),
                batch.example_mask)

  def step(carry, batch):
    mentor_params, mentor_opt, params, opt_state = carry
    (_, (sum_t, sum_s)), (g_t, g_s) = jax.value_and_grad(
        loss_fn, has_aux=True)((mentor_params, params), batch)
    updates, mentor_opt = mentor_tx.update(g_t, mentor_opt, mentor_params)
    mentor_params = optax.apply_updates(mentor_params, updates)
    updates, opt_state = client_tx.update(g_s, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (mentor_params, mentor_opt, params, opt_state), {
        'teacher_loss_sum': sum_t, 'student_loss_sum': sum_s}

  def client_update(server, client_state, data, client_id, num_examples,
                    rng):
    carry = (*client_state, server.params, client_tx.init(server.params))
    (*mentor_state, params, _), sums = clients.local_training(
        step, carry, data, client_id, num_examples, rng, epochs=epochs,
        batch_size=batch_size)
    out = clients.delta_output(server.params, params, num_examples,
                               tuple(mentor_state), sums)
    upload, sent = compression.svd_compress(out.upload, energy(server.round))
    weight = out.weight if weighting == 'examples' else jnp.ones(())
    return out._replace(upload=upload, weight=weight,
                        metrics=dict(out.metrics,
                                     upload_bytes=communication.floats(sent)))

  def server_update(state, mean_delta, data, rng):
    del data, rng  # Averaging needs neither.
    updates, opt_state = aggregation.server_updates(
        state.params, state.opt_state, mean_delta, server_tx)
    applied, sent = compression.svd_compress(updates, energy(state.round))
    return (state.replace(params=optax.apply_updates(state.params, applied),
                          opt_state=opt_state), {'update_floats': sent})

  return algorithm.build(init, client_update, server_update)


LOSS_SCALES = ('batch', 'example')
WEIGHTINGS = ('uniform', 'examples')


def energy_schedule(start: float, end: float, num_rounds: int):
  """round r -> `start + (end - start) (r + 1) / R`, the official `run.py`.

  Round 0 already keeps more than `start`; the last round (R - 1) keeps `end`,
  and later rounds (a resumed, longer run) stay there.
  """
  def value(round_index):
    progress = jnp.minimum(round_index + 1, num_rounds) / num_rounds
    return start + (end - start) * progress
  return value
