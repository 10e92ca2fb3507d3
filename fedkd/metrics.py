"""Test-set evaluation of the global student and the private teachers."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedkd import losses
from fedkd.typing import Array, Params


def evaluate(model: nn.Module, params: Params, x: Array, y: Array, *,
             batch_size: int) -> tuple[Array, Array]:
  """Mean cross-entropy and accuracy of `model` on (x, y), in batches.

  The examples are padded to a whole number of batches; padding is masked out.
  """
  n = x.shape[0]
  num_batches = -(-n // batch_size)
  pad = num_batches * batch_size - n
  xb = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(
      (num_batches, batch_size, *x.shape[1:]))
  yb = jnp.pad(y, (0, pad)).reshape((num_batches, batch_size))
  mask = (jnp.arange(num_batches * batch_size) < n).reshape(yb.shape)

  def batch_sums(batch):
    bx, by, bm = batch
    logits = model.apply(params, bx)
    loss = jnp.sum(losses.cross_entropy(logits, by) * bm)
    correct = jnp.sum((jnp.argmax(logits, -1) == by) * bm)
    return loss, correct

  loss, correct = jax.lax.map(batch_sums, (xb, yb, mask))
  return jnp.sum(loss) / n, jnp.sum(correct) / n
