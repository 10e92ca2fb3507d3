"""Whole client rounds with linear models, against numpy done by hand.

Every client's data fits in one batch, so each local epoch is one full-batch
gradient step whatever the shuffle, and the expected parameters follow from
the softmax-regression gradient `x^T (softmax(x W + b) - onehot(y)) / n`.
"""

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments import builder
from experiments.configs import default as default_config
from fedkd import aggregation
from fedkd import algorithms
from fedkd import compression
from fedkd import optimizers
from fedkd.algorithms import fedavg
from fedkd.algorithms import local_kd
import toys

C = toys.NUM_CLASSES
D = int(np.prod(toys.INPUT_SHAPE))


def _linear():
  return nn.Sequential([lambda x: x.reshape((x.shape[0], -1)), nn.Dense(C)])


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _unpack(params):
  p = params['params']['layers_1']
  return np.asarray(p['kernel'], np.float64), np.asarray(p['bias'], np.float64)


def _sgd(w, b, x, dlogits, lr):
  """One SGD step given d(mean loss)/d(logits) * n, i.e. per-example grads."""
  n = len(x)
  return w - lr * x.T @ dlogits / n, b - lr * dlogits.sum(0) / n


def _params(w, b):
  return {'params': {'layers_1': {'kernel': jnp.asarray(w, jnp.float32),
                                  'bias': jnp.asarray(b, jnp.float32)}}}


def _assert_linear(params, w, b):
  got_w, got_b = _unpack(params)
  np.testing.assert_allclose(got_w, w, atol=1e-5)
  np.testing.assert_allclose(got_b, b, atol=1e-5)


def _init():
  return _linear().init(jax.random.PRNGKey(0), jnp.zeros((1, D)))


def _client(state, k):
  """Client k's private (w, b) from the stacked per-client state."""
  return _unpack(jax.tree.map(lambda a: a[k], state.clients[0]))


def _ce(logits, y):
  return -np.log(_softmax(logits)[np.arange(len(y)), y])


def _kd_grad(s, t, temp):
  """d/ds of T^2 KL(softmax(t/T) || softmax(s/T)), per example."""
  return temp * (_softmax(s / temp) - _softmax(t / temp))


def _fedkd_grads(t, s, y):
  """Per-example FedKD: n x d(mean loss)/d(logits) of mentor t, mentee s."""
  onehot = np.eye(C)[y]
  scale = 1 / (_ce(t, y) + _ce(s, y))[:, None]
  return (_softmax(t) - onehot + scale * _kd_grad(t, s, 1),
          _softmax(s) - onehot + scale * _kd_grad(s, t, 1))


def _fedkd_batch_grads(t, s, y):
  """FedKD's official loss, `A + D / A` with A = mean CE_t + mean CE_s and
  D = (mean KL(p_s||p_t) + mean KL(p_t||p_s)) / K, nothing detached: n x its
  gradient with respect to each model's logits."""
  onehot, pt, ps = np.eye(C)[y], _softmax(t), _softmax(s)
  kl = lambda p, q: np.sum(p * np.log(p / q), -1)
  a = np.mean(_ce(t, y)) + np.mean(_ce(s, y))
  d = (np.mean(kl(ps, pt)) + np.mean(kl(pt, ps))) / C

  def dkl_first(p, q):
    """d KL(softmax(z) || q) / dz at softmax(z) = p."""
    v = np.log(p) - np.log(q)
    return p * (v - np.sum(p * v, -1, keepdims=True))

  grad = lambda p, q: ((p - onehot) * (1 - d / a**2) +
                       ((p - q) + dkl_first(p, q)) / (C * a))
  return grad(pt, ps), grad(ps, pt)


def _truncate(m, energy):
  """Numpy SVD truncation to the energy threshold; returns (matrix, rank)."""
  u, sv, vt = np.linalg.svd(m, full_matrices=False)
  fraction = np.cumsum(sv**2) / np.sum(sv**2)
  rank = min(int(np.sum(fraction < energy)) + 1, len(sv))
  return (u[:, :rank] * sv[:rank]) @ vt[:rank], rank


def _round(alg, state, data, ids, seed=2):
  return jax.jit(alg.apply)(state, data, toys.cohort(ids),
                            jax.random.PRNGKey(seed))


def _fedmd(lr, **kwargs):
  """FedMD of 2 linear clients, every private and public pass one batch."""
  return algorithms.fedmd(
      model=_linear(), input_shape=toys.INPUT_SHAPE, num_clients=2,
      num_public=toys.NUM_PUBLIC, num_classes=C, client_tx=optax.sgd(lr),
      batch_size=4, public_batch_size=8, **kwargs)


def _client_arrays(data, k):
  start, n = int(data.offsets[k]), int(data.num_examples[k])
  rows = slice(start, start + n)
  return (np.asarray(data.x[rows], np.float64).reshape(n, -1),
          np.asarray(data.y[rows]))


class GoldenTest(parameterized.TestCase):

  def test_fedavg_round(self):
    lr, sizes = 0.5, (4, 2)
    data = toys.toy_data(sizes)
    alg = fedavg(model=_linear(), client_tx=optax.sgd(lr),
                 server_tx=optax.sgd(1.0), epochs=1, batch_size=4)
    params = _linear().init(jax.random.PRNGKey(0), jnp.zeros((1, D)))
    state, _ = jax.jit(alg.apply)(alg.init(params, None), data,
                                  toys.cohort([0, 1]), jax.random.PRNGKey(1))
    w0, b0 = _unpack(params)
    new = []
    for k in range(2):
      x, y = _client_arrays(data, k)
      probs = _softmax(x @ w0 + b0)
      new.append(_sgd(w0, b0, x, probs - np.eye(C)[y], lr))
    expected_w = (4 * new[0][0] + 2 * new[1][0]) / 6
    expected_b = (4 * new[0][1] + 2 * new[1][1]) / 6
    w, b = _unpack(state.params)
    np.testing.assert_allclose(w, expected_w, atol=1e-5)
    np.testing.assert_allclose(b, expected_b, atol=1e-5)

  def test_local_kd_round_two_epochs(self):
    lr, teacher_lr, temp, weight = 0.3, 0.2, 2.0, 0.4
    data = toys.toy_data((3,))
    alg = local_kd(teacher=_linear(), student=_linear(),
                   input_shape=toys.INPUT_SHAPE, num_clients=1,
                   client_tx=optax.sgd(lr), teacher_tx=optax.sgd(teacher_lr),
                   server_tx=optax.sgd(1.0), epochs=2, batch_size=4,
                   temperature=temp, distill_weight=weight)
    params = _linear().init(jax.random.PRNGKey(0), jnp.zeros((1, D)))
    state = alg.init(params, jax.random.PRNGKey(1))
    tw, tb = _unpack(jax.tree.map(lambda a: a[0], state.clients[0]))
    new_state, metrics = jax.jit(alg.apply)(state, data, toys.cohort([0]),
                                            jax.random.PRNGKey(2))
    x, y = _client_arrays(data, 0)
    onehot = np.eye(C)[y]
    sw, sb = _unpack(params)
    teacher_sum = student_sum = 0.0
    for _ in range(2):
      t_logits = x @ tw + tb
      s_logits = x @ sw + sb
      teacher_sum += _ce(t_logits, y).sum()
      p = _softmax(t_logits / temp)
      student_sum += np.sum((1 - weight) * _ce(s_logits, y) + weight *
                            temp**2 * np.sum(p * np.log(
                                p / _softmax(s_logits / temp)), -1))
      tw, tb = _sgd(tw, tb, x, _softmax(t_logits) - onehot, teacher_lr)
      # d/ds of T^2 KL(p_t || softmax(s/T)) is T (softmax(s/T) - p_t).
      ds = ((1 - weight) * (_softmax(s_logits) - onehot) + weight * temp *
            (_softmax(s_logits / temp) - _softmax(t_logits / temp)))
      sw, sb = _sgd(sw, sb, x, ds, lr)
    w, b = _unpack(new_state.params)
    np.testing.assert_allclose(w, sw, atol=1e-5)
    np.testing.assert_allclose(b, sb, atol=1e-5)
    got_tw, got_tb = _unpack(jax.tree.map(lambda a: a[0],
                                          new_state.clients[0]))
    np.testing.assert_allclose(got_tw, tw, atol=1e-5)
    np.testing.assert_allclose(got_tb, tb, atol=1e-5)
    # The loss sums cover the 3 real examples of each 4-example batch.
    self.assertAlmostEqual(float(metrics['teacher_loss_sum']), teacher_sum,
                           places=4)
    self.assertAlmostEqual(float(metrics['student_loss_sum']), student_sum,
                           places=4)


  def test_fedprox_round_two_epochs(self):
    lr, mu = 0.3, 0.7
    data = toys.toy_data((3,))
    alg = algorithms.fedprox(model=_linear(), mu=mu, client_tx=optax.sgd(lr),
                             server_tx=optax.sgd(1.0), epochs=2,
                             batch_size=4)
    params = _init()
    state, metrics = _round(alg, alg.init(params, None), data, [0])
    x, y = _client_arrays(data, 0)
    w0, b0 = _unpack(params)
    w, b, loss_sum = w0, b0, 0.0
    for _ in range(2):  # one batch an epoch
      p = _softmax(x @ w + b)
      loss_sum -= np.log(p[np.arange(len(y)), y]).sum()
      # CE's gradient plus the proximal term's mu (w - w0).
      new_w, new_b = _sgd(w, b, x, p - np.eye(C)[y], lr)
      w, b = new_w - lr * mu * (w - w0), new_b - lr * mu * (b - b0)
    _assert_linear(state.params, w, b)
    # The training loss reported is the cross-entropy alone (official code).
    self.assertAlmostEqual(float(metrics['student_loss_sum']), loss_sum,
                           places=4)

  def test_fedntd_round(self):
    lr, beta, temp = 0.4, 0.8, 2.0
    data = toys.toy_data((4,))
    alg = algorithms.fedntd(model=_linear(), beta=beta, temperature=temp,
                            client_tx=optax.sgd(lr), server_tx=optax.sgd(1.0),
                            epochs=2, batch_size=4)
    params = _init()
    state, _ = _round(alg, alg.init(params, None), data, [0])
    x, y = _client_arrays(data, 0)
    w0, b0 = _unpack(params)
    w, b = w0, b0
    for _ in range(2):
      s, g = x @ w + b, x @ w0 + b0
      ds = _softmax(s) - np.eye(C)[y]
      for i, label in enumerate(y):
        # The true class's logit gets no distillation gradient.
        others = [c for c in range(C) if c != label]
        ds[i, others] += beta * _kd_grad(s[i, others], g[i, others], temp)
      w, b = _sgd(w, b, x, ds, lr)
    _assert_linear(state.params, w, b)


  def test_fedadam_server_step(self):
    lr, server_lr = 0.5, 0.1
    data = toys.toy_data((3,))
    alg = fedavg(model=_linear(), client_tx=optax.sgd(lr),
                 server_tx=optimizers.get_optimizer('fedadam', server_lr),
                 epochs=1, batch_size=4)
    params = _init()
    state, _ = _round(alg, alg.init(params, None), data, [0])
    x, y = _client_arrays(data, 0)
    w0, b0 = _unpack(params)
    w1, b1 = _sgd(w0, b0, x, _softmax(x @ w0 + b0) - np.eye(C)[y], lr)
    # First bias-corrected Adam step on g = -delta: -lr g / (|g| + eps).
    adam = lambda p0, p1: p0 + server_lr * (p1 - p0) / (abs(p1 - p0) + 1e-3)
    got_w, got_b = _unpack(state.params)
    np.testing.assert_allclose(got_w, adam(w0, w1), atol=1e-5)
    np.testing.assert_allclose(got_b, adam(b0, b1), atol=1e-5)

  @parameterized.named_parameters(('official_batch', 'batch'),
                                  ('per_example', 'example'))
  def test_fedkd_round_mutual_distillation_and_svd(self, loss_scale):
    lr, mentor_lr, energy = 0.5, 0.3, 0.9
    data = toys.toy_data((4,))
    alg = algorithms.fedkd(
        mentor=_linear(), mentee=_linear(), input_shape=toys.INPUT_SHAPE,
        num_clients=1, client_tx=optax.sgd(lr),
        mentor_tx=optax.sgd(mentor_lr), server_tx=optax.sgd(1.0), epochs=1,
        batch_size=4, energy_start=energy,
        energy_end=energy, num_rounds=1, loss_scale=loss_scale)
    params = _init()
    state = alg.init(params, jax.random.PRNGKey(1))
    tw, tb = _client(state, 0)
    new_state, metrics = _round(alg, state, data, [0])
    x, y = _client_arrays(data, 0)
    sw, sb = _unpack(params)
    grads = _fedkd_batch_grads if loss_scale == 'batch' else _fedkd_grads
    g_t, g_s = grads(x @ tw + tb, x @ sw + sb, y)
    tw, tb = _sgd(tw, tb, x, g_t, mentor_lr)
    new_w, new_b = _sgd(sw, sb, x, g_s, lr)
    up_w, up_rank = _truncate(new_w - sw, energy)
    down_w, _ = _truncate(up_w, energy)
    got_w, got_b = _unpack(new_state.params)
    np.testing.assert_allclose(got_w, sw + down_w, atol=1e-5)
    np.testing.assert_allclose(got_b, new_b, atol=1e-5)
    np.testing.assert_allclose(_client(new_state, 0)[0], tw, atol=1e-5)
    # A rank-r factorisation of a [D, C] kernel sends r (D + C + 1) floats.
    self.assertEqual(int(metrics['upload_bytes']),
                     4 * (up_rank * (D + C + 1) + C))
    # The client's first download is the whole mentee.
    self.assertEqual(int(metrics['download_bytes']), 4 * (D * C + C))

  def test_fedkd_averages_clients_uniformly_or_by_examples(self):
    # Energy 1 keeps every update whole, so the round's mean update is the
    # mean of the updates of each client alone; clients hold 4 and 2 examples.
    data = toys.toy_data((4, 2))
    params = _init()
    for weighting, w in (('uniform', (0.5, 0.5)), ('examples', (4 / 6, 2 / 6))):
      alg = algorithms.fedkd(
          mentor=_linear(), mentee=_linear(), input_shape=toys.INPUT_SHAPE,
          num_clients=2, client_tx=optax.sgd(0.5), mentor_tx=optax.sgd(0.3),
          server_tx=optax.sgd(1.0), epochs=1, batch_size=4, energy_start=1.0,
          energy_end=1.0, num_rounds=1, weighting=weighting)
      state = alg.init(params, jax.random.PRNGKey(1))
      step = jax.jit(alg.apply)
      delta = lambda ids: _unpack(step(
          state, data, toys.cohort(ids, size=2, num_clients=2),
          jax.random.PRNGKey(2))[0].params)[0] - _unpack(params)[0]
      np.testing.assert_allclose(
          delta([0, 1]), w[0] * delta([0]) + w[1] * delta([1]), atol=1e-5)

  def test_fedkd_energy_schedule_is_the_official_one(self):
    # run.py: energy = tmin + ((1 + r) / R) (tmax - tmin), r = 0 .. R - 1.
    energy = compression.energy_schedule(0.5, 0.9, 4)
    np.testing.assert_allclose([float(energy(r)) for r in range(6)],
                               [0.6, 0.7, 0.8, 0.9, 0.9, 0.9], rtol=1e-6)

  def test_fedkd_server_compresses_its_update_at_the_rounds_energy(self):
    # A mean kernel update of singular values 3, 2, 1.5: the top two hold
    # 13 / 15.25 = 0.85 of the energy. Energy 0.5 -> 0.9 over 2 rounds:
    # round 0 keeps 0.7, rank 2, as 2 (D + C + 1) floats; round 1 keeps
    # 0.9, rank 3, whose factors would exceed the [D, C] kernel itself.
    alg = algorithms.fedkd(
        mentor=_linear(), mentee=_linear(), input_shape=toys.INPUT_SHAPE,
        num_clients=1, client_tx=optax.sgd(0.1), mentor_tx=optax.sgd(0.1),
        server_tx=optax.sgd(1.0), epochs=1, batch_size=4, energy_start=0.5,
        energy_end=0.9, num_rounds=2)
    params = _init()
    state = alg.init(params, jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    u = np.linalg.qr(rng.normal(size=(D, C)))[0]
    v = np.linalg.qr(rng.normal(size=(C, C)))[0]
    sv = np.array([3.0, 2.0, 1.5])
    mean = aggregation.Pooled(_params((u * sv) @ v.T, np.ones(C)))
    server_update = jax.jit(alg.server_update)
    for r, rank, floats in ((0, 2, 2 * (D + C + 1)), (1, 3, D * C)):
      new, metrics = server_update(state.replace(round=jnp.int32(r)), mean,
                                   None, None)
      got_w, got_b = _unpack(new.params)
      w0, b0 = _unpack(params)
      np.testing.assert_allclose(
          got_w - w0, (u[:, :rank] * sv[:rank]) @ v[:, :rank].T, atol=1e-5)
      np.testing.assert_allclose(got_b - b0, np.ones(C), atol=1e-6)
      self.assertEqual(int(metrics['update_floats']), floats + C)

  def test_feddf_round_ensemble_distillation(self):
    lr, server_lr, distill_lr, temp = 0.5, 0.5, 0.2, 2.0
    sizes = (4, 2)
    data = toys.toy_data(sizes)
    # Server lr 0.5: at 1, a linear model's average would equal the
    # ensemble, and distillation at any temperature would change nothing.
    alg = algorithms.feddf(
        model=_linear(), client_tx=optax.sgd(lr),
        server_tx=optax.sgd(server_lr), distill_tx=optax.sgd(distill_lr),
        epochs=1, batch_size=4, distill_epochs=1, public_batch_size=8,
        temperature=temp)
    params = _init()
    state, metrics = _round(alg, alg.init(params, None), data, [0, 1])
    w0, b0 = _unpack(params)
    xp = np.asarray(data.public_x, np.float64).reshape(toys.NUM_PUBLIC, -1)
    models = []
    for k in range(2):
      x, y = _client_arrays(data, k)
      models.append(_sgd(w0, b0, x, _softmax(x @ w0 + b0) - np.eye(C)[y], lr))
    mean = lambda vals: sum(n * v for n, v in zip(sizes, vals)) / sum(sizes)
    w = w0 + server_lr * (mean([m[0] for m in models]) - w0)
    b = b0 + server_lr * (mean([m[1] for m in models]) - b0)
    ensemble = mean([xp @ mw + mb for mw, mb in models])
    # The official KL has no T^2 factor: T^-2 times the Hinton gradient.
    w, b = _sgd(w, b, xp, _kd_grad(xp @ w + b, ensemble, temp) / temp**2,
                distill_lr)
    _assert_linear(state.params, w, b)
    # Only the parameters count as sent: 2 clients x 51 float32.
    self.assertEqual(int(metrics['upload_bytes']), 2 * 4 * (D * C + C))

  @parameterized.parameters((1000, 4, 5), (2, 1, 3))
  def test_feddf_keeps_the_most_accurate_model_on_its_validation(
      self, patience, kept, steps_run):
    lr, server_lr, distill_lr, num_val, steps = 0.5, 0.1, 3.0, 2, 5
    sizes = (4, 2)
    data = toys.toy_data(sizes)
    data = data.replace(public_y=jnp.asarray([2, 2, 0, 0, 0], jnp.int32))
    # Server lr 0.1: the averaged model stays far from the ensemble (at 1, a
    # linear model's average would equal the ensemble, nothing to distill).
    alg = algorithms.feddf(
        model=_linear(), client_tx=optax.sgd(lr),
        server_tx=optax.sgd(server_lr), distill_tx=optax.sgd(distill_lr),
        epochs=1, batch_size=4, distill_epochs=steps, public_batch_size=8,
        temperature=1.0, num_val=num_val, eval_every=1, patience=patience)
    state, metrics = _round(alg, alg.init(_init(), None), data, [0, 1])
    w0, b0 = _unpack(_init())
    xp = np.asarray(data.public_x, np.float64).reshape(toys.NUM_PUBLIC, -1)
    proxy = xp[num_val:]
    models = []
    for k in range(2):
      x, y = _client_arrays(data, k)
      models.append(_sgd(w0, b0, x, _softmax(x @ w0 + b0) - np.eye(C)[y], lr))
    mean = lambda vals: sum(n * v for n, v in zip(sizes, vals)) / sum(sizes)
    w = w0 + server_lr * (mean([m[0] for m in models]) - w0)
    b = b0 + server_lr * (mean([m[1] for m in models]) - b0)
    ensemble = mean([proxy @ mw + mb for mw, mb in models])
    # The averaged model, then each step's (one batch a pass).
    candidates = [(w, b)]
    for _ in range(steps):
      w, b = _sgd(w, b, proxy, _kd_grad(proxy @ w + b, ensemble, 1.0),
                  distill_lr)
      candidates.append((w, b))
    accuracy = [np.mean(np.argmax(xp[:num_val] @ cw + cb, -1) == [2, 2])
                for cw, cb in candidates]
    # By hand from these: the best is step 4, the last not; patience 2 stops
    # at step 3, two steps after step 1's 0.5.
    self.assertEqual(accuracy, [0.0, 0.5, 0.0, 0.0, 1.0, 0.0])
    _assert_linear(state.params, *candidates[kept])
    # The distillation loss: the mean KL over the proxy examples of the
    # steps run (the stopped ones report nothing), each before its update.
    p = _softmax(ensemble)
    kl = [np.sum(p * np.log(p / _softmax(proxy @ cw + cb)), -1)
          for cw, cb in candidates[:steps_run]]
    self.assertAlmostEqual(float(metrics['server_distill_loss']),
                           np.mean(kl), places=5)

  def test_feddf_distill_optimizer_clips_then_decays(self):
    # SGD at lr 1 shows the official transform: the gradient clipped to norm
    # 5, then a cosine decay over 2 epochs x ceil(5 / 2) batches = 6 steps.
    config = ml_collections.ConfigDict(dict(
        distill_optimizer='sgd', distill_lr=1.0, distill_schedule='cosine',
        distill_clip_norm=5.0, distill_epochs=2, public_batch_size=2))
    tx = builder.feddf_distill_tx(config, num_proxy=5)
    state, grad = tx.init(jnp.zeros(2)), jnp.array([6.0, 8.0])  # norm 10
    updates = []
    for _ in range(7):
      update, state = tx.update(grad, state)
      updates.append(np.asarray(update))
    lrs = [0.5 * (1 + np.cos(np.pi * min(t, 6) / 6)) for t in range(7)]
    np.testing.assert_allclose(
        updates, [-lr * np.array([3.0, 4.0]) for lr in lrs], atol=1e-6)

  def test_defaults_are_the_papers(self):
    config = default_config.get_config()
    self.assertEqual((config.prox_mu, config.ntd_tau, config.ntd_beta),
                     (1, 1, 1))
    self.assertEqual((config.distill_temperature, config.distill_clip_norm,
                      config.distill_schedule), (1.0, 5.0, 'cosine'))
    self.assertEqual((config.fedkd_loss_scale, config.fedkd_weighting),
                     ('batch', 'uniform'))

  def test_fd_two_rounds(self):
    lr, weight, temp = 0.5, 0.4, 2.0
    data = toys.toy_data((4, 3))
    alg = algorithms.fd(model=_linear(), input_shape=toys.INPUT_SHAPE,
                        num_clients=2, num_classes=C, client_tx=optax.sgd(lr),
                        epochs=1, batch_size=4, temperature=temp,
                        distill_weight=weight)
    state = alg.init(None, jax.random.PRNGKey(1))
    means, seen, expected = [], [], []
    for k in range(2):
      x, y = _client_arrays(data, k)
      w, b = _client(state, k)
      logits, onehot = x @ w + b, np.eye(C)[y]
      # Per-label mean of the logits of the step's forward pass.
      counts = onehot.sum(0)
      means.append(onehot.T @ logits / np.maximum(counts, 1)[:, None] *
                   (counts > 0)[:, None])
      seen.append((counts > 0).astype(float))
      # Round 1 has no global table yet: only (1 - w) CE.
      expected.append(_sgd(w, b, x, (1 - weight) *
                           (_softmax(logits) - onehot), lr))
    state, metrics = _round(alg, state, data, [0, 1])
    sums, rounds, counts = map(np.asarray, jax.tree.leaves(state.params))
    np.testing.assert_allclose(sums, means[0] + means[1], atol=1e-5)
    np.testing.assert_allclose(counts, seen[0] + seen[1])
    np.testing.assert_array_equal(rounds, np.zeros(C))  # all from round 0
    for k in range(2):
      np.testing.assert_allclose(_client(state, k)[0], expected[k][0],
                                 atol=1e-5)
    self.assertEqual(int(metrics['upload_bytes']), 2 * 4 * (C * C + C))

    # Client 0's own logits are in every entry of a label it holds, so its
    # target is client 1's mean logits, and none where client 1 lacks the
    # label.
    x, y = _client_arrays(data, 0)
    w, b = _client(state, 0)
    logits = x @ w + b
    ds = (1 - weight) * (_softmax(logits) - np.eye(C)[y]) + weight * (
        seen[1][y][:, None] * _kd_grad(logits, means[1][y], temp))
    w, b = _sgd(w, b, x, ds, lr)
    state, _ = _round(alg, state, data, [0], seed=3)
    np.testing.assert_allclose(_client(state, 0)[0], w, atol=1e-5)
    np.testing.assert_allclose(_client(state, 0)[1], b, atol=1e-5)

  def test_fd_target_excludes_the_clients_own_logits(self):
    """Jeong et al. 2018, Algorithm 1: each client distils toward the
    per-label average of the OTHER clients' uploads, under partial
    participation, against a numpy simulation of the rounds."""
    lr, weight, temp = 0.5, 0.5, 2.0
    # Labels {0, 1}, {0, 1}, {0, 2}: only client 2 ever sees label 2.
    labels = [[0, 1, 1], [0, 0, 1], [0, 2, 2]]
    data = toys.toy_data((3, 3, 3)).replace(
        y=jnp.asarray(sum(labels, []), jnp.int32))
    alg = algorithms.fd(model=_linear(), input_shape=toys.INPUT_SHAPE,
                        num_clients=3, num_classes=C, client_tx=optax.sgd(lr),
                        epochs=1, batch_size=4, temperature=temp,
                        distill_weight=weight)
    state = alg.init(None, jax.random.PRNGKey(1))
    apply = jax.jit(alg.apply)
    models = [_client(state, k) for k in range(3)]
    # label -> {client: its mean logits} of the label's latest reporting round
    table, used = {}, {}
    cohorts = [[0, 1, 2], [0], [1, 2], [0, 1, 2]]
    for r, ids in enumerate(cohorts):
      uploads = {}
      for k in ids:
        x, y = _client_arrays(data, k)
        w, b = models[k]
        logits = x @ w + b
        ds = (1 - weight) * (_softmax(logits) - np.eye(C)[y])
        for label in set(y.tolist()):
          others = {j: m for j, m in table.get(label, {}).items() if j != k}
          used[r, k, label] = sorted(others)
          rows = y == label
          if others:
            target = np.mean(list(others.values()), axis=0)
            ds[rows] += weight * _kd_grad(logits[rows], target, temp)
          uploads.setdefault(label, {})[k] = logits[rows].mean(0)
        models[k] = _sgd(w, b, x, ds, lr)
      table.update(uploads)
      state, _ = apply(state, data, toys.cohort(ids, size=3, num_clients=3),
                       jax.random.PRNGKey(r))
      for k in range(3):
        for got, want in zip(_client(state, k), models[k]):
          np.testing.assert_allclose(got, want, atol=1e-5,
                                     err_msg=f'round {r} client {k}')
    # The cases the rounds went through, as (round, client, label): own
    # logits left out of the entry that holds them;
    self.assertEqual(used[1, 0, 0], [1, 2])
    # an entry from an earlier round without the client, taken whole;
    self.assertEqual(used[2, 1, 0], [0])
    self.assertEqual(used[3, 0, 0], [1, 2])
    # no target where the client sent the entry alone, or alone saw the label.
    self.assertEqual(used[3, 1, 1], [])
    self.assertEqual(used[2, 2, 2], [])

  def test_fd_labels_a_straggler_missed_keep_its_last_upload(self):
    # One step of batch 1 (a quarter of 4): the client sees one label; the
    # others keep the mean logits and round of its last upload (here 7s
    # from round 5), which tell its targets where an entry holds them.
    data = toys.toy_data((4,)).replace(
        y=jnp.asarray([0, 0, 1, 2], jnp.int32),
        work_fraction=jnp.float32(0.25))
    alg = algorithms.fd(model=_linear(), input_shape=toys.INPUT_SHAPE,
                        num_clients=1, num_classes=C,
                        client_tx=optax.sgd(0.5), epochs=1, batch_size=1,
                        temperature=2.0, distill_weight=0.5)
    state = alg.init(None, jax.random.PRNGKey(1))
    params, opt_state, _ = jax.tree.map(lambda a: a[0], state.clients)
    last = (jnp.full((C, C), 7.0), jnp.full((C,), 5, jnp.int32))
    out = jax.jit(alg.client_update)(
        state.replace(clients=(), round=jnp.int32(9)),
        (params, opt_state, last), data, 0, jnp.int32(4),
        jax.random.PRNGKey(0))
    seen = np.asarray(out.upload.value[1]) > 0
    self.assertEqual(seen.sum(), 1)
    own, rounds = map(np.asarray, out.state[2])
    np.testing.assert_array_equal(own[~seen], 7.0)
    np.testing.assert_array_equal(rounds, np.where(seen, 9, 5))
    np.testing.assert_allclose(own[seen], out.upload.value[0][seen])

  def test_fedmd_two_rounds(self):
    lr = 0.5
    data = toys.toy_data((4, 3))
    alg = _fedmd(lr, epochs=1, digest_epochs=1)
    state = alg.init(None, jax.random.PRNGKey(1))
    xp = np.asarray(data.public_x, np.float64).reshape(toys.NUM_PUBLIC, -1)

    def revisit(k, w, b):
      x, y = _client_arrays(data, k)
      return _sgd(w, b, x, _softmax(x @ w + b) - np.eye(C)[y], lr)

    models = [revisit(k, *_client(state, k)) for k in range(2)]
    state, metrics = _round(alg, state, data, [0, 1])
    consensus = sum(xp @ w + b for w, b in models) / 2
    np.testing.assert_allclose(state.params[0], consensus, atol=1e-5)
    self.assertEqual(int(metrics['upload_bytes']),
                     2 * 4 * toys.NUM_PUBLIC * C)
    self.assertEqual(float(metrics['digest_loss_sum']), 0.0)  # none yet

    # Round 2 digests: the mean absolute error's gradient is sign / K.
    w, b = models[0]
    digest_sum = np.abs(xp @ w + b - consensus).mean(-1).sum()
    w, b = _sgd(w, b, xp, np.sign(xp @ w + b - consensus) / C, lr)
    w, b = revisit(0, w, b)
    state, metrics = _round(alg, state, data, [0], seed=3)
    self.assertAlmostEqual(float(metrics['digest_loss_sum']), digest_sum,
                           places=4)
    np.testing.assert_allclose(_client(state, 0)[0], w, atol=1e-5)
    np.testing.assert_allclose(state.params[0], xp @ w + b, atol=1e-5)

  def test_fedmd_transfer_learning_public_then_private(self):
    lr, public_y = 0.5, np.array([0, 2, 1, 1, 0], np.int32)
    data = toys.toy_data((4, 3)).replace(public_y=jnp.asarray(public_y))
    make = lambda **kw: _fedmd(lr, epochs=1, digest_epochs=1, **kw)
    rng = jax.random.PRNGKey(1)
    untrained = make().init(None, rng)
    state = jax.jit(make(transfer_epochs=2, private_epochs=1).init)(
        None, rng, data)
    xp = np.asarray(data.public_x, np.float64).reshape(toys.NUM_PUBLIC, -1)
    ce_step = lambda w, b, x, y: _sgd(w, b, x, _softmax(x @ w + b) -
                                      np.eye(C)[y], lr)
    for k in range(2):
      w, b = _client(untrained, k)
      for _ in range(2):  # full-batch steps on the labelled public data
        w, b = ce_step(w, b, xp, public_y)
      _assert_linear(jax.tree.map(lambda a: a[k], state.clients[0]),
                     *ce_step(w, b, *_client_arrays(data, k)))
    with self.assertRaisesRegex(ValueError, 'public labels'):
      make(transfer_epochs=1).init(None, rng)

  def test_fedmd_straggler_digests_and_revisits_its_fraction(self):
    lr = 0.5
    data = toys.toy_data((4, 3))
    alg = _fedmd(lr, epochs=2, digest_epochs=2)
    state, _ = _round(alg, alg.init(None, jax.random.PRNGKey(1)), data,
                      [0, 1])
    xp = np.asarray(data.public_x, np.float64).reshape(toys.NUM_PUBLIC, -1)
    x, y = _client_arrays(data, 0)
    # Half of 2 full-batch digest steps and of 2 revisit steps: one each.
    w, b = _client(state, 0)
    w, b = _sgd(w, b, xp, np.sign(xp @ w + b - state.params[0]) / C, lr)
    w, b = _sgd(w, b, x, _softmax(x @ w + b) - np.eye(C)[y], lr)
    out = jax.jit(alg.client_update)(
        state.replace(clients=()), jax.tree.map(lambda a: a[0], state.clients),
        data.replace(work_fraction=jnp.float32(0.5)), 0, jnp.int32(4),
        jax.random.PRNGKey(0))
    _assert_linear(out.state[0], w, b)
    self.assertEqual(int(out.metrics['train_examples']), 4)


if __name__ == '__main__':
  absltest.main()
