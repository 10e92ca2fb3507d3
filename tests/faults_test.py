"""Dropout, non-finite clients, divergence and DP-FedAvg inside the round."""

import json
import os

from absl.testing import absltest
from absl.testing import parameterized
import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np

from experiments import runner
from experiments.configs import default
from fedkd import algorithm
from fedkd import clients
from fedkd import loop
from fedkd import privacy
from fedkd import train
import toys

SIZES = (6, 4, 8, 5, 7, 3, 6, 5)
IDS = list(range(8))


def _round(alg, data, **options):
  apply = algorithm.with_round(alg, **options).apply
  state = toys.init_state(alg)
  new, metrics = jax.jit(apply)(state, data, toys.cohort(IDS),
                                jax.random.PRNGKey(7))
  return state, new, metrics


def _both_ways(alg, **options):
  """The round jitted and vmapped, and as a Python loop over clients."""
  return (jax.jit(algorithm.with_round(alg, **options).apply),
          algorithm.with_round(alg, map_fn=loop.python_map, **options).apply)


def _poisoned(client):
  data = toys.toy_data(SIZES)
  start = int(data.offsets[client])
  return data.replace(x=data.x.at[start].set(jnp.nan))


class FaultsTest(parameterized.TestCase):

  def test_nan_client_is_excluded_and_counted(self):
    alg = toys.algorithms(len(SIZES))['local_kd']
    state, new, m = _round(alg, _poisoned(3))
    self.assertEqual(int(m['nonfinite_clients']), 1)
    self.assertEqual(int(m['clients']), 7)
    self.assertTrue(bool(m['params_finite']))
    teachers_before = jax.tree.leaves(state.clients)[0]
    teachers_after = jax.tree.leaves(new.clients)[0]
    np.testing.assert_array_equal(teachers_after[3], teachers_before[3])
    # Same result as if client 3 had not been sampled at all.
    apply = jax.jit(alg.apply)
    others = [i for i in IDS if i != 3]
    expected, expected_m = apply(state, _poisoned(3), toys.cohort(others),
                                 jax.random.PRNGKey(7))
    # Client keys depend on ids only, so the other clients train identically.
    toys.assert_trees_close(new.params, expected.params)
    # Nor do its examples, losses or upload count.
    self.assertEqual(int(m['upload_bytes']), int(expected_m['upload_bytes']))
    self.assertEqual(int(m['train_examples']),
                     int(expected_m['train_examples']))
    for key in ('student_loss_sum', 'teacher_loss_sum'):
      self.assertAlmostEqual(float(m[key]), float(expected_m[key]), places=4)

  def test_dropout_with_a_poisoned_client_still_trains(self):
    alg = toys.algorithms(len(SIZES))['fedavg']
    state, new, m = _round(alg, _poisoned(3),
                           faults=algorithm.Faults(dropout_rate=0.3))
    dropped, nonfinite = int(m['dropped_clients']), int(m['nonfinite_clients'])
    self.assertGreater(dropped, 0)
    self.assertEqual(int(m['clients']) + dropped + nonfinite, 8)
    self.assertTrue(bool(m['params_finite']))
    changed = jax.tree.leaves(jax.tree.map(
        lambda a, b: not np.allclose(a, b), state.params, new.params))
    self.assertTrue(any(changed))

  def test_dropout_matches_python_loop(self):
    alg = toys.algorithms(len(SIZES))['local_kd']
    data, state = toys.toy_data(SIZES), toys.init_state(alg)
    vmapped, looped = _both_ways(
        alg, faults=algorithm.Faults(dropout_rate=0.5))
    args = (state, data, toys.cohort(IDS), jax.random.PRNGKey(3))
    toys.assert_trees_close(vmapped(*args), looped(*args), atol=1e-5)


class DpRoundTest(absltest.TestCase):

  def test_clipped_sum_over_expected_clients_by_hand(self):
    alg = toys.algorithms(len(SIZES))['fedavg']
    data = toys.toy_data(SIZES)
    clip, expected = 0.05, 10.0
    dp = privacy.DpSettings(clip, 0.0, expected)
    state, new, m = _round(alg, data, dp=dp)
    # Each client alone, clipped with numpy, summed with weight 1.
    rng = jax.random.split(jax.random.PRNGKey(7), 3)[0]  # the clients' key
    total = None
    for i in IDS:
      key = jax.random.split(jax.random.fold_in(rng, i))[0]
      out = alg.client_update(state.replace(clients=()), (), data, jnp.int32(i),
                              data.num_examples[i], key)
      leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(out.upload)]
      norm = np.sqrt(sum(np.sum(x**2) for x in leaves))
      clipped = [x * min(1.0, clip / norm) for x in leaves]
      total = clipped if total is None else [a + b for a, b in
                                             zip(total, clipped)]
    got = [np.asarray(b) - np.asarray(a) for a, b in
           zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params))]
    for g, t in zip(got, total):
      np.testing.assert_allclose(g, t / expected, atol=1e-6)
    self.assertEqual(int(m['clipped_clients']), 8)  # all above 0.05

  def test_noise_changes_with_the_round_key_only(self):
    alg = toys.algorithms(len(SIZES))['fedavg']
    data = toys.toy_data(SIZES)
    dp = privacy.DpSettings(0.1, 1.0, 8.0)
    apply = jax.jit(algorithm.with_round(alg, dp=dp).apply)
    state = toys.init_state(alg)
    a, _ = apply(state, data, toys.cohort(IDS), jax.random.PRNGKey(1))
    b, _ = apply(state, data, toys.cohort(IDS), jax.random.PRNGKey(1))
    c, _ = apply(state, data, toys.cohort(IDS), jax.random.PRNGKey(2))
    toys.assert_trees_close(a.params, b.params, atol=0)
    diff = np.concatenate([np.ravel(x - y) for x, y in zip(
        jax.tree.leaves(a.params), jax.tree.leaves(c.params))])
    # Noise std on the mean is z*S/expected = 0.0125; two draws differ more.
    self.assertGreater(diff.std(), 0.005)


class RunLevelTest(parameterized.TestCase):

  def _rows(self, **overrides):
    config = default.get_config('smoke')
    config.update(overrides)
    workdir = self.create_tempdir().full_path
    runner.run(config, workdir, progress=False)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      return [json.loads(l) for l in f]

  @parameterized.parameters(
      (50, 10, '', 10 / 50),
      # Two teacher architectures, groups of 5 and 4 clients sampling 2 and
      # 2 a round: the second's clients join with probability 1/2, not 4/9.
      (9, 4, 'seed_teacher,seed_student', 2 / 4))
  def test_reported_epsilon_equals_dp_accounting(self, num_clients,
                                                 per_round, client_models, q):
    rows = self._rows(dp_clip_norm=1.0, dp_noise_multiplier=1.1,
                      num_clients=num_clients, clients_per_round=per_round,
                      client_models=client_models)
    for row in rows:
      accountant = dp_accounting.rdp.RdpAccountant()
      accountant.compose(dp_accounting.PoissonSampledDpEvent(
          q, dp_accounting.GaussianDpEvent(1.1)), row['round'])
      self.assertAlmostEqual(row['dp_epsilon'],
                             accountant.get_epsilon(1e-5), places=9)

  def test_divergence_stops_with_a_clear_error(self):
    with self.assertRaisesRegex(train.Diverged, 'NaN/inf in round 1'):
      self._rows(client_lr=30.0, server_lr=3e38)

  def test_rounds_without_a_finite_client_stop_the_run(self):
    # Every update is NaN/inf, so every client is left out and the global
    # model never moves: the run stops after max_nonfinite_rounds rounds,
    # keeping the rows written before.
    workdir = self.create_tempdir().full_path
    config = default.get_config('smoke')
    config.update(client_lr=1e30, num_rounds=4, max_nonfinite_rounds=2,
                  num_clients=10, clients_per_round=5)
    with self.assertRaisesRegex(train.NoFiniteClients,
                                r'rounds 1-2 \(max_nonfinite_rounds=2\)'):
      runner.run(config, workdir, progress=False)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      rows = [json.loads(l) for l in f]
    self.assertEqual([r['round'] for r in rows], [1])
    self.assertEqual(rows[0]['nonfinite_clients'], 5)


class StragglerTest(parameterized.TestCase):

  @parameterized.parameters((1.0, 6), (0.5, 3), (0.34, 2), (0.0, 0))
  def test_work_fraction_limits_real_steps(self, fraction, expected):
    # 7 examples, batch 3: 3 real steps per epoch, padded to 4 by pad_to=12.
    data = toys.toy_data((7,), pad_to=12).replace(
        work_fraction=jnp.float32(fraction))
    count = lambda carry, batch: (carry + 1, {})
    steps, sums = clients.local_training(
        count, 0, data, 0, jnp.int32(7), jax.random.PRNGKey(0), epochs=2,
        batch_size=3)
    self.assertEqual(int(steps), expected)
    self.assertLessEqual(int(sums['train_examples']), 7 * 2)

  def test_stragglers_are_counted_and_match_the_loop(self):
    alg = toys.algorithms(len(SIZES))['local_kd']
    data, state = toys.toy_data(SIZES), toys.init_state(alg)
    vmapped, looped = _both_ways(
        alg, faults=algorithm.Faults(straggler_rate=1.0))
    args = (state, data, toys.cohort(IDS), jax.random.PRNGKey(3))
    new, m = vmapped(*args)
    self.assertEqual(int(m['stragglers']), 8)
    toys.assert_trees_close((new, m), looped(*args), atol=1e-5)
    full, _ = jax.jit(alg.apply)(*args)
    self.assertFalse(np.allclose(jax.tree.leaves(new.params)[0],
                                 jax.tree.leaves(full.params)[0]))


if __name__ == '__main__':
  absltest.main()
