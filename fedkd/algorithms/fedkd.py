"""FedKD: Wu, Wu, Lyu, Huang & Xie, "Communication-efficient federated
learning via knowledge distillation", Nature Communications 13, 2032 (2022),
arXiv:2108.13323. Official code: github.com/wuch15/FedKD (`model_bert.py`,
`run.py`).

Every client keeps a private mentor (stacked in `ServerState.clients`, with
its optimizer state) and trains it together with a copy of the shared mentee
on each minibatch, by adaptive mutual distillation, both models from the
logits of the step's forward pass, before either update
(`losses.adaptive_mutual_distillation`, per batch as the official code by
default, `loss_scale='example'` as the paper's equations read).

The mentee's update is SVD-compressed by the first stage of FedKD's
aggregator chain (`compression.svd_stage`) keeping a fraction T_r of each
matrix's singular-value energy
(`compression.energy_schedule`, the official `run.py`'s; paper: 0.95 to
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

from collections.abc import Sequence
import functools

import flax.linen as nn
import jax
import optax

from fedkd import aggregation
from fedkd import algorithm
from fedkd import clients
from fedkd import compression
from fedkd import losses
from fedkd.typing import Params, PRNGKey


def fedkd(*, mentor: nn.Module | Sequence[nn.Module], mentee: nn.Module,
          input_shape, num_clients: int,
          client_tx: optax.GradientTransformation,
          mentor_tx: optax.GradientTransformation,
          server_tx: optax.GradientTransformation, epochs: int,
          batch_size: int, energy_start: float, energy_end: float,
          num_rounds: int, loss_scale: str = 'batch',
          weighting: str = 'uniform') -> algorithm.FederatedAlgorithm:
  """Builds FedKD.

  Args:
    mentor: each client's private model, or one per architecture (client
      i's is `mentor[i % k]`; the mentee updates average over all).
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
  energy = compression.energy_schedule(energy_start, energy_end, num_rounds)
  mentors = algorithm.groups_of(mentor)
  k = len(mentors)

  def init(params: Params, rng: PRNGKey) -> algorithm.ServerState:
    return algorithm.with_backlog(algorithm.server_init(
        server_tx, params, algorithm.per_group([
            clients.init_models(m, mentor_tx, input_shape, num_clients, rng,
                                group=g, groups=k)
            for g, m in enumerate(mentors)])), num_clients)

  def step(mentor, carry, batch):
    mentor_params, mentor_opt, params, opt_state = carry
    loss_fn = lambda both: losses.adaptive_mutual_distillation(
        mentor.apply(both[0], batch.x), mentee.apply(both[1], batch.x),
        batch.y, batch.example_mask, per_example=loss_scale == 'example')
    (_, (sum_t, sum_s)), (g_t, g_s) = jax.value_and_grad(
        loss_fn, has_aux=True)((mentor_params, params))
    updates, mentor_opt = mentor_tx.update(g_t, mentor_opt, mentor_params)
    mentor_params = optax.apply_updates(mentor_params, updates)
    updates, opt_state = client_tx.update(g_s, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (mentor_params, mentor_opt, params, opt_state), {
        'teacher_loss_sum': sum_t, 'student_loss_sum': sum_s}

  def client_update(mentor, server, client_state, data, client_id,
                    num_examples, rng):
    out = clients.train_beside(
        functools.partial(step, mentor), client_state, server.params, data,
        client_id, num_examples, rng, tx=client_tx, epochs=epochs,
        batch_size=batch_size)
    # Every group trains the same mentee: its updates average over all.
    return out._replace(upload=aggregation.Pooled(out.upload))

  def server_update(state, mean_upload, data, rng):
    del data, rng  # Averaging needs neither.
    updates, opt_state = aggregation.server_updates(
        state.params, state.opt_state, algorithm.pooled(mean_upload, k),
        server_tx)
    applied, sent = compression.svd_compress(updates, energy(state.round))
    return (state.replace(params=optax.apply_updates(state.params, applied),
                          opt_state=opt_state), {'update_floats': sent})

  return algorithm.build(
      init, algorithm.per_group(
          [functools.partial(client_update, m) for m in mentors]),
      server_update, aggregation.chain(
          compression.svd_stage(energy),
          aggregation.mean(weighted=weighting == 'examples')))


LOSS_SCALES = ('batch', 'example')
WEIGHTINGS = ('uniform', 'examples')
