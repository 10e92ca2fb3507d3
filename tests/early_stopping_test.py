"""Server training on public data, its example counts past int32."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import optax

from fedkd import clients
from fedkd import early_stopping


class ExamplesTest(parameterized.TestCase):

  @parameterized.parameters(True, False)
  def test_more_than_2_31_examples_trace_as_a_float_count(self, validated):
    # 2^15 passes over 2^16 public examples: 2^31 examples, 2^15 steps
    # (valid: fewer than 2^31). Traced only; no step runs.
    tx = optax.sgd(0.1)
    step = clients.loss_step(
        lambda p, batch: jnp.sum(batch.x, axis=-1) * p, tx, 'loss')
    public_x = jax.ShapeDtypeStruct((2**16, 1), jnp.float32)

    def train(public_x):
      return early_stopping.public_training(
          step, jnp.ones(()), tx, public_x, jax.random.PRNGKey(0),
          score=(lambda p: -p) if validated else None, epochs=2**15,
          batch_size=2**16, eval_every=1, patience=1)

    _, sums = jax.eval_shape(train, public_x)
    self.assertEqual(sums['examples'].dtype, jnp.float32)

  def test_examples_of_the_steps_run(self):
    tx = optax.sgd(0.0)
    step = clients.loss_step(lambda p, batch: p * batch.x[:, 0], tx, 'loss')
    public_x = jnp.ones((5, 1))
    for score, examples in ((None, 3 * 5), (lambda p: -p, 3 * 5)):
      _, sums = early_stopping.public_training(
          step, jnp.ones(()), tx, public_x, jax.random.PRNGKey(0),
          score=score, epochs=3, batch_size=2, eval_every=1, patience=100)
      self.assertEqual(float(sums['examples']), examples)


if __name__ == '__main__':
  absltest.main()
