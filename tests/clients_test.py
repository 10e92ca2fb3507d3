"""Local batching, client stacking and cohort sampling."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedkd import clients
from fedkd import communication
from fedkd.errors import FedkdError
import toys


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

  # 512 rows pack key and position in 32 bits; 513 take argsort's path.
  @parameterized.parameters((3, 5), (300, 512), (400, 513))
  def test_shuffle_sorts_random_keys_then_positions(self, n, max_n):
    # The order of a stable sort of 23 random bits per real row (the largest
    # key for padding rows, which so come last, in order), as numpy sorts it.
    key = jax.random.PRNGKey(max_n)
    idx, _ = clients.local_batches(key, n, max_n, epochs=1,
                                   batch_size=max_n)
    epoch_key = jax.random.split(key, 1)[0]
    keys = np.asarray(jax.random.bits(epoch_key, (max_n,), jnp.uint32)) >> 9
    keys[n:] = 2**23 - 1
    np.testing.assert_array_equal(idx[0], np.argsort(keys, kind='stable'))
    np.testing.assert_array_equal(idx[0, n:], np.arange(n, max_n))


def _slope_loss(w, batch):
  """Per-example loss `w * x`: its gradient is 1 whatever the batch."""
  return w * batch.x[:, 0]


class StragglerTest(parameterized.TestCase):
  """8 identical examples, batch 2, one epoch: 4 steps of SGD(1) on `w x`
  from w = 1 see losses 1, 0, -1, -2 (w drops by 1 a step)."""

  @parameterized.parameters((1.0, 4, -3.0), (0.5, 2, -1.0), (0.3, 1, 0.0),
                            (0.0, 0, 1.0))
  def test_loss_is_normalised_by_the_examples_trained(self, fraction, steps,
                                                      final_w):
    data = clients.stack_clients(np.ones((8, 1), np.float32),
                                 np.zeros(8, np.int32), [np.arange(8)])
    data = jax.tree.map(jnp.asarray,
                        data.replace(work_fraction=np.float32(fraction)))
    w, sums = clients.train_from(
        _slope_loss, jnp.float32(1.0), data, 0, jnp.int32(8),
        jax.random.PRNGKey(0), tx=optax.sgd(1.0), epochs=1, batch_size=2)
    self.assertEqual(float(w), final_w)
    self.assertEqual(int(sums['train_examples']), 2 * steps)
    # The mean of the losses of the steps run, each step's loss per example.
    expected = np.mean([1, 0, -1, -2][:steps]) if steps else 0.0
    reported = float(sums['student_loss_sum']) / max(
        int(sums['train_examples']), 1)
    self.assertAlmostEqual(reported, expected)

  def test_examples_trained_sum_exactly_over_the_most_clients(self):
    # One step over a client's 4,096 examples; summed as a round sums it
    # over 2^20 such clients, 2^32 examples, which int32 wraps to 0.
    n = 4096
    data = jax.tree.map(jnp.asarray, clients.stack_clients(
        np.ones((n, 1), np.float32), np.zeros(n, np.int32), [np.arange(n)]))
    _, sums = clients.train_from(
        _slope_loss, jnp.float32(1.0), data, 0, jnp.int32(n),
        jax.random.PRNGKey(0), tx=optax.sgd(1.0), epochs=1, batch_size=n)
    many = communication.MAX_CLIENTS
    total = jax.jit(lambda count: jax.tree.map(
        lambda c: jnp.sum(jnp.broadcast_to(c, (many, *c.shape)), axis=0),
        count))(sums['train_examples'])
    self.assertEqual(int(total), many * n)

  def test_padded_steps_keep_the_optimizer_state(self):
    # Client 0's 2 examples, padded to client 1's 8: each epoch is one real
    # step, then 3 padded ones. SGD(1) with momentum 0.9 on `w x`: the
    # trace is 1 after the first real step, 1 + 0.9 after the second, so w
    # is 1 - 1 - 1.9. A padded step that ran would decay and apply it.
    data = clients.stack_clients(np.ones((10, 1), np.float32),
                                 np.zeros(10, np.int32),
                                 [np.arange(2), np.arange(2, 10)])
    w, sums = clients.train_from(
        _slope_loss, jnp.float32(1.0), jax.tree.map(jnp.asarray, data), 0,
        jnp.int32(2), jax.random.PRNGKey(0),
        tx=optax.sgd(1.0, momentum=0.9), epochs=2, batch_size=2)
    self.assertAlmostEqual(float(w), -1.9, places=6)
    self.assertEqual(int(sums['train_examples']), 4)

  def test_public_training_stops_at_the_work_fraction(self):
    step = clients.loss_step(_slope_loss, optax.sgd(1.0), 'loss')
    carry = (jnp.float32(1.0), optax.sgd(1.0).init(0.0))
    (w, _), sums = clients.public_training(
        step, carry, jnp.ones((8, 1)), jax.random.PRNGKey(0), epochs=1,
        batch_size=2, work_fraction=jnp.float32(0.5))
    self.assertEqual(float(w), -1.0)
    self.assertEqual(float(sums['loss']), 2 * (1 + 0))


class StackAndSampleTest(parameterized.TestCase):

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

  def test_stack_clients_refuses_offsets_past_int32(self):
    # Two parts of 2^30 indices each (zero-stride views: no memory): 2^31
    # examples, whose rows and padded slots int32 cannot all number.
    parts = [np.broadcast_to(np.int64(0), (2**30,))] * 2
    with self.assertRaisesRegex(FedkdError, '2,147,483,648 client examples'):
      clients.stack_clients(np.zeros((1, 1), np.float32),
                            np.zeros(1, np.int32), parts)

  def test_client_logits_are_the_models_on_each_example_slot(self):
    # Clients of 3, 7 and 5 examples: 7 slots each, in batches of 3 (the
    # last batch past the end of the last client's rows).
    data = toys.toy_data((3, 7, 5))
    model = toys.student()
    params = model.init(jax.random.PRNGKey(0), data.x[:1])
    for k in range(3):
      got = clients.client_logits(model, params, data, jnp.int32(k),
                                  batch_size=3)
      self.assertEqual(got.shape, (7, toys.NUM_CLASSES))
      n = int(data.num_examples[k])
      own = data.x[int(data.offsets[k]):][:n]
      np.testing.assert_allclose(got[:n], model.apply(params, own),
                                 rtol=1e-6, atol=1e-6)
      self.assertTrue(np.all(np.isfinite(got)))  # padding: some real row

  def test_sample_cohort(self):
    cohort = clients.sample_cohort(np.random.default_rng(0), 10, 4, 8)
    ids, mask = cohort
    self.assertLen(set(ids[:4]), 4)
    self.assertTrue(np.all(ids[:4] < 10))
    np.testing.assert_array_equal(ids[4:], [10] * 4)  # padding: past the end
    np.testing.assert_array_equal(mask, [True] * 4 + [False] * 4)

  @parameterized.parameters(
      ((10, 10, 5), 'cannot hold clients_per_round=10'),
      ((10, 11, 12), 'clients_per_round=11 must be in [1, num_clients=10]'),
      ((10, 0, 4), 'clients_per_round=0 must be'),
      ((9, 3, 4, 3), 'cohort_size=4 must be a multiple of the 3 groups'),
      ((9, 4, 3, 3), 'pass cohort_size >= 6'))
  def test_sample_cohort_refuses_a_cohort_that_does_not_fit(self, args,
                                                            message):
    with self.assertRaises(FedkdError) as raised:
      clients.sample_cohort(np.random.default_rng(0), *args)
    self.assertIn(message, str(raised.exception))

  def test_sampled_cohorts_are_sorted(self):
    # Sorted, a whole population's slots hold the clients in order, each
    # device's own rows where states are split over devices
    # (`rows_held_here`).
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(
        clients.sample_cohort(rng, 16, 16, 16).client_ids, np.arange(16))
    for _ in range(5):
      ids = clients.sample_cohort(rng, 10, 4, 8).client_ids[:4]
      np.testing.assert_array_equal(ids, np.sort(ids))
    ids = clients.sample_cohort(rng, 12, 12, 12, groups=3).client_ids
    np.testing.assert_array_equal(ids, np.arange(12))


if __name__ == '__main__':
  absltest.main()
