"""Losses and aggregation against values computed by hand."""

from absl.testing import absltest
import jax.numpy as jnp
import numpy as np

from fedkd import aggregation
from fedkd import losses


def _softmax(z):
  e = np.exp(z - z.max())
  return e / e.sum()


class LossesTest(absltest.TestCase):

  def test_cross_entropy(self):
    logits = jnp.array([[0.0, np.log(3.0)]])  # p = [1/4, 3/4]
    np.testing.assert_allclose(
        losses.cross_entropy(logits, jnp.array([1])), [-np.log(0.75)],
        rtol=1e-6)

  def test_distillation_matches_hand_computed_kl(self):
    s, t, temp = np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0]), 2.0
    p, q = _softmax(t / temp), _softmax(s / temp)
    expected = temp**2 * np.sum(p * np.log(p / q))
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
