"""Evaluation in chunks: the figures of whole-batch numpy, in a planned size."""

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedkd import metrics
from fedkd import models
from fedkd.errors import FedkdError

_MODEL = models.MLP(hidden=(8,), num_classes=3)
_NUM_MODELS, _NUM_EXAMPLES = 7, 23


def _stack():
  x = jax.random.normal(jax.random.PRNGKey(0), (_NUM_EXAMPLES, 5))
  y = jax.random.randint(jax.random.PRNGKey(1), (_NUM_EXAMPLES,), 0, 3)
  params = [_MODEL.init(jax.random.PRNGKey(10 + i), x[:1])
            for i in range(_NUM_MODELS)]
  return params, x, y


def _numpy_figures(params, x, y):
  """(mean cross-entropy, accuracy) from one whole-batch forward pass."""
  logits = np.asarray(_MODEL.apply(params, x), np.float64)
  y = np.asarray(y)
  top = logits.max(axis=1)
  log_z = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
  loss = np.mean(log_z - logits[np.arange(len(y)), y])
  return loss, np.mean(logits.argmax(axis=1) == y)


class EvaluateTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.params, cls.x, cls.y = _stack()
    cls.expected = [_numpy_figures(p, cls.x, cls.y) for p in cls.params]
    cls.stacked = jax.tree.map(lambda *a: jnp.stack(a), *cls.params)

  # 5 and 10 leave a last batch overlapping its predecessor; 100 > 23.
  @parameterized.parameters(1, 5, 10, 23, 100)
  def test_one_model_matches_numpy(self, batch_size):
    loss, accuracy = metrics.evaluate(_MODEL, self.params[0], self.x, self.y,
                                      batch_size=batch_size)
    self.assertAlmostEqual(float(loss), self.expected[0][0], delta=1e-5)
    self.assertEqual(round(float(accuracy) * _NUM_EXAMPLES),
                     round(self.expected[0][1] * _NUM_EXAMPLES))

  @parameterized.parameters((0, 23), (-1, 23), (5, 0))
  def test_refuses_empty_batches_or_data(self, batch_size, num_examples):
    with self.assertRaisesRegex(FedkdError, 'evaluate needs batch_size >= 1'):
      metrics.evaluate(_MODEL, self.params[0], self.x[:num_examples],
                       self.y[:num_examples], batch_size=batch_size)

  # Chunks of 3 and 5 leave a last chunk clamped onto earlier models.
  @parameterized.parameters((1, 23), (3, 5), (5, 10), (7, 100), (10, 4))
  def test_stacked_models_match_numpy(self, models_per_chunk, batch_size):
    losses, accuracies = metrics.evaluate_stacked(
        _MODEL, self.stacked, self.x, self.y, batch_size=batch_size,
        models_per_chunk=models_per_chunk)
    self.assertEqual(losses.shape, (_NUM_MODELS,))
    np.testing.assert_allclose(losses, [e[0] for e in self.expected],
                               atol=1e-5)
    # Accuracies as counts of correct examples: exact.
    np.testing.assert_array_equal(
        np.round(np.asarray(accuracies) * _NUM_EXAMPLES),
        np.round(np.array([e[1] for e in self.expected]) * _NUM_EXAMPLES))


class _Tanh(nn.Module):

  @nn.compact
  def __call__(self, x):
    return jnp.tanh(x)


class ActivationBytesTest(absltest.TestCase):

  def test_elementwise_model_counts_its_output(self):
    example = jax.ShapeDtypeStruct((6, 5), jnp.float32)
    self.assertEqual(metrics.activation_bytes(_Tanh(), {}, example), 4 * 30)

  def test_convolution_counts_output_and_im2col_patches(self):
    conv = nn.Conv(4, (3, 3), use_bias=False)
    params = conv.init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 2)))
    example = jax.ShapeDtypeStruct((6, 6, 2), jnp.float32)
    # Output 6x6x4; patches: 6x6 pixels x (3x3 window x 2 channels).
    expected = 4 * (6 * 6 * 4 + 6 * 6 * 3 * 3 * 2)
    self.assertEqual(metrics.activation_bytes(conv, params, example),
                     expected)

  def test_step_bytes_counts_the_largest_model_of_each_kind(self):
    conv = nn.Conv(4, (3, 3), use_bias=False)
    params = conv.init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 2)))
    example = jax.ShapeDtypeStruct((6, 6, 2), jnp.float32)
    # Students tanh (6x6x2 floats) or the conv above, teacher tanh; batch 3.
    expected = 3 * (4 * (6 * 6 * 4 + 6 * 6 * 3 * 3 * 2) + 4 * 72)
    self.assertEqual(
        metrics.step_bytes([[(_Tanh(), {}), (conv, params)],
                            [(_Tanh(), {})]], example, batch_size=3),
        expected)


class PlanChunksTest(parameterized.TestCase):

  @parameterized.named_parameters(
      # name, per example, models, examples, max batch, budget, expected
      ('batch_first', 1000, 50, 10_000, 1000, 10**6, (1000, 1)),
      ('models_fill_the_rest', 1000, 50, 360, 1000, 10**6, (360, 2)),
      ('batches_evened_out', 1000, 50, 10_000, 1000, 900_000, (834, 1)),
      ('chunks_evened_out', 100, 50, 360, 1000, 10**6, (360, 25)),
      ('all_models_fit', 10, 50, 360, 1000, 10**6, (360, 50)),
      ('never_below_one', 10**9, 50, 360, 1000, 10**6, (1, 1)),
  )
  def test_hand_computed(self, per_example, num_models, num_examples,
                         max_batch, budget, expected):
    self.assertEqual(metrics.plan_chunks(
        per_example, num_models=num_models, num_examples=num_examples,
        max_batch_size=max_batch, budget_bytes=budget), expected)

  def test_plans_fit_the_budget(self):
    rng = np.random.default_rng(0)
    for _ in range(500):
      per_example = int(rng.integers(1, 10**6))
      budget = per_example * int(rng.integers(1, 10**4))
      kw = dict(num_models=int(rng.integers(1, 200)),
                num_examples=int(rng.integers(1, 20_000)),
                max_batch_size=int(rng.integers(1, 5000)))
      batch, chunk = metrics.plan_chunks(per_example, budget_bytes=budget,
                                         **kw)
      self.assertLessEqual(batch * chunk * per_example, budget)
      self.assertBetween(batch, 1, min(kw['max_batch_size'],
                                       kw['num_examples']))
      self.assertBetween(chunk, 1, kw['num_models'])


class BudgetTest(absltest.TestCase):

  def test_host_memory_is_bounded_by_the_machine(self):
    free = metrics.available_bytes(jax.devices('cpu')[0])
    total = None
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemTotal:'):
          total = int(line.split()[1]) * 1024
    self.assertBetween(free, 1, total)
    budget = metrics.eval_budget_bytes(jax.devices('cpu')[0])
    self.assertBetween(budget, 1, min(total // 4, 1 << 30))


if __name__ == '__main__':
  absltest.main()
