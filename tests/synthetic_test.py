"""Synthetic(alpha, beta) against the distribution it is defined by."""

from absl.testing import absltest
import numpy as np

from fedkd import synthetic


def _generate(num_clients=40, alpha=1.0, beta=1.0, max_examples=400, seed=0):
  return synthetic.synthetic(num_clients, alpha=alpha, beta=beta,
                             max_examples=max_examples, seed=seed)


class SyntheticTest(absltest.TestCase):

  def test_shapes_and_natural_partition(self):
    data, parts = _generate()
    self.assertEqual(data.x_train.shape[1:], (60,))
    self.assertEqual(data.num_classes, 10)
    self.assertLen(parts, 40)
    covered = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(covered, np.arange(len(data.y_train)))
    sizes = np.array([len(p) for p in parts])
    # 90% of lognormal(4, 2) + 50 truncated at 400.
    self.assertTrue(np.all(sizes >= 45) and np.all(sizes <= 360))
    self.assertBetween(len(data.y_test) / (len(data.y_test) + sizes.sum()),
                       0.09, 0.12)

  def test_seeded(self):
    a, _ = _generate(seed=3)
    b, _ = _generate(seed=3)
    c, _ = _generate(seed=4)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    self.assertFalse(np.array_equal(a.y_train[:50], c.y_train[:50]))

  def test_input_covariance_is_diag_j_pow_minus_1_2(self):
    data, parts = _generate(num_clients=200)
    # Within a client, inputs scatter around the client's mean v_k.
    centered = np.concatenate(
        [data.x_train[p] - data.x_train[p].mean(axis=0) for p in parts])
    want = np.arange(1, 61) ** -1.2
    np.testing.assert_allclose(centered.var(axis=0), want, rtol=0.1)

  def test_beta_spreads_client_input_means(self):
    def spread(beta):
      data, parts = _generate(num_clients=200, beta=beta, max_examples=60)
      return np.var([data.x_train[p].mean() for p in parts])
    # A client's mean input is about B_k, with std beta (as in the paper's
    # code), plus N(0, 1/60) from v_k's coordinates.
    self.assertLess(spread(0.0), 0.05)
    self.assertBetween(spread(2.0), 2.5, 6.0)

  def test_min_bytes_is_the_smallest_clients_size(self):
    # Clients truncated at 50 examples are the smallest there can be.
    data, _ = _generate(num_clients=7, max_examples=50)
    arrays = (data.x_train, data.y_train, data.x_test, data.y_test)
    self.assertEqual(sum(a.nbytes for a in arrays), synthetic.min_bytes(7))


if __name__ == '__main__':
  absltest.main()
