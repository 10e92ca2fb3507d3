"""The vmapped round against a per-client loop, padding, sharding, tracing."""

import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import builder
from experiments.configs import default
from fedkd import algorithm
from fedkd import algorithms
from fedkd import clients
from fedkd import loop
from fedkd import privacy
from fedkd import sharding
import toys

SIZES = (7, 3, 12, 5, 9, 1)  # ragged: partial batches, a 1-example client
# (test name suffix, algorithm name) for named_parameters.
ALGORITHMS = tuple((name, name) for name in algorithms.ALGORITHMS)
# One algorithm of each round shape: model averaging, SVD-compressed uploads
# with per-client backlogs, server-side distillation on public data, private
# per-client tables. Without FEDKD_FULL_TESTS=1 (`toys.full_or`) the costlier
# invariants run for the first two (sharding: fedkd), recompilation for all
# four.
SHAPES = ('fedavg', 'fedkd', 'feddf', 'fd')


def _run(apply, state, data, cohorts):
  for r, c in enumerate(cohorts):
    state, metrics = apply(state, data, c, jax.random.PRNGKey(100 + r))
  return state, metrics


class RoundTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.data = toys.toy_data(SIZES)
    self.algs = toys.algorithms(len(SIZES))
    self.cohorts = [toys.cohort([0, 2, 3, 5], size=6, num_clients=len(SIZES)),
                    toys.cohort([1, 2, 4], size=6, num_clients=len(SIZES))]

  @parameterized.named_parameters(*ALGORITHMS)
  def test_vmapped_round_equals_python_loop(self, name):
    alg = self.algs[name]
    state = toys.init_state(alg)
    vmapped, m1 = _run(jax.jit(alg.apply), state, self.data, self.cohorts)
    looped, m2 = _run(loop.loop_apply(alg), state, self.data, self.cohorts)
    toys.assert_trees_close(vmapped, looped)
    toys.assert_trees_close(m1, m2, atol=1e-4)
    self.assertEqual(int(vmapped.round), 2)

  @parameterized.named_parameters(*ALGORITHMS)
  def test_no_recompilation_after_first_round(self, name):
    toys.full_or(self, name in SHAPES)
    alg = self.algs[name]
    traces = []

    def counted(*args):
      traces.append(1)
      return alg.apply(*args)

    _run(jax.jit(counted), toys.init_state(alg), self.data,
         self.cohorts + self.cohorts)
    self.assertLen(traces, 1)

  @parameterized.named_parameters(*ALGORITHMS)
  def test_padded_clients_change_nothing(self, name):
    toys.full_or(self, name in SHAPES[:2])
    alg = self.algs[name]
    state = toys.init_state(alg)
    apply = jax.jit(alg.apply)
    ids, n = [0, 2, 3], len(SIZES)
    tight, _ = _run(apply, state, self.data, [toys.cohort(ids)])
    padded, _ = _run(apply, state, self.data,
                     [toys.cohort(ids, size=8, num_clients=n)])
    toys.assert_trees_close(tight, padded)

  @parameterized.named_parameters(*ALGORITHMS)
  def test_padded_examples_and_steps_change_nothing(self, name):
    toys.full_or(self, name in SHAPES[:2])
    alg = self.algs[name]
    state = toys.init_state(alg)
    apply = jax.jit(alg.apply)
    # Extra padding rows add whole padded steps to every epoch.
    wide = toys.toy_data(SIZES, pad_to=max(SIZES) + 7)
    tight, _ = _run(apply, state, self.data, self.cohorts)
    padded, _ = _run(apply, state, wide, self.cohorts)
    toys.assert_trees_close(tight, padded)

  def test_only_cohort_teachers_train(self):
    alg = self.algs['local_kd']
    state = toys.init_state(alg)
    new, _ = jax.jit(alg.apply)(state, self.data, self.cohorts[0],
                                jax.random.PRNGKey(0))
    before = jax.tree.leaves(state.clients)[0]
    after = jax.tree.leaves(new.clients)[0]
    for k in range(len(SIZES)):
      changed = not np.allclose(before[k], after[k])
      self.assertEqual(changed, k in (0, 2, 3, 5), msg=f'client {k}')

  def test_feddf_with_a_larger_server_model(self):
    alg = algorithms.feddf(
        model=toys.student(), server_model=toys.teacher(),
        input_shape=toys.INPUT_SHAPE, client_tx=optax.sgd(0.1),
        server_tx=optax.sgd(1.0), distill_tx=optax.sgd(0.5), epochs=2,
        batch_size=3, distill_epochs=2, public_batch_size=2, temperature=1.0)
    big = toys.teacher().init(jax.random.PRNGKey(0),
                              jnp.zeros((1, *toys.INPUT_SHAPE)))
    state = alg.init(big, jax.random.PRNGKey(1))
    # The clients' side is feddf's own (vmapped == loop: tested above).
    vmapped, metrics = _run(jax.jit(alg.apply), state, self.data,
                            self.cohorts)
    for part in ('client', 'server'):
      self.assertFalse(np.allclose(
          jax.tree.leaves(state.params[part])[0],
          jax.tree.leaves(vmapped.params[part])[0]), part)
    # The 3 clients of the last cohort download the client model only.
    self.assertEqual(int(metrics['download_bytes']),
                     3 * algorithm.tree_bytes(state.params['client']))

  @parameterized.named_parameters(*ALGORITHMS)
  def test_sharded_over_8_devices_equals_one_device(self, name):
    toys.full_or(self, name == 'fedkd')
    self.assertGreaterEqual(jax.device_count(), 8)
    alg = self.algs[name]
    state = toys.init_state(alg)
    results = []
    for devices in (1, 8):
      mesh = sharding.make_mesh(devices)
      size, _ = sharding.cohort_layout(4, mesh)
      cohorts = [toys.cohort([0, 2, 3, 5], size=size, num_clients=6),
                 toys.cohort([1, 2, 4], size=size, num_clients=6)]
      # The 37 examples split by rows (8 devices: padded to 40, 5 each).
      data = sharding.place_data(self.data, mesh)
      apply = sharding.jit_round(alg.apply, mesh, data_shardings=(
          sharding.data_sharding(data, mesh)))
      results.append(_run(apply, state, data, cohorts))
    toys.assert_trees_close(results[0], results[1])
    self.assertEqual(size, 8)

  @parameterized.named_parameters(*ALGORITHMS)
  def test_chunked_equals_unchunked_with_faults_and_dp(self, name):
    toys.full_or(self, name in SHAPES[:2])
    alg = self.algs[name]
    state = toys.init_state(alg)
    options = dict(faults=algorithm.Faults(dropout_rate=0.3,
                                           straggler_rate=0.5))
    if name in algorithms.DP_ALGORITHMS:
      options['dp'] = privacy.DpSettings(0.5, 0.3, expected_clients=4.0)
    rounds = [jax.jit(algorithm.with_round(
        alg, clients_per_chunk=chunk, **options).apply) for chunk in (0, 2)]
    whole, chunked = (_run(r, state, self.data, self.cohorts) for r in rounds)
    toys.assert_trees_close(whole, chunked)
    self.assertGreater(int(whole[1]['dropped_clients']) +
                       int(whole[1]['stragglers']), 0)

  def test_fd_keeps_the_labels_nobody_reported(self):
    alg, n = self.algs['fd'], len(SIZES)
    apply = jax.jit(alg.apply)
    everyone, _ = apply(toys.init_state(alg), self.data,
                        toys.cohort(range(n)), jax.random.PRNGKey(0))
    # Client 5 holds one example, so it reports one label only.
    label = int(self.data.y[self.data.offsets[5]])
    one, _ = apply(everyone, self.data, toys.cohort([5], n, n),
                   jax.random.PRNGKey(1))
    # The table: per label the summed means, their round and client count.
    others = np.arange(toys.NUM_CLASSES) != label
    for new, old in zip(jax.tree.leaves(one.params),
                        jax.tree.leaves(everyone.params)):
      np.testing.assert_array_equal(new[others], old[others])
    (_, rounds), counts = one.params
    self.assertEqual((float(counts[label]), int(rounds[label])), (1.0, 1))
    # A round in which every client drops out changes nothing.
    dropped = jax.jit(algorithm.with_round(
        alg, faults=algorithm.Faults(dropout_rate=1.0)).apply)
    none, m = dropped(everyone, self.data, toys.cohort(range(n)),
                      jax.random.PRNGKey(2))
    self.assertEqual(int(m['dropped_clients']), n)
    toys.assert_trees_close(none.params, everyone.params, atol=0)

  def test_fedmd_keeps_its_consensus_through_a_round_without_reports(self):
    alg, n = self.algs['fedmd'], len(SIZES)
    dropped = jax.jit(algorithm.with_round(
        alg, faults=algorithm.Faults(dropout_rate=1.0)).apply)
    state = toys.init_state(alg)
    # No consensus yet: nobody digests zeros.
    none, _ = dropped(state, self.data, toys.cohort(range(n)),
                      jax.random.PRNGKey(0))
    self.assertEqual(float(none.params[1]), 0.0)
    first, _ = jax.jit(alg.apply)(none, self.data, toys.cohort(range(n)),
                                  jax.random.PRNGKey(1))
    self.assertEqual(float(first.params[1]), 1.0)
    after, _ = dropped(first, self.data, toys.cohort(range(n)),
                       jax.random.PRNGKey(2))
    toys.assert_trees_close(after.params, first.params, atol=0)
    self.assertGreater(float(jnp.abs(after.params[0]).max()), 0.0)

  def test_chunked_and_sharded_equals_plain(self):
    alg = self.algs['local_kd']
    state = toys.init_state(alg)
    mesh = sharding.make_mesh(2)
    size, chunk = sharding.cohort_layout(5, mesh, clients_per_chunk=1)
    self.assertEqual((size, chunk), (6, 2))
    data = sharding.place_data(self.data, mesh)
    apply = sharding.jit_round(
        algorithm.with_round(alg, clients_per_chunk=chunk).apply, mesh,
        data_shardings=sharding.data_sharding(data, mesh))
    ids = [0, 1, 2, 4, 5]
    sharded = _run(apply, state, data,
                   [toys.cohort(ids, size=size, num_clients=6)])
    plain = _run(jax.jit(alg.apply), state, self.data, [toys.cohort(ids)])
    toys.assert_trees_close(plain, sharded)


def _loss_sum(losses, clients_per_chunk: int) -> float:
  """The round's `student_loss_sum` of clients reporting `losses`."""
  table = jnp.asarray(losses, jnp.float32)

  def client_update(server, client_state, data, client_id, num_examples,
                    rng):
    del server, data, rng
    return clients.ClientOutput(
        upload=jnp.zeros(1), weight=num_examples.astype(jnp.float32),
        state=client_state, metrics={'student_loss_sum': table[client_id]})

  return float(toys.round_of_one_example_clients(
      client_update, len(losses), jnp.zeros(1),
      clients_per_chunk=clients_per_chunk)['student_loss_sum'])


class ChunkSumsTest(parameterized.TestCase):

  def test_loss_sums_over_many_chunks_keep_float32_accuracy(self):
    # 20,000 clients in 10,000 chunks of 2, each client's loss sum about
    # 230 (100 examples): added chunk by chunk in plain float32, the total
    # of 4.6e6 was off by about 1e-6 of itself.
    losses = np.random.default_rng(0).uniform(200, 260, 20_000).astype(
        np.float32)
    exact = math.fsum(losses.tolist())
    self.assertLess(abs(_loss_sum(losses, 2) - exact) / exact, 1.5e-7)

  @parameterized.parameters(([1, np.inf, 1, 1],), ([3e38, 3e38, 1, 1],))
  def test_a_sum_past_float32_is_inf_in_chunks_too(self, losses):
    self.assertEqual(_loss_sum(losses, 2), np.inf)
    self.assertEqual(_loss_sum(losses, 0), np.inf)


class RegisteredModelsTest(parameterized.TestCase):
  """The round invariants with the registered models (fedkd.layers), not
  flax toys, built from a run config as `fedkd.train` builds them."""

  @parameterized.parameters('fedkd', 'fedmd')
  def test_vmapped_equals_loop_and_chunked(self, name):
    toys.full_or(self, name == 'fedkd')
    config = default.get_config()
    config.update(algorithm=name, num_clients=len(SIZES), local_epochs=1,
                  batch_size=3, num_rounds=3, public_batch_size=2,
                  student='seed_student', teacher='seed_teacher',
                  # The round's invariants; fedmd's transfer learning before
                  # round 1 has its own golden test.
                  fedmd_transfer_epochs=0, fedmd_private_epochs=0)
    built = builder.build(config, toys.INPUT_SHAPE, toys.NUM_CLASSES,
                             toys.NUM_PUBLIC)
    alg = built.algorithm
    params = built.init_params and built.init_params(jax.random.PRNGKey(0))
    state = alg.init(params, jax.random.PRNGKey(1))
    data = toys.toy_data(SIZES)
    cohorts = [toys.cohort([0, 2, 3, 5]), toys.cohort([1, 2, 4, 5])]
    vmapped = _run(jax.jit(alg.apply), state, data, cohorts)
    looped = _run(loop.loop_apply(alg), state, data, cohorts)
    chunked = _run(jax.jit(algorithm.with_round(
        alg, clients_per_chunk=2).apply), state, data, cohorts)
    toys.assert_trees_close(vmapped, looped, atol=1e-5)
    toys.assert_trees_close(vmapped, chunked, atol=1e-5)
    self.assertFalse(np.allclose(jax.tree.leaves(state)[0],
                                 jax.tree.leaves(vmapped[0])[0]))


if __name__ == '__main__':
  absltest.main()
