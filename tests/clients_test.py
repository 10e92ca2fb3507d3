"""Local batching, client stacking and cohort sampling."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from fedkd import clients


class LocalBatchesTest(parameterized.TestCase):

  @parameterized.parameters((7, 12, 2, 3), (12, 12, 1, 5), (1, 4, 3, 2),
                            (0, 5, 2, 2))
  def test_each_epoch_visits_every_real_example_once(self, n, max_n, epochs,
                                                     batch):
    idx, mask = clients.local_batches(jax.random.PRNGKey(n), n, max_n,
                                      epochs=epochs, batch_size=batch)
    steps_per_epoch = -(-max_n // batch)
    self.assertEqual(idx.shape, (epochs * steps_per_epoch, batch))
    idx, mask = np.asarray(idx), np.asarray(mask)
    for e in range(epochs):
      rows = slice(e * steps_per_epoch, (e + 1) * steps_per_epoch)
      self.assertEqual(sorted(idx[rows][mask[rows]]), list(range(n)))
    self.assertEqual(mask.sum(), n * epochs)

  def test_epochs_are_shuffled_differently(self):
    idx, _ = clients.local_batches(jax.random.PRNGKey(0), 20, 20, epochs=2,
                                   batch_size=20)
    self.assertFalse(np.array_equal(idx[0], idx[1]))


class StackAndSampleTest(absltest.TestCase):

  def test_stack_clients_lays_clients_back_to_back(self):
    x = np.arange(10, dtype=np.float32).reshape(5, 2)
    y = np.arange(5)
    data = clients.stack_clients(
        x, y, [np.array([4, 0]), np.array([2]), np.array([1, 3])])
    np.testing.assert_array_equal(data.num_examples, [2, 1, 2])
    np.testing.assert_array_equal(data.offsets, [0, 2, 3])
    np.testing.assert_array_equal(data.x, x[[4, 0, 2, 1, 3]])
    np.testing.assert_array_equal(data.y, [4, 0, 2, 1, 3])
    self.assertEqual(data.max_examples, 2)

  def test_sample_cohort(self):
    cohort = clients.sample_cohort(np.random.default_rng(0), 10, 4, 8)
    ids, mask = cohort
    self.assertLen(set(ids[:4]), 4)
    self.assertTrue(np.all(ids[:4] < 10))
    np.testing.assert_array_equal(ids[4:], [10] * 4)  # padding: past the end
    np.testing.assert_array_equal(mask, [True] * 4 + [False] * 4)


if __name__ == '__main__':
  absltest.main()
