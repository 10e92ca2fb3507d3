"""Exact upload and download bytes per round, against hand computation."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from fedkd import compression
from fedkd.algorithm import tree_bytes
import toys

SIZES = (7, 3, 12, 5, 9, 1)
REPORTING = 4
D = 16  # features of a toy example
# The toy student: Dense(16 -> 8), Dense(8 -> 3), float32.
STUDENT_BYTES = 4 * (D * 8 + 8 + 8 * toys.NUM_CLASSES + toys.NUM_CLASSES)
K = toys.NUM_CLASSES


class BytesTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.metrics = {}
    data = toys.toy_data(SIZES)
    # 4 reporting clients in a cohort padded to 6 slots: padding sends nothing.
    cohort = toys.cohort([0, 2, 3, 5], size=6, num_clients=len(SIZES))
    for name, alg in toys.algorithms(len(SIZES)).items():
      _, cls.metrics[name] = jax.jit(alg.apply)(
          toys.init_state(alg), data, cohort, jax.random.PRNGKey(0))

  def _assert_bytes(self, name, upload, download):
    m = self.metrics[name]
    self.assertEqual(int(m['upload_bytes']), REPORTING * upload, name)
    self.assertEqual(int(m['download_bytes']), REPORTING * download, name)

  def test_toy_student_size(self):
    self.assertEqual(STUDENT_BYTES, tree_bytes(toys.init_state(
        toys.algorithms(1)['fedavg']).params))

  def test_parameter_averaging_sends_the_student_both_ways(self):
    for name in ('fedavg', 'fedprox', 'fedntd', 'local_kd', 'feddf'):
      self._assert_bytes(name, STUDENT_BYTES, STUDENT_BYTES)

  def test_fd_sends_per_label_logits_not_parameters(self):
    # Jeong et al. 2018, Table 1: FD's payload is K x K logits (plus here K
    # presence flags), FedAvg's the whole model, whatever its size.
    self._assert_bytes('fd', 4 * (K * K + K), 4 * (K * K + K))
    self.assertLess(4 * (K * K + K), STUDENT_BYTES)

  def test_fedmd_sends_logits_on_the_public_data(self):
    self._assert_bytes('fedmd', 4 * toys.NUM_PUBLIC * K,
                       4 * toys.NUM_PUBLIC * K)

  def test_fedkd_sends_svd_factors_never_more_than_dense(self):
    m = self.metrics['fedkd']
    # Each kernel [m, n] costs r (m + n + 1) floats for a rank r >= 1, or
    # m n when that is less; the biases (8 + 3) go whole. Exact ranks are
    # checked against numpy in golden_test and compression_test.
    least = 4 * ((D + 8 + 1) + (8 + K + 1) + 8 + K)
    for key in ('upload_bytes', 'download_bytes'):
      self.assertBetween(int(m[key]), REPORTING * least,
                         REPORTING * STUDENT_BYTES)

  def test_svd_of_a_non_finite_update_is_nan_not_a_hang(self):
    bad = jnp.ones((4, 3)).at[1, 2].set(jnp.nan)
    update, _ = jax.jit(compression.svd_compress)({'w': bad}, 0.9)
    self.assertTrue(np.all(np.isnan(update['w'])))


if __name__ == '__main__':
  absltest.main()
