"""Whole client rounds with linear models, against numpy done by hand.

Every client's data fits in one batch, so each local epoch is one full-batch
gradient step whatever the shuffle, and the expected parameters follow from
the softmax-regression gradient `x^T (softmax(x W + b) - onehot(y)) / n`.
"""

from absl.testing import absltest
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

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


def _client_arrays(data, k):
  start, n = int(data.offsets[k]), int(data.num_examples[k])
  rows = slice(start, start + n)
  return (np.asarray(data.x[rows], np.float64).reshape(n, -1),
          np.asarray(data.y[rows]))


class GoldenTest(absltest.TestCase):

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
    new_state, _ = jax.jit(alg.apply)(state, data, toys.cohort([0]),
                                      jax.random.PRNGKey(2))
    x, y = _client_arrays(data, 0)
    onehot = np.eye(C)[y]
    sw, sb = _unpack(params)
    for _ in range(2):
      t_logits = x @ tw + tb
      s_logits = x @ sw + sb
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


if __name__ == '__main__':
  absltest.main()
