"""Keeping the best model on a validation score, by hand-made scores;
example counts past int32."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import optax

from fedkd import clients
from fedkd import early_stopping

# 8 public examples in batches of 1: 8 steps an epoch.
PUBLIC_X = jnp.zeros((8, 1))


def _count_step(carry, batch):
  """Adds 1 to the parameter, so after t steps it is t; reports 1 a real
  example as its loss."""
  params, opt_state = carry
  return (params + 1.0, opt_state), {
      'loss': jnp.sum(batch.example_mask).astype(jnp.float32)}


def _train(scores, *, epochs=1, eval_every=1, patience=100):
  """(kept parameter, step sums) of `_count_step` scored `scores[t]` after
  t steps (None: unscored)."""
  score = None if scores is None else (
      lambda p: jnp.asarray(scores, jnp.float32)[p.astype(jnp.int32)])
  params, sums = jax.jit(lambda: early_stopping.public_training(
      _count_step, jnp.float32(0.0), optax.identity(), PUBLIC_X,
      jax.random.PRNGKey(0), score=score, epochs=epochs, batch_size=1,
      eval_every=eval_every, patience=patience))()
  return float(params), jax.tree.map(float, sums)


class PublicTrainingTest(parameterized.TestCase):

  def test_keeps_the_first_of_the_best_scores(self):
    kept, sums = _train([0.2, 0.5, 0.1, 0.5, 0.3, 0.1, 0.1, 0.1, 0.1])
    self.assertEqual(kept, 1.0)
    self.assertEqual((sums['loss'], sums['steps'], sums['examples']),
                     (8.0, 8.0, 8.0))

  def test_keeps_the_start_when_no_step_beats_it(self):
    kept, _ = _train([0.9, 0.5, 0.1, 0.5, 0.3, 0.1, 0.1, 0.1, 0.1])
    self.assertEqual(kept, 0.0)

  def test_stops_patience_steps_after_the_best(self):
    # Best at step 1; at step 3, 2 steps later, it stops: step 4's better
    # score is never seen, and steps 4 to 8 report nothing.
    kept, sums = _train([0.2, 0.5, 0.4, 0.3, 0.9, 0.9, 0.9, 0.9, 0.9],
                        patience=2)
    self.assertEqual(kept, 1.0)
    self.assertEqual((sums['loss'], sums['steps'], sums['examples']),
                     (3.0, 3.0, 3.0))

  def test_evaluates_every_eval_every_steps_and_after_the_last(self):
    # Scored after steps 3, 6 and 8 only: step 7's 0.95 is never seen.
    kept, _ = _train([0.0, 0.0, 0.0, 0.1, 0.0, 0.0, 0.2, 0.95, 0.9],
                     eval_every=3)
    self.assertEqual(kept, 8.0)

  def test_unscored_training_keeps_the_last_parameters(self):
    kept, sums = _train(None, epochs=2)
    self.assertEqual(kept, 16.0)
    self.assertEqual((sums['loss'], sums['examples']), (16.0, 16.0))


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


if __name__ == '__main__':
  absltest.main()
