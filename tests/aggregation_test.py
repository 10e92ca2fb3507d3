"""The aggregator chain: stages compose, each reports its bytes and metrics."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from fedkd import aggregation
from fedkd import algorithm
from fedkd import communication
from fedkd import compression
from fedkd import privacy
import toys

SIZES = (6, 4, 8, 5)
IDS = list(range(len(SIZES)))
RNG = jax.random.PRNGKey(7)


def _halve(upload, weight, sent, round_index):
  """A user's stage: sends half of each value in 7 bytes, counted per client."""
  del sent, round_index
  return (jax.tree.map(lambda u: u / 2, upload), weight,
          communication.fixed(1, 7), {'halved': jnp.ones((), jnp.int32)})


def _round(alg, **options):
  """One jitted round of `alg` on the toy clients: (state, new, metrics)."""
  state = toys.init_state(alg)
  new, metrics = jax.jit(algorithm.with_round(alg, **options).apply)(
      state, toys.toy_data(SIZES), toys.cohort(IDS), RNG)
  return state, new, metrics


def _deltas(state, new):
  return [np.asarray(b, np.float64) - np.asarray(a, np.float64) for a, b in
          zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params))]


def _client_uploads(alg, state):
  """Each client's upload as its client update returns it, run alone
  (client i in group i % k, row i // k of its group's state)."""
  data = toys.toy_data(SIZES)
  rng = jax.random.split(RNG, 3)[0]  # the clients' key
  updates = algorithm.groups_of(alg.client_update)
  k = len(updates)
  states = state.clients if k > 1 else (state.clients,)
  uploads = []
  for i in IDS:
    key = jax.random.split(jax.random.fold_in(rng, i))[0]
    own = jax.tree.map(lambda s, i=i: s[i // k], states[i % k])
    uploads.append(updates[i % k](
        state.replace(clients=()), own, data, jnp.int32(i),
        data.num_examples[i], key))
  return uploads


def _clipped_sum(uploads, clip, test):
  """The sum of `uploads` (pytrees) each clipped to norm `clip`, in numpy;
  every one must be above it."""
  total = None
  for upload in uploads:
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(upload)]
    norm = np.sqrt(sum(np.sum(x**2) for x in leaves))
    test.assertGreater(norm, clip)  # so clipping is tested
    clipped = [x * clip / norm for x in leaves]
    total = clipped if total is None else [
        a + b for a, b in zip(total, clipped)]
  return total


class ChainTest(absltest.TestCase):

  def test_a_chain_ends_in_its_one_reducing_stage(self):
    encode_only = aggregation.Aggregator(_halve)
    for stages in [(), (encode_only,), (aggregation.mean(), encode_only),
                   (aggregation.mean(), aggregation.mean())]:
      with self.assertRaisesRegex(ValueError, 'ends in its one reducing'):
        aggregation.chain(*stages)

  def test_a_custom_stage_scales_the_mean_and_counts_its_bytes(self):
    alg = toys.algorithms(len(SIZES))['fedavg']
    state, plain, m_plain = _round(alg)
    _, halved, m = _round(alg._replace(aggregator=aggregation.chain(
        aggregation.Aggregator(_halve), aggregation.mean())))
    for a, b in zip(_deltas(state, plain), _deltas(state, halved)):
      np.testing.assert_allclose(b, a / 2, atol=1e-6)
    self.assertEqual(int(m['upload_bytes']), 7 * len(IDS))
    self.assertEqual(int(m['halved']), len(IDS))
    self.assertEqual(int(m_plain['upload_bytes']), len(IDS) * (
        algorithm.tree_bytes(state.params)))

  def test_unweighted_mean_gives_every_client_one_share(self):
    alg = toys.algorithms(len(SIZES))['fedavg']
    state, new, _ = _round(alg._replace(
        aggregator=aggregation.mean(weighted=False)))
    uploads = [[np.asarray(x, np.float64) for x in jax.tree.leaves(o.upload)]
               for o in _client_uploads(alg, state)]
    for got, *each in zip(_deltas(state, new), *uploads):
      np.testing.assert_allclose(got, np.mean(each, axis=0), atol=1e-6)


class GroupMeansTest(absltest.TestCase):

  def test_pooled_parts_average_over_all_groups_summed_parts_add_up(self):
    # Two groups' weighted sums and weights: 3 and 2 (the third weighs 0).
    part = lambda own, pooled, summed: dict(
        own=jnp.array([own]), pooled=aggregation.Pooled(jnp.array([pooled])),
        summed=aggregation.Summed(jnp.array([summed])))
    means = aggregation.group_means(
        (part(6.0, 3.0, 2.0), part(10.0, 9.0, 1.0), part(0.0, 0.0, 0.0)),
        (jnp.float32(3.0), jnp.float32(2.0), jnp.float32(0.0)))
    for mean, own in zip(means, [6 / 3, 10 / 2, 0.0]):
      np.testing.assert_allclose(mean['own'], [own])
      np.testing.assert_allclose(mean['pooled'].value, [(3 + 9) / (3 + 2)])
      np.testing.assert_allclose(mean['summed'].value, [2 + 1])


class PrivateFedKDTest(absltest.TestCase):

  def test_dp_clips_the_svd_factors_upload_by_hand(self):
    """DP over FedKD's chain: each client's SVD-compressed update is clipped,
    weighs 1 and the sum is divided by the expected clients (no noise); the
    bytes stay those of the factors."""
    alg = toys.algorithms(len(SIZES))['fedkd']
    clip, expected = 0.02, 10.0
    state, new, m = _round(alg, dp=privacy.DpSettings(clip, 0.0, expected))
    energy = compression.energy_schedule(0.8, 0.9, 3)(0)  # as toys.fedkd
    compressed = [compression.svd_compress(out.upload.value, energy)
                  for out in _client_uploads(alg, state)]
    floats = sum(int(sent) for _, sent in compressed)
    total = _clipped_sum([upload for upload, _ in compressed], clip, self)
    mean = jax.tree.unflatten(jax.tree.structure(state.params),
                              [jnp.asarray(t / expected, jnp.float32)
                               for t in total])
    # The server sends its update SVD-compressed too (sgd(1.0): the mean).
    applied, _ = compression.svd_compress(mean, energy)
    for got, want in zip(_deltas(state, new), jax.tree.leaves(applied)):
      np.testing.assert_allclose(got, want, atol=1e-6)
    self.assertEqual(int(m['clipped_clients']), len(IDS))
    self.assertEqual(int(m['upload_bytes']),
                     communication.FLOAT_BYTES * floats)



class PrivateGroupsTest(absltest.TestCase):

  def test_groups_sharing_the_student_get_one_clipped_sum(self):
    """local_kd with two teacher architectures: every client's student
    update clipped, all summed over both groups, over expected clients."""
    alg = toys.algorithms(len(SIZES), client_models=(
        toys.teacher(), toys.student()))['local_kd']
    clip, expected = 0.02, 10.0
    state, new, m = _round(alg, dp=privacy.DpSettings(clip, 0.0, expected))
    total = _clipped_sum([out.upload.value for out in
                          _client_uploads(alg, state)], clip, self)
    for got, want in zip(_deltas(state, new), total):
      np.testing.assert_allclose(got, want / expected, atol=1e-6)
    self.assertEqual(int(m['clipped_clients']), len(IDS))

  def test_groups_with_parts_of_their_own_are_refused(self):
    alg = toys.algorithms(len(SIZES), client_models=(
        toys.teacher(), toys.student()))['fd']
    with self.assertRaisesRegex(ValueError, 'one aggregation.Pooled part'):
      _round(alg, dp=privacy.DpSettings(0.1, 1.0, 4.0))


if __name__ == '__main__':
  absltest.main()
