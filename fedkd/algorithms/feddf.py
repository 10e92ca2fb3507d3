"""FedDF: Lin, Kong, Stich & Jaggi, "Ensemble Distillation for Robust Model
Fusion in Federated Learning", NeurIPS 2020, arXiv:2006.07242. Official code:
github.com/epfml/federated-learning-public-code (`codes/FedDF-code`,
`pcode/aggregation/noise_knowledge_transfer.py`).

Clients train the global model on cross-entropy as in FedAvg and upload the
delta and their logits on the unlabeled proxy data (`ClientData.public_x`;
only the parameters count as bytes). The server averages (FedOpt), then
distills the ensemble into the average: `distill_epochs` passes of
`distill_tx` on `KL(softmax(ensemble / T) || softmax(global / T))` (no T^2,
as the official `divergence`), the ensemble detached; official: T = 1, Adam
at 1e-3 with cosine decay, clip 5 (`experiments/builder.py`'s defaults).

With k architectures (the paper's Sec. 4), client i trains `model[i % k]`
(`algorithm.make_round`'s client groups); each architecture's global model
is the average of its clients', distilled from the ensemble of all. With
`server_model` (one architecture), the ensemble is also distilled into that
model, the global model then (`params` {'client': ..., 'server': ...}).

With `num_val` (official `val_data_ratio`: 0.1), the first `num_val` public
examples stay labelled to validate the distillation every `eval_every`
steps; the server keeps its best model, the average included, and stops
`patience` steps after it (official: 100, 1,000; `fedkd.early_stopping`),
which keeps Adam from collapsing FedDF in FedGen's setting (README).

Differences from the official code: a uniform ensemble (here weighted by
example count); up to 10,000 batches of 128 a round (here `distill_epochs`
passes, validated after the last step too); the average kept only with
`return_best_model_on_val`; validation and proxy data from elsewhere (here
held out of the training set).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedkd import aggregation
from fedkd import algorithm
from fedkd import clients
from fedkd import communication
from fedkd import early_stopping
from fedkd import losses
from fedkd import metrics as metrics_lib
from fedkd.typing import Params, PRNGKey


def feddf(*, model: nn.Module, client_tx: optax.GradientTransformation,
          server_tx: optax.GradientTransformation,
          distill_tx: optax.GradientTransformation, epochs: int,
          batch_size: int, distill_epochs: int, public_batch_size: int,
          temperature: float, server_model: nn.Module | None = None,
          input_shape=None, num_val: int = 0, eval_every: int = 100,
          patience: int = 1000) -> algorithm.FederatedAlgorithm:
  """Builds FedDF over `model` (the clients', and the server's by default).

  Args:
    model: the global model every client trains, or one per architecture.
    client_tx: the local optimizer, fresh every round.
    server_tx: applied to the mean client delta before distillation.
    distill_tx: the server's distillation optimizer, fresh every round.
    epochs: local passes over each client's data per round.
    batch_size: local minibatch size.
    distill_epochs: server passes over the proxy data per round.
    public_batch_size: proxy minibatch size (logits and distillation).
    temperature: distillation temperature T.
    server_model: a global model also distilled into (`init` takes its
      parameters); `input_shape`: one example's, to init the clients' model.
    num_val: labelled public examples that validate; 0: keep the last model.
    eval_every: distillation steps between validations.
    patience: distillation steps after the best before stopping.
  """
  models = algorithm.groups_of(model)
  k = len(models)
  if server_model and k > 1:
    raise ValueError('feddf takes a server_model with one client '
                     'architecture; with several, each has its global model')
  own = lambda params: params['client'] if server_model else params
  group = lambda params, g: params[g] if k > 1 else params

  def init(params: Params, rng: PRNGKey) -> algorithm.ServerState:
    """`params`: the global model's (one per architecture: a tuple)."""
    if not server_model:
      return algorithm.server_init(server_tx, params)
    shared = model.init(rng, jnp.zeros((1, *input_shape)))
    return algorithm.server_init(server_tx, shared).replace(
        params=dict(client=shared, server=params))

  def client_update_of(g, model):
    """One client's round in group `g`, whose model is `model`."""
    ce = lambda params, batch: losses.cross_entropy(
        model.apply(params, batch.x), batch.y)

    def client_update(server, client_state, data, client_id, num_examples,
                      rng):
      start = group(own(server.params), g)
      params, sums = clients.train_from(
          ce, start, data, client_id, num_examples, rng, tx=client_tx,
          epochs=epochs, batch_size=batch_size)
      out = clients.delta_output(start, params, num_examples,
                                 client_state, sums)
      logits = clients.predict_in_batches(
          model, params, data.public_x[num_val:],
          batch_size=public_batch_size)
      # The ensemble spans every architecture; deltas average per group.
      return out._replace(
          upload=dict(delta=out.upload, logits=aggregation.Pooled(logits)),
          metrics=dict(out.metrics, upload_bytes=communication.fixed(
              1, algorithm.tree_bytes(out.upload))))

    return client_update

  def distill(student, params, ensemble, data, rng):
    """The kept model and the mean distillation loss of the steps run."""
    kd = lambda p, batch: losses.soft_target_kl(
        student.apply(p, batch.x), ensemble[batch.index], temperature)
    score = num_val and (lambda p: metrics_lib.evaluate(
        student, p, data.public_x[:num_val], data.public_y[:num_val],
        batch_size=public_batch_size)[1])
    params, sums = early_stopping.public_training(
        clients.loss_step(kd, distill_tx, 'loss'), params, distill_tx,
        data.public_x[num_val:], rng, score=score or None,
        epochs=distill_epochs, batch_size=public_batch_size,
        eval_every=eval_every, patience=patience)
    return params, sums['loss'] / jnp.maximum(sums['examples'], 1)

  def server_update(state, mean_upload, data, rng):
    means = mean_upload if k > 1 else (mean_upload,)
    params, opt_state = aggregation.server_step(
        own(state.params), state.opt_state,
        algorithm.per_group([m['delta'] for m in means]), server_tx)
    ensemble = means[0]['logits'].value
    client_rng, server_rng = jax.random.split(rng)
    kept = [distill(m, group(params, g), ensemble, data, r) for g, (m, r) in
            enumerate(zip(models, jax.random.split(client_rng, k)
                          if k > 1 else [client_rng]))]
    params = algorithm.per_group([p for p, _ in kept])
    metrics = {'server_distill_loss': sum(loss for _, loss in kept) / k,
               # Clients receive their architecture's model only.
               'download_bytes': algorithm.per_group([communication.fixed(
                   1, algorithm.tree_bytes(p)) for p, _ in kept])}
    if server_model:
      big, metrics['server_distill_loss'] = distill(
          server_model, state.params['server'], ensemble, data, server_rng)
      params = dict(client=params, server=big)
    return state.replace(params=params, opt_state=opt_state), metrics

  return algorithm.build(init, algorithm.per_group(
      [client_update_of(g, m) for g, m in enumerate(models)]), server_update)
