"""Exact upload and download bytes per round, against hand computation."""

import types

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedkd import algorithm
from fedkd import algorithms
from fedkd import clients
from fedkd import communication
from fedkd import compression
from fedkd import models
from fedkd import train
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
    # Jeong et al. 2018, Table 1: FD's payload is K x K logits, FedAvg's the
    # whole model, whatever its size. Up: K x K mean logits + K presence
    # flags. Down: the table's K x K logit sums + K client counts + K rounds
    # (int32, 4 bytes too), which each client needs to leave its own logits
    # out of its target.
    self._assert_bytes('fd', 4 * (K * K + K), 4 * (K * K + 2 * K))
    self.assertLess(4 * (K * K + 2 * K), STUDENT_BYTES)

  def test_fedmd_sends_logits_on_the_public_data(self):
    self._assert_bytes('fedmd', 4 * toys.NUM_PUBLIC * K,
                       4 * toys.NUM_PUBLIC * K)

  def test_fedkd_sends_svd_factors_never_more_than_dense(self):
    m = self.metrics['fedkd']
    # Each kernel [m, n] costs r (m + n + 1) floats for a rank r >= 1, or
    # m n when that is less; the biases (8 + 3) go whole. Exact ranks are
    # checked against numpy in golden_test and compression_test.
    least = 4 * ((D + 8 + 1) + (8 + K + 1) + 8 + K)
    self.assertBetween(int(m['upload_bytes']), REPORTING * least,
                       REPORTING * STUDENT_BYTES)
    # Round 1: every client's first download is the whole mentee.
    self.assertEqual(int(m['download_bytes']), REPORTING * STUDENT_BYTES)

  def test_svd_of_a_non_finite_update_is_nan_not_a_hang(self):
    bad = jnp.ones((4, 3)).at[1, 2].set(jnp.nan)
    update, _ = jax.jit(compression.svd_compress)({'w': bad}, 0.9)
    self.assertTrue(np.all(np.isnan(update['w'])))


def _svd_floats(update):
  """Floats of a compressed update, from its numpy ranks: r (m + n + 1) per
  kernel whose factors are smaller than the kernel, m n otherwise; vectors
  whole."""
  total = 0
  for leaf in jax.tree.leaves(update):
    leaf = np.asarray(leaf, np.float64)
    if leaf.ndim < 2:
      total += leaf.size
      continue
    m, n = leaf.reshape(-1, leaf.shape[-1]).shape
    rank = np.linalg.matrix_rank(leaf.reshape(m, n), tol=1e-6)
    total += rank * (m + n + 1) if rank * (m + n + 1) < m * n else m * n
  return total


class FedKDBacklogTest(absltest.TestCase):
  """Each sampled client downloads min(missed updates, whole mentee)."""

  def test_partial_participation_over_rounds_with_a_changing_energy(self):
    n = len(SIZES)
    alg = toys.algorithms(n)['fedkd']  # energy 0.8 -> 0.9 over 3 rounds
    data, apply = toys.toy_data(SIZES), jax.jit(alg.apply)
    cohorts = ([0, 2, 3, 5], [1, 2, 4], [0, 1, 2, 3], [5])
    state = toys.init_state(alg)
    full = STUDENT_BYTES // 4
    owed = [full] * n  # what each client needs, by hand
    for r, ids in enumerate(cohorts):
      new, m = apply(state, data, toys.cohort(ids, size=4, num_clients=n),
                     jax.random.PRNGKey(r))
      self.assertEqual(int(m['download_bytes']),
                       4 * sum(owed[i] for i in ids), f'round {r + 1}')
      # The applied update (server sgd(1.0)) is what was compressed.
      update = _svd_floats(jax.tree.map(jnp.subtract, new.params,
                                        state.params))
      owed = [min(update + (0 if i in ids else owed[i]), full)
              for i in range(n)]
      np.testing.assert_array_equal(new.backlog, owed)
      state = new
    self.assertLess(min(owed), full)  # some client only needs an update

  def test_with_adam_on_the_server_the_applied_update_is_compressed(self):
    # Adam rescales each coordinate, so the compressed mean it receives
    # turns into a full-rank step; clients can only follow the server if
    # that step, new - old, is what is compressed and sent.
    alg = algorithms.fedkd(
        mentor=toys.teacher(), mentee=toys.student(),
        input_shape=toys.INPUT_SHAPE, num_clients=len(SIZES),
        client_tx=optax.sgd(0.1), mentor_tx=optax.sgd(0.05),
        server_tx=optax.adam(0.01), epochs=1, batch_size=3,
        energy_start=0.8, energy_end=0.9, num_rounds=3)
    state = toys.init_state(alg)
    new, _ = jax.jit(alg.apply)(state, toys.toy_data(SIZES),
                                toys.cohort([0, 2, 3, 5]),
                                jax.random.PRNGKey(0))
    floats = _svd_floats(jax.tree.map(jnp.subtract, new.params,
                                      state.params))
    self.assertLess(floats, STUDENT_BYTES // 4)
    np.testing.assert_array_equal(np.asarray(new.backlog)[[0, 2, 3, 5]],
                                  floats)


def _echo(server, client_state, data, client_id, num_examples, rng):
  """A client that uploads two zeros: only the byte counts matter here."""
  del server, data, client_id, rng
  return clients.ClientOutput(
      upload=jnp.zeros(2), weight=num_examples.astype(jnp.float32),
      state=client_state, metrics={'train_examples': num_examples})


# Examples each client trains on in `_trained`: 10,000 such clients train
# on 2,621,440,000, past int32's 2,147,483,647.
_TRAINED = 2**18


def _trained(server, client_state, data, client_id, num_examples, rng):
  """A client that reports `_TRAINED` examples trained on, as
  `clients.local_training` counts them, at a loss of 0.5 each."""
  del server, data, client_id, rng
  return clients.ClientOutput(
      upload=jnp.zeros(2), weight=num_examples.astype(jnp.float32),
      state=client_state, metrics={
          'train_examples': communication.counted(jnp.int32(_TRAINED)),
          'student_loss_sum': jnp.float32(_TRAINED / 2)})


class LargeScaleBytesTest(absltest.TestCase):
  """Byte figures beyond int32: exact Python ints from static shapes."""

  def test_10000_clients_of_mnist_cnn_size(self):
    num = 10_000
    shapes = jax.eval_shape(models.get_model('mnist_cnn', 10).init,
                            jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    self.assertEqual(tree_bytes(shapes), 6_653_480)  # 1,663,370 floats
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    data = toys.one_example_clients(num)
    cohort = toys.cohort(list(range(num)))
    update_floats = 1_000_000
    # A FedKD-like server: each client first downloads the whole model.
    apply = jax.jit(algorithm.make_round(
        _echo, lambda state, mean, data, rng: (
            state, {'update_floats': jnp.int32(update_floats)})))
    state = algorithm.with_backlog(
        algorithm.server_init(optax.identity(), params), num)
    totals, cumulative = [], 0
    for r in range(2):
      state, m = apply(state, data, cohort, jax.random.PRNGKey(r))
      totals.append((int(m['upload_bytes']), int(m['download_bytes'])))
      self.assertGreater(cumulative + sum(totals[-1]), cumulative)
      cumulative += sum(totals[-1])
    self.assertEqual(totals, [(80_000, 66_534_800_000),
                              (80_000, 40_000_000_000)])
    # A whole-model broadcast of the same size, 10,000 times.
    apply = jax.jit(algorithm.make_round(
        _echo, lambda state, mean, data, rng: (state, {
            'download_bytes': communication.fixed(1, tree_bytes(shapes))})))
    _, m = apply(algorithm.server_init(optax.identity(), jnp.zeros(1)), data,
                 cohort, jax.random.PRNGKey(0))
    self.assertEqual(int(m['download_bytes']), 66_534_800_000)

  def test_examples_trained_past_2_31_are_exact(self):
    num = 10_000
    m = toys.round_of_one_example_clients(_trained, num, jnp.zeros(2),
                                          clients_per_chunk=1000)
    self.assertEqual(int(m['train_examples']), num * _TRAINED)
    # The reported mean: 1,310,720,000 / 2,621,440,000 (an int32 sum of the
    # examples wrapped to -1,673,527,296, and the mean became 1.3e9).
    row = train._row(types.SimpleNamespace(compile_seconds=0.0), m, 1, 0.0,
                     {}, {}, None)
    self.assertEqual(row['student_train_loss'], 0.5)

  def test_traced_float_counts_are_exact(self):
    values = jnp.array([2**31 - 1, 1_663_370, 0, 2047, 2048], jnp.int32)
    self.assertEqual(int(jax.jit(communication.summed)(values)),
                     4 * (2**31 - 1 + 1_663_370 + 2047 + 2048))

  def test_counts_summed_over_the_most_clients_are_exact(self):
    values = jnp.full(communication.MAX_CLIENTS, 2**31 - 1, jnp.int32)
    total = jax.jit(lambda v: jax.tree.map(
        lambda c: jnp.sum(c, axis=0), communication.counted(v)))(values)
    self.assertEqual(int(total), communication.MAX_CLIENTS * (2**31 - 1))

  def test_sums_of_different_units_keep_each_count_with_its_unit(self):
    # 3 transfers of 100 bytes, then 5 float32 values, then 2 of 7 bytes.
    total = (communication.fixed(3, 100) + communication.floats(5)
             + communication.fixed(1, 7).times(2))
    self.assertEqual(int(total), 3 * 100 + 4 * 5 + 2 * 7)
    self.assertEqual(int(communication.floats(5) + communication.fixed(3, 100)),
                     4 * 5 + 3 * 100)


if __name__ == '__main__':
  absltest.main()
