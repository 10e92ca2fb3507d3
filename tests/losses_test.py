"""Losses and aggregation against values computed by hand."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from fedkd import aggregation
from fedkd import losses


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _kl(p, q):
  """KL(p || q) over the last axis."""
  return np.sum(p * np.log(p / q), -1)


class LossesTest(absltest.TestCase):

  def test_cross_entropy(self):
    logits = jnp.array([[0.0, np.log(3.0)]])  # p = [1/4, 3/4]
    np.testing.assert_allclose(
        losses.cross_entropy(logits, jnp.array([1])), [-np.log(0.75)],
        rtol=1e-6)

  def test_distillation_matches_hand_computed_kl(self):
    # Not mirror images of each other: KL(p || q) != KL(q || p) here.
    s, t, temp = np.array([1.0, 2.0, 3.0]), np.array([0.5, 3.0, -1.0]), 2.0
    p, q = _softmax(t / temp), _softmax(s / temp)
    self.assertGreater(abs(_kl(p, q) - _kl(q, p)), 1e-2)
    expected = temp**2 * _kl(p, q)
    got = losses.distillation(jnp.array([s]), jnp.array([t]), temp)
    np.testing.assert_allclose(got, [expected], rtol=1e-5)
    # Zero when the student already matches the teacher.
    np.testing.assert_allclose(
        losses.distillation(jnp.array([t]), jnp.array([t]), temp), [0.0],
        atol=1e-6)

  def test_masked_mean_ignores_padding(self):
    values = jnp.array([1.0, 2.0, 100.0])
    self.assertAlmostEqual(
        float(losses.masked_mean(values, jnp.array([1, 1, 0]))), 1.5)
    self.assertEqual(float(losses.masked_mean(values, jnp.zeros(3))), 0.0)

  def test_mutual_kl_runs_from_the_target_and_reaches_both_models(self):
    target, logits = np.array([0.5, 3.0, -1.0]), np.array([1.0, 2.0, 3.0])
    p, q = _softmax(target), _softmax(logits)
    kl = lambda a, b: losses.mutual_kl(a[None], b[None])[0]
    np.testing.assert_allclose(
        kl(jnp.asarray(target), jnp.asarray(logits)), _kl(p, q), rtol=1e-5)
    # Nothing detached: d KL(softmax(a) || q) / da = p (v - p . v), v =
    # log p - log q, and d / db = q - p.
    g_target, g_logits = jax.grad(kl, argnums=(0, 1))(
        jnp.asarray(target), jnp.asarray(logits))
    v = np.log(p) - np.log(q)
    np.testing.assert_allclose(g_target, p * (v - np.sum(p * v)), atol=1e-6)
    np.testing.assert_allclose(g_logits, q - p, atol=1e-6)


class AdaptiveMutualDistillationTest(parameterized.TestCase):
  """3 real examples of 4 classes, then 2 padding rows of large logits."""

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.t = rng.normal(size=(5, 4))  # mentor
    self.s = rng.normal(size=(5, 4))  # mentee
    self.t[3:] *= 30
    self.s[3:] *= 30
    self.y = np.array([0, 3, 1, 2, 2])
    self.mask = np.array([1.0, 1.0, 1.0, 0.0, 0.0])

  def _loss(self, per_example, rows=slice(None)):
    return lambda t, s: losses.adaptive_mutual_distillation(
        t, s, jnp.asarray(self.y[rows]), jnp.asarray(self.mask[rows]),
        per_example=per_example)

  @parameterized.parameters(False, True)
  def test_matches_numpy_on_the_real_examples(self, per_example):
    t, s, y = self.t[:3], self.s[:3], self.y[:3]
    pt, ps = _softmax(t), _softmax(s)
    ce_t = -np.log(pt[np.arange(3), y])
    ce_s = -np.log(ps[np.arange(3), y])
    if per_example:
      scale = 1 / (ce_t + ce_s)
      loss_t, loss_s = ce_t + scale * _kl(ps, pt), ce_s + scale * _kl(pt, ps)
      expected = np.mean(loss_t + loss_s)
      sums = (np.sum(loss_t), np.sum(loss_s))
    else:
      # nn.KLDivLoss's 'mean' divides by the K = 4 classes too.
      scale = 1 / (4 * (np.mean(ce_t) + np.mean(ce_s)))
      loss_t = np.mean(ce_t) + scale * np.mean(_kl(ps, pt))
      loss_s = np.mean(ce_s) + scale * np.mean(_kl(pt, ps))
      expected, sums = loss_t + loss_s, (3 * loss_t, 3 * loss_s)
    loss, got_sums = self._loss(per_example)(jnp.asarray(self.t),
                                             jnp.asarray(self.s))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(got_sums, sums, rtol=1e-5)

  @parameterized.parameters(False, True)
  def test_padding_rows_get_no_gradient(self, per_example):
    grad = lambda fn, t, s: jax.grad(lambda *a: fn(*a)[0], argnums=(0, 1))(
        jnp.asarray(t), jnp.asarray(s))
    padded = grad(self._loss(per_example), self.t, self.s)
    real = grad(self._loss(per_example, slice(3)), self.t[:3], self.s[:3])
    for got, want in zip(padded, real):
      np.testing.assert_allclose(got[:3], want, atol=1e-6)
      np.testing.assert_array_equal(got[3:], 0.0)


class AggregationTest(absltest.TestCase):

  def test_weighted_mean_by_hand(self):
    tree = {'a': jnp.array([[1.0, 2.0], [3.0, 4.0], [50.0, 60.0]])}
    weights = jnp.array([1.0, 3.0, 0.0])  # the last client is padding
    (mean,) = aggregation.group_means(
        (aggregation.weighted_sum(tree, weights),), (jnp.sum(weights),))
    np.testing.assert_allclose(mean['a'], [(1 + 9) / 4, (2 + 12) / 4])

  def test_all_zero_weights_give_zeros(self):
    (mean,) = aggregation.group_means(
        (aggregation.weighted_sum(jnp.ones((2, 3)), jnp.zeros(2)),), (0.0,))
    np.testing.assert_array_equal(mean, np.zeros(3))


if __name__ == '__main__':
  absltest.main()
