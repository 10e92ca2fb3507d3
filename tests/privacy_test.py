"""DP-FedAvg: per-client clipping, the noised fixed-denominator mean, eps."""

import math
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np

from fedkd import aggregation
from fedkd import communication
from fedkd import privacy
from fedkd.errors import FedkdError


def _norm(tree):
  return math.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64))))
                       for x in jax.tree.leaves(tree)))


class ClipTest(parameterized.TestCase):

  def test_large_update_is_scaled_to_clip_norm_keeping_direction(self):
    update = {'w': jnp.array([[6., 0.], [0., 0.]]), 'b': jnp.array([8.])}
    clipped, norm = privacy.clip_by_global_norm(update, 1.0)
    self.assertAlmostEqual(float(norm), 10.0, places=5)
    self.assertAlmostEqual(_norm(clipped), 1.0, delta=1e-5)
    np.testing.assert_allclose(clipped['w'], [[0.6, 0.], [0., 0.]], rtol=1e-6)
    np.testing.assert_allclose(clipped['b'], [0.8], rtol=1e-6)

  @parameterized.named_parameters(('below', 0.3), ('zero', 0.0))
  def test_update_within_norm_is_unchanged(self, scale):
    update = {'w': scale * jnp.array([[1., -2.], [0.5, 0.]]),
              'b': scale * jnp.array([1.])}  # norm 2.5 * scale <= 1
    clipped, norm = privacy.clip_by_global_norm(update, 1.0)
    self.assertAlmostEqual(float(norm), 2.5 * scale, places=5)
    for got, want in zip(jax.tree.leaves(clipped), jax.tree.leaves(update)):
      np.testing.assert_array_equal(got, want)

  def test_vmapped_clipping_bounds_every_client(self):
    clip_norm = 1.0
    norms = np.array([0.1, 0.9, 1.0, 3.0, 1000.0])
    rng = np.random.default_rng(0)
    raw = {'w': rng.normal(size=(5, 4, 3)), 'b': rng.normal(size=(5, 7))}
    unit = np.sqrt(np.sum(raw['w']**2, axis=(1, 2)) + np.sum(raw['b']**2, 1))
    scale = norms / unit
    updates = {'w': jnp.asarray(raw['w'] * scale[:, None, None], jnp.float32),
               'b': jnp.asarray(raw['b'] * scale[:, None], jnp.float32)}
    clipped, got_norms = jax.jit(jax.vmap(
        lambda u: privacy.clip_by_global_norm(u, clip_norm)))(updates)
    np.testing.assert_allclose(got_norms, norms, rtol=1e-5)
    for c in range(5):
      one = jax.tree.map(lambda x, c=c: x[c], clipped)
      self.assertLessEqual(_norm(one), clip_norm + 1e-6)
      self.assertAlmostEqual(_norm(one), min(norms[c], clip_norm), delta=1e-5)
    # Clients within the bound pass through untouched.
    np.testing.assert_array_equal(clipped['w'][:2], updates['w'][:2])


class PrivateStageTest(parameterized.TestCase):

  @parameterized.parameters((0.6, 0), (2.0, 1))
  def test_encode_clips_weighs_one_and_counts_the_clipped(self, norm,
                                                         clipped):
    stage = privacy.private(aggregation.mean(),
                            privacy.DpSettings(1.0, 0.0, 4.0))
    update = {'w': jnp.array([0.6 * norm, 0.8 * norm])}  # of norm `norm`
    sent = communication.fixed(1, 8)
    got, weight, got_sent, metrics = stage.encode(
        update, jnp.float32(7.0), sent, jnp.int32(0))
    np.testing.assert_allclose(got['w'], [0.6 * min(norm, 1.0),
                                          0.8 * min(norm, 1.0)], rtol=1e-6)
    self.assertEqual(float(weight), 1.0)  # not its 7 examples
    self.assertEqual(int(got_sent), 8)
    self.assertEqual(int(metrics['clipped_clients']), clipped)


def _zeros():
  # 10,000 scalars in two leaves of the same size.
  return {'a': jnp.zeros((50, 100)), 'b': jnp.zeros((5000,))}


class NoisedMeanTest(absltest.TestCase):

  def test_noise_std_matches_noise_stddev(self):
    kw = dict(clip_norm=2.0, noise_multiplier=1.5, expected_clients=3.5)
    zeros = _zeros()
    keys = jax.random.split(jax.random.PRNGKey(0), 2000)
    draws = jax.jit(jax.vmap(  # over noise keys
        lambda k: privacy.noised_mean(zeros, k, **kw)))(keys)
    a = np.asarray(draws['a']).reshape(2000, -1)
    b = np.asarray(draws['b'])
    want = privacy.noise_stddev(**kw)
    self.assertAlmostEqual(want, 1.5 * 2.0 / 3.5)
    both = np.concatenate([a, b], axis=1)
    self.assertAlmostEqual(both.std() / want, 1.0, delta=0.02)
    self.assertLess(abs(both.mean()), 0.01 * want)
    # Spread across draws, per coordinate: each rng gives fresh noise.
    self.assertAlmostEqual(both.std(axis=0).mean() / want, 1.0, delta=0.02)
    # Each leaf gets its own noise.
    self.assertLess(abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]), 0.01)

  def test_no_noise_gives_sum_over_expected_clients(self):
    total = {'w': jnp.arange(6.0).reshape(3, 2), 'b': jnp.array([5.0])}
    got = privacy.noised_mean(total, jax.random.PRNGKey(0), clip_norm=1.0,
                              noise_multiplier=0.0, expected_clients=5.0)
    np.testing.assert_allclose(got['w'], np.arange(6.0).reshape(3, 2) / 5)
    np.testing.assert_allclose(got['b'], [1.0])


def _direct_epsilon(accountant, z, q, rounds, delta):
  acc = (dp_accounting.rdp.RdpAccountant() if accountant == 'rdp'
         else dp_accounting.pld.PLDAccountant())
  # The accountant's own `count`, not a SelfComposedDpEvent.
  acc.compose(dp_accounting.PoissonSampledDpEvent(
      q, dp_accounting.GaussianDpEvent(z)), count=rounds)
  return acc.get_epsilon(delta)


class EpsilonTest(parameterized.TestCase):

  @parameterized.parameters(('rdp', 1.1, 0.01, 200), ('rdp', 0.8, 0.1, 50),
                            ('pld', 1.1, 0.01, 20), ('pld', 0.8, 0.1, 5))
  def test_matches_dp_accounting(self, accountant, z, q, rounds):
    got = privacy.epsilon(noise_multiplier=z, sampling_probability=q,
                          rounds=rounds, delta=1e-5, accountant=accountant)
    want = _direct_epsilon(accountant, z, q, rounds, 1e-5)
    self.assertAlmostEqual(got, want, delta=1e-3 * want)

  @parameterized.parameters('rdp', 'pld')
  def test_grows_with_rounds_and_shrinks_with_noise(self, accountant):
    def eps(z, rounds):
      return privacy.epsilon(noise_multiplier=z, sampling_probability=0.05,
                             rounds=rounds, delta=1e-5, accountant=accountant)
    self.assertEqual(eps(1.0, 0), 0.0)
    self.assertLess(0.0, eps(1.0, 1))
    self.assertLess(eps(1.0, 1), eps(1.0, 10))
    self.assertLess(eps(1.0, 10), eps(1.0, 50))
    self.assertLess(eps(2.0, 10), eps(1.0, 10))
    self.assertEqual(eps(0.0, 10), math.inf)

  def test_one_full_round_matches_closed_forms(self):
    z, delta = 1.0, 1e-5
    kw = dict(noise_multiplier=z, sampling_probability=1.0, rounds=1,
              delta=delta)
    rdp = privacy.epsilon(accountant='rdp', **kw)
    pld = privacy.epsilon(accountant='pld', **kw)
    # RDP of the Gaussian mechanism at order a is a / (2 z^2); the conversion
    # to (eps, delta) is Canonne, Kamath & Steinke 2020, minimised over the
    # accountant's orders.
    orders = dp_accounting.rdp.RdpAccountant().orders
    closed = min(a / (2 * z**2) + math.log1p(-1 / a)
                 - math.log(delta * a) / (a - 1) for a in orders if a > 1.01)
    self.assertAlmostEqual(rdp, closed, delta=1e-9)
    # PLD is tight: it matches the exact analytic Gaussian mechanism (Balle &
    # Wang 2018), which RDP can only bound from above.
    exact = dp_accounting.get_epsilon_gaussian(z, delta)
    self.assertAlmostEqual(pld, exact, delta=0.01 * exact)
    self.assertGreaterEqual(rdp, exact)
    self.assertAlmostEqual(pld / rdp, 1.0, delta=0.2)

  @parameterized.parameters(
      dict(sampling_probability=1.5), dict(sampling_probability=-0.1),
      dict(rounds=-1), dict(rounds=2.5), dict(delta=0.0),
      dict(noise_multiplier=-1.0), dict(accountant='moments'))
  def test_bad_arguments_raise(self, **bad):
    kw = dict(noise_multiplier=1.0, sampling_probability=0.1, rounds=3,
              delta=1e-5, accountant='rdp')
    with self.assertRaises(FedkdError):
      privacy.epsilon(**{**kw, **bad})


class AccountantTest(parameterized.TestCase):
  """Epsilon composed row by row equals one composition of all rounds."""

  def setUp(self):
    super().setUp()
    # PLD steps of 2 rounds keep the tests small; z = 3 keeps the PLDs short.
    self.enter_context(mock.patch.object(privacy, '_PLD_ROUNDS_PER_STEP', 2))

  def _accountant(self, accountant, z=3.0, q=0.05):
    return privacy.Accountant(noise_multiplier=z, sampling_probability=q,
                              delta=1e-5, accountant=accountant)

  @parameterized.parameters('rdp', 'pld')
  def test_incremental_equals_one_shot(self, accountant):
    acc = self._accountant(accountant)
    # 7 - 2 rounds take three PLD steps (2 + 2 + 1).
    for rounds in (1, 2, 7):
      want = _direct_epsilon(accountant, 3.0, 0.05, rounds, 1e-5)
      self.assertAlmostEqual(acc.epsilon(rounds), want, delta=1e-6 * want)

  def test_pld_mechanism_is_built_once(self):
    build = dp_accounting.pld.privacy_loss_distribution.from_gaussian_mechanism
    with mock.patch.object(dp_accounting.pld.privacy_loss_distribution,
                           'from_gaussian_mechanism', wraps=build) as spy:
      acc = self._accountant('pld')
      for rounds in (1, 3, 4):
        acc.epsilon(rounds)
    self.assertEqual(spy.call_count, 1)

  def test_stop_request_between_steps_returns_none_then_resumes(self):
    acc = self._accountant('pld')
    asked = []

    def stop():
      asked.append(True)
      return True

    # 3 rounds are two steps; the stop comes after the first (2 rounds).
    self.assertIsNone(acc.epsilon(3, stop))
    self.assertLen(asked, 1)
    want = _direct_epsilon('pld', 3.0, 0.05, 3, 1e-5)
    self.assertAlmostEqual(acc.epsilon(3), want, delta=1e-6 * want)

  @parameterized.parameters('rdp', 'pld')
  def test_stop_requested_before_a_one_step_accounting_keeps_it(self,
                                                               accountant):
    # A signal during the round: the row still gets its epsilon.
    want = _direct_epsilon(accountant, 3.0, 0.05, 2, 1e-5)
    got = self._accountant(accountant).epsilon(2, lambda: True)
    self.assertAlmostEqual(got, want, delta=1e-6 * want)

  @parameterized.parameters('rdp', 'pld')
  def test_fewer_rounds_start_over(self, accountant):
    acc = self._accountant(accountant)
    acc.epsilon(5)
    want = _direct_epsilon(accountant, 3.0, 0.05, 2, 1e-5)
    self.assertAlmostEqual(acc.epsilon(2), want, delta=1e-6 * want)

  @parameterized.parameters('rdp', 'pld')
  def test_no_sampling_is_free_and_no_noise_is_unbounded(self, accountant):
    self.assertEqual(self._accountant(accountant, q=0.0).epsilon(5), 0.0)
    self.assertEqual(self._accountant(accountant, z=0.0).epsilon(5), math.inf)


class ValidateTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('noise_without_clipping', dict(clip_norm=0.0, noise_multiplier=1.0)),
      ('negative_clip_norm', dict(clip_norm=-1.0, noise_multiplier=0.0)),
      ('negative_noise', dict(noise_multiplier=-0.5)),
      ('nan_noise', dict(noise_multiplier=float('nan'))),
      ('inf_noise', dict(noise_multiplier=math.inf)),
      ('inf_clip_norm', dict(clip_norm=math.inf)),
      ('delta_zero', dict(delta=0.0)),
      ('delta_one', dict(delta=1.0)),
      ('delta_negative', dict(delta=-1e-5)),
      ('unknown_accountant', dict(accountant='moments')))
  def test_bad_setting_raises(self, bad):
    kw = dict(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5,
              accountant='rdp')
    with self.assertRaises(FedkdError):
      privacy.validate(**{**kw, **bad})

  @parameterized.parameters((1.0, 1.0, 'rdp'), (0.5, 0.0, 'pld'),
                            (0.0, 0.0, 'rdp'))
  def test_good_setting_passes(self, clip_norm, noise_multiplier, accountant):
    privacy.validate(clip_norm=clip_norm, noise_multiplier=noise_multiplier,
                     delta=1e-5, accountant=accountant)


if __name__ == '__main__':
  absltest.main()
