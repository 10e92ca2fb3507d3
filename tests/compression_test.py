"""FedKD's truncated SVD against numpy's, and a 2NN round that cannot hang."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedkd import algorithms
from fedkd import clients
from fedkd import compression
from fedkd import models

_COMPRESS = jax.jit(compression.svd_compress)


def _numpy_truncation(a, energy):
  """(rank, U_r S_r V_r^T) by numpy's SVD in float64, FedKD's criterion."""
  u, s, vt = np.linalg.svd(a.astype(np.float64), full_matrices=False)
  if not s.any():
    return 0, np.zeros_like(a, np.float64)
  fraction = np.cumsum(s**2) / np.sum(s**2)
  rank = min(int(np.sum(fraction < energy)) + 1, len(s))
  return rank, (u[:, :rank] * s[:rank]) @ vt[:rank]


def _factor_bytes(rank, m, n):
  """What FedKD sends for a rank-r factorisation: less than dense, or dense."""
  factors = rank * (m + n + 1)
  return 4 * (factors if factors < m * n else m * n)


def _matrix(kind, shape, seed=0):
  """A float32 test matrix: Gaussian, of a given rank, or fast decaying."""
  rng = np.random.default_rng(seed)
  m, n = shape
  if kind.startswith('rank'):
    k = int(kind[4:])
    a = rng.normal(size=(m, k)) @ rng.normal(size=(k, n))
  elif kind == 'decaying':  # singular values 0.7^i, random singular vectors
    u = np.linalg.qr(rng.normal(size=(m, min(shape))))[0]
    v = np.linalg.qr(rng.normal(size=(n, min(shape))))[0]
    a = (u * 0.7**np.arange(min(shape))) @ v.T
  else:
    a = rng.normal(size=shape)
  return a.astype(np.float32)


def _compress(a, energy):
  """(the matrix received, bytes sent)."""
  update, sent = _COMPRESS({'w': jnp.asarray(a)}, energy)
  return np.asarray(update['w'], np.float64), 4 * int(sent)


class OrthonormalizeTest(absltest.TestCase):

  def test_orthonormal_basis_of_the_span_with_dependent_columns_zero(self):
    rng = np.random.default_rng(3)
    y = rng.normal(size=(200, 40))
    y[:, 5] = 2 * y[:, 1] - y[:, 3]  # dependent on earlier columns
    y[:, 9] = 0
    y[:, 20] = y[:, 11] + 1e-7 * rng.normal(size=200)  # dependent in float32
    y[:, 30] *= 1e4  # columns of very different norms
    y[:, 31] *= 1e-4
    # Nearly dependent but kept: one pass on the Gram matrix, which squares
    # the condition number, would leave these 0.09 from orthogonal.
    y[:, 25] = y[:, 24] + 1e-3 * rng.normal(size=200)
    q = np.asarray(jax.jit(compression._orthonormalize)(
        jnp.asarray(y, jnp.float32)), np.float64)
    dropped = [5, 9, 20]
    kept = [j for j in range(40) if j not in dropped]
    np.testing.assert_array_equal(q[:, dropped], 0)
    np.testing.assert_allclose(q[:, kept].T @ q[:, kept], np.eye(len(kept)),
                               atol=1e-5)
    # Gram-Schmidt: column j of q is in the span of y's first j + 1 columns.
    for j in kept:
      basis = np.linalg.qr(y[:, :j + 1])[0]
      np.testing.assert_allclose(basis @ (basis.T @ q[:, j]), q[:, j],
                                 atol=1e-4)


class SvdCompressTest(parameterized.TestCase):

  # Gram matrices this small are diagonalised exactly (Jacobi).
  @parameterized.parameters((12, 7), (7, 12), (9, 9))
  def test_small_matrices_match_numpy(self, m, n):
    for kind in ('gaussian', 'rank0', 'rank1', 'rank3', 'decaying'):
      for energy in (0.5, 0.9, 0.99):
        with self.subTest(kind=kind, energy=energy):
          a = _matrix(kind, (m, n))
          rank, expected = _numpy_truncation(a, energy)
          got, sent = _compress(a, energy)
          self.assertEqual(sent, _factor_bytes(rank, m, n))
          if rank * (m + n + 1) >= m * n:
            expected = a  # Sent dense: exact.
          np.testing.assert_allclose(got, expected,
                                     atol=2e-5 * np.abs(a).max())

  # Larger ones go by blocks of subspace iteration (a Gram side of 60 here,
  # above _BLOCK + _OVERSAMPLE).
  @parameterized.parameters((150, 60), (60, 150))
  def test_large_decaying_and_low_rank_matrices_match_numpy(self, m, n):
    for kind, energy in (('decaying', 0.9), ('decaying', 0.999),
                         ('rank5', 0.95), ('rank0', 0.9)):
      with self.subTest(kind=kind, energy=energy):
        a = _matrix(kind, (m, n))
        rank, expected = _numpy_truncation(a, energy)
        got, sent = _compress(a, energy)
        self.assertEqual(sent, _factor_bytes(rank, m, n))
        np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(a).max())

  @parameterized.parameters((150, 60), (60, 150))
  def test_large_flat_spectrum_keeps_the_energy_with_a_near_optimal_rank(
      self, m, n):
    a = _matrix('gaussian', (m, n), seed=1)
    total = np.sum(a.astype(np.float64)**2)
    for energy in (0.3, 0.6):
      with self.subTest(energy=energy):
        best, _ = _numpy_truncation(a, energy)
        got, sent = _compress(a, energy)
        rank = sent // 4 // (m + n + 1)
        # The factors span at most `rank` directions and hold the energy:
        # got projects A's longer side onto them (got = A P for a tall A,
        # P an orthogonal projector), so the residual is orthogonal to got.
        self.assertBetween(rank, best, best + 3)
        self.assertLessEqual(np.linalg.matrix_rank(got, tol=1e-4), rank)
        residual = a - got
        np.testing.assert_allclose(
            residual @ got.T if m >= n else residual.T @ got, 0, atol=1e-3)
        self.assertGreaterEqual(np.sum(got**2) / total, energy)

  def test_a_rank_dense_would_beat_is_sent_dense(self):
    a = _matrix('gaussian', (150, 60))
    rank, _ = _numpy_truncation(a, 0.95)
    self.assertGreater(rank * (150 + 60 + 1), 150 * 60)
    got, sent = _compress(a, 0.95)
    self.assertEqual(sent, 4 * 150 * 60)
    np.testing.assert_array_equal(got, a)

  def test_factors_as_large_as_the_matrix_go_dense(self):
    # [5, 4] at rank 2: 2 (5 + 4 + 1) = 20 floats, as many as the matrix;
    # the matrix is sent then, and arrives exact.
    a = _matrix('rank2', (5, 4))
    self.assertEqual(_numpy_truncation(a, 0.999)[0], 2)
    got, sent = _compress(a, 0.999)
    self.assertEqual(sent, 4 * 20)
    np.testing.assert_array_equal(got, a)

  def test_the_rank_whose_energy_equals_the_target_is_enough(self):
    # Singular values 2, 2 and six 0s: rank 1 holds 4 of the energy 8,
    # exactly the 0.5 asked (every figure exact in float32).
    a = np.diag([2.0, 2.0] + [0.0] * 6).astype(np.float32)
    got, sent = _compress(a, 0.5)
    self.assertEqual(sent, 4 * 1 * (8 + 8 + 1))
    self.assertAlmostEqual(np.sum(got**2), 4.0, places=5)

  def test_bytes_of_a_tree(self):
    # A conv kernel [3, 3, 2, 4] is the matrix [18, 4]; biases go whole.
    kernel = _matrix('rank1', (18, 4)).reshape(3, 3, 2, 4)
    tree = {'conv': kernel, 'bias': np.ones(4, np.float32),
            'dense': _matrix('rank3', (12, 7))}
    update, sent = _COMPRESS(jax.tree.map(jnp.asarray, tree), 0.99)
    self.assertEqual(int(sent), 1 * (18 + 4 + 1) + 4 + 3 * (12 + 7 + 1))
    self.assertEqual(update['conv'].shape, kernel.shape)
    np.testing.assert_allclose(update['conv'], kernel, atol=1e-5)
    np.testing.assert_array_equal(update['bias'], tree['bias'])

  def test_non_finite_uploads_come_back_nan_beside_finite_ones(self):
    # [60, 40]: the blocks path. A NaN, and squares that overflow, vmapped
    # with a finite matrix, which must come back as it does alone.
    good = _matrix('rank3', (60, 40))
    nan, huge = good.copy(), good.copy()
    nan[7, 3] = np.nan
    huge[0, 0] = 1e30
    stacked = {'w': jnp.asarray(np.stack([good, nan, huge]))}
    update, sent = jax.jit(jax.vmap(compression.svd_compress, (0, None)))(
        stacked, 0.99)
    alone, alone_sent = _compress(good, 0.99)
    np.testing.assert_allclose(update['w'][0], alone, atol=1e-6)
    self.assertEqual(4 * int(sent[0]), alone_sent)
    self.assertEqual(alone_sent, 4 * 3 * (60 + 40 + 1))
    self.assertTrue(np.all(np.isnan(update['w'][1:])))

  def test_no_lapack_in_the_vmapped_compression(self):
    # jaxlib's batched CPU LAPACK kernels wait on the XLA thread pool they
    # run on: concurrent calls deadlocked FedKD rounds. The check can fail:
    # a vmapped jnp.linalg.svd lowers to LAPACK's gesdd.
    stacked = {'h1': jnp.zeros((10, 784, 200)), 'h2': jnp.zeros((10, 200, 200)),
               'out': jnp.zeros((10, 200, 10)), 'bias': jnp.zeros((10, 200))}
    hlo = jax.jit(jax.vmap(compression.svd_compress, (0, None))).lower(
        stacked, 0.95).as_text()
    self.assertNotIn('lapack', hlo)
    self.assertIn('lapack', jax.jit(jax.vmap(jnp.linalg.svd)).lower(
        stacked['h2']).as_text())


class MnistSizedRoundTest(absltest.TestCase):

  def test_vmapped_fedkd_round_with_2nn_models_is_finite(self):
    # The shapes that hung in LAPACK: 784-200-200-10 mentor and mentee, 10
    # clients in one vmapped (unchunked) round, one local step each.
    num_clients, examples, shape = 10, 20, (28, 28, 1)
    rng = np.random.default_rng(0)
    n = num_clients * examples
    data = jax.tree.map(jnp.asarray, clients.stack_clients(
        rng.random((n, *shape), np.float32), rng.integers(0, 10, n),
        np.arange(n).reshape(num_clients, examples)))
    model = models.get_model('mnist_2nn', 10)
    alg = algorithms.fedkd(
        mentor=model, mentee=model, input_shape=shape,
        num_clients=num_clients, client_tx=optax.sgd(0.1),
        mentor_tx=optax.sgd(0.1), server_tx=optax.sgd(1.0), epochs=1,
        batch_size=examples, energy_start=0.95, energy_end=0.98, num_rounds=2)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)))
    state = alg.init(params, jax.random.PRNGKey(1))
    cohort = clients.Cohort(client_ids=jnp.arange(num_clients),
                            client_mask=jnp.ones(num_clients, bool))
    round_ = jax.jit(alg.apply).lower(state, data, cohort,
                                      jax.random.PRNGKey(2))
    self.assertNotIn('lapack', round_.as_text())
    state, metrics = round_.compile()(state, data, cohort,
                                      jax.random.PRNGKey(2))
    self.assertTrue(bool(metrics['params_finite']))
    self.assertEqual(int(metrics['clients']), num_clients)
    dense = 4 * models.num_params(params)
    self.assertLess(int(metrics['upload_bytes']), num_clients * dense)
    # Each client's first download is the whole mentee.
    self.assertEqual(int(metrics['download_bytes']), num_clients * dense)


if __name__ == '__main__':
  absltest.main()
