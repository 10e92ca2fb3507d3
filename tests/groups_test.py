"""Client groups: clients of several architectures in one jitted round."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedkd import algorithm
from fedkd import algorithms
from fedkd import clients
from fedkd import loop
from fedkd import sharding
import toys

SIZES = (7, 3, 12, 5, 9, 1)
N = len(SIZES)
# Per round, the clients of group 0 (even ids) and of group 1 (odd ids).
ROUNDS = (([0, 4], [1, 3]), ([2, 0], [5]))


def _models():
  return (toys.student(), toys.teacher())


def _cohort(groups, slots=2) -> clients.Cohort:
  """Slot s serves group s % k (`algorithm.make_round`); pads with N."""
  ids = np.full((slots, len(groups)), N, np.int32)
  for g, members in enumerate(groups):
    ids[:len(members), g] = members
  ids = ids.reshape(-1)
  return clients.Cohort(jnp.asarray(ids), jnp.asarray(ids < N))


def _run(apply, state, data, cohorts):
  for r, c in enumerate(cohorts):
    state, metrics = apply(state, data, c, jax.random.PRNGKey(100 + r))
  return state, metrics


def _init(alg, name):
  """A state of `alg`; feddf's global models, one per architecture, and the
  others' (local_kd's student) start from seed 0."""
  x = jnp.zeros((1, *toys.INPUT_SHAPE))
  models = _models() if name == 'feddf' else [toys.student()]
  params = [m.init(jax.random.PRNGKey(0), x) for m in models]
  return alg.init(algorithm.per_group(params), jax.random.PRNGKey(1))


class GroupsTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data = toys.toy_data(SIZES)
    cls.algs = toys.algorithms(N, client_models=_models())
    cls.alone = [toys.algorithms(N, client_models=m) for m in _models()]

  @parameterized.parameters('fd', 'fedmd', 'local_kd', 'fedkd')
  def test_groups_equal_their_clients_run_separately(self, name):
    """Each group's clients, run as a one-architecture round from the same
    server state and rng, end where the grouped round leaves them; the
    server combines what the groups sent."""
    toys.full_or(self, name == 'fd')
    het = self.algs[name]
    alone = [a[name] for a in self.alone]
    state = _init(het, name)
    separate = [_init(a, name) for a in alone]
    for g in range(2):  # a client's model depends on its id only
      toys.assert_trees_close(
          state.clients[g],
          jax.tree.map(lambda x, g=g: x[g::2], separate[g].clients), atol=0)
    apply = jax.jit(het.apply)
    for r, groups in enumerate(ROUNDS):
      rng = jax.random.PRNGKey(r)
      separate = [jax.jit(a.apply)(s.replace(params=state.params), self.data,
                                   toys.cohort(ids), rng)[0]
                  for a, s, ids in zip(alone, separate, groups)]
      state, metrics = apply(state, self.data, _cohort(groups), rng)
      self.assertEqual(int(metrics['clients']), sum(map(len, groups)))
      for g in range(2):
        toys.assert_trees_close(
            state.clients[g],
            jax.tree.map(lambda x, g=g: x[g::2], separate[g].clients))
      if name == 'fedkd':
        # The server compresses the mean update it applies (not linear): the
        # mentors above are what the groups' separate runs pin down.
        continue
      if name == 'local_kd':
        # The student: the example-weighted mean of both groups' deltas.
        weights = [float(sum(SIZES[i] for i in ids)) for ids in groups]
        toys.assert_trees_close(state.params, jax.tree.map(
            lambda a, b: (weights[0] * a + weights[1] * b) / sum(weights),
            separate[0].params, separate[1].params))
      elif name == 'fedmd':
        # The consensus: the mean over every reporting client of both.
        counts = [len(ids) for ids in groups]
        expected = sum(c * s.params[0] for c, s in zip(counts, separate))
        toys.assert_trees_close(state.params[0], expected / sum(counts))
      else:
        # Where a group sent an entry, it carries this round; every label
        # is sent by some client here, so the table is the groups' sum.
        (sums, rounds), counts = state.params
        sent = [s.params[0][1] == r for s in separate]

        def combined(parts):
          return sum(np.where(k.reshape(k.shape + (1,) * (v.ndim - 1)), v, 0)
                     for k, v in zip(sent, parts))

        np.testing.assert_allclose(
            sums, combined([s.params[0][0] for s in separate]), atol=1e-5)
        np.testing.assert_array_equal(
            counts, combined([s.params[1] for s in separate]))
        np.testing.assert_array_equal(rounds, np.full(rounds.shape, r))

  def test_feddf_averages_per_group_and_distills_each(self):
    models = _models()
    state = _init(self.algs['feddf'], 'feddf')
    # Without distillation (lr 0), each group's global model is the FedAvg
    # of its own clients.
    no_distill = dict(client_tx=optax.sgd(0.1), server_tx=optax.sgd(1.0),
                      distill_tx=optax.sgd(0.0), epochs=2, batch_size=3,
                      distill_epochs=1, public_batch_size=2, temperature=1.0)
    het = algorithms.feddf(model=models, **no_distill)
    cohort = _cohort(ROUNDS[0])
    rng = jax.random.PRNGKey(0)
    grouped, m = jax.jit(het.apply)(state, self.data, cohort, rng)
    for g, ids in enumerate(ROUNDS[0]):
      one = algorithms.feddf(model=models[g], **no_distill)
      alone, _ = jax.jit(one.apply)(one.init(state.params[g], None),
                                    self.data, toys.cohort(ids), rng)
      toys.assert_trees_close(grouped.params[g], alone.params)
    # Bytes: each client sends and receives its own architecture's model.
    sizes = [algorithm.tree_bytes(p) for p in state.params]
    self.assertEqual(int(m['upload_bytes']), 2 * sizes[0] + 2 * sizes[1])
    self.assertEqual(int(m['download_bytes']), int(m['upload_bytes']))
    # With distillation, both models move toward the shared ensemble.
    distilled, _ = jax.jit(self.algs['feddf'].apply)(state, self.data,
                                                     cohort, rng)
    for g in range(2):
      self.assertFalse(np.allclose(jax.tree.leaves(distilled.params[g])[0],
                                   jax.tree.leaves(grouped.params[g])[0]))

  @parameterized.parameters('feddf', 'fd', 'fedmd', 'local_kd', 'fedkd')
  def test_vmapped_equals_loop_and_chunked_and_compiles_once(self, name):
    toys.full_or(self, name == 'feddf')
    alg = self.algs[name]
    state = _init(alg, name)
    cohorts = [_cohort(groups) for groups in ROUNDS]
    traces = []

    def counted(*args):
      traces.append(1)
      return alg.apply(*args)

    vmapped = _run(jax.jit(counted), state, self.data, cohorts)
    self.assertLen(traces, 1)  # round 2 reuses round 1's program
    looped = _run(loop.loop_apply(alg), state, self.data, cohorts)
    stragglers = algorithm.Faults(straggler_rate=0.5)
    chunked = _run(jax.jit(algorithm.with_round(
        alg, clients_per_chunk=2, faults=stragglers).apply), state, self.data,
                   cohorts)
    faulty = _run(jax.jit(algorithm.with_round(
        alg, faults=stragglers).apply), state, self.data, cohorts)
    toys.assert_trees_close(vmapped, looped, atol=1e-5)
    toys.assert_trees_close(chunked, faulty, atol=1e-5)

  @parameterized.parameters('fd', 'feddf', 'fedmd', 'local_kd', 'fedkd')
  def test_sharded_over_8_devices_equals_one_device(self, name):
    toys.full_or(self, name == 'fd')
    alg = self.algs[name]
    state = _init(alg, name)
    results = []
    for devices in (1, 8):
      mesh = sharding.make_mesh(devices)
      size, _ = sharding.cohort_layout(4, mesh, quota=(2, 2))
      apply = sharding.jit_round(alg.apply, mesh,
                                 sharding.state_sharding(state, mesh))
      results.append(_run(apply, state, self.data, [
          _cohort(groups, size // 2) for groups in ROUNDS]))
    self.assertEqual(size, 16)
    toys.assert_trees_close(results[0], results[1])


class CohortTest(parameterized.TestCase):

  @parameterized.parameters(
      # (num_clients, per_round, groups) -> each group's clients a round
      (10, 4, 3, [2, 1, 1]), (300, 30, 3, [10, 10, 10]), (7, 7, 3, [3, 2, 2]),
      (10, 5, 1, [5]), (11, 6, 4, [2, 2, 1, 1]))
  def test_quota_is_proportional_and_adds_up(self, n, per_round, k, quota):
    self.assertEqual(clients.group_quota(n, per_round, k), quota)

  @parameterized.parameters(
      # (num_clients, per_round, groups) -> the largest quota / group size
      (10, 4, 3, 2 / 4),  # quotas 2, 1, 1 of 4, 3, 3 clients: above 4 / 10
      (300, 30, 3, 0.1), (10, 5, 1, 0.5), (11, 6, 4, 2 / 3))
  def test_inclusion_probability_bounds_every_group(self, n, per_round, k,
                                                    bound):
    self.assertAlmostEqual(clients.inclusion_probability(n, per_round, k),
                           bound)

  def test_each_group_samples_its_own_clients(self):
    for seed in range(5):
      cohort = clients.sample_cohort(np.random.default_rng(seed), 11, 6, 12,
                                     groups=4)
      ids = cohort.client_ids.reshape(-1, 4)
      for g, count in enumerate(clients.group_quota(11, 6, 4)):
        real = ids[:, g][ids[:, g] < 11]
        self.assertLen(set(real.tolist()), count)
        self.assertTrue(np.all(real % 4 == g))
      self.assertEqual(int(cohort.client_mask.sum()), 6)

  @parameterized.parameters(
      # (per_round, devices, per_chunk, quota) -> (size, chunk)
      (4, 1, 0, (2, 2), 4, 0), (4, 8, 0, (2, 2), 16, 0),
      (10, 2, 0, (4, 3, 3), 12, 0), (10, 2, 4, (4, 3, 3), 12, 6))
  def test_cohort_layout(self, per_round, devices, per_chunk, quota, size,
                         chunk):
    self.assertEqual(sharding.cohort_layout(
        per_round, sharding.make_mesh(devices), per_chunk, quota=quota),
                     (size, chunk))


if __name__ == '__main__':
  absltest.main()
