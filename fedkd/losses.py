"""Per-example losses. Reduction and masking belong to the caller."""

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy against integer labels, one value per example."""
  return optax.losses.softmax_cross_entropy_with_integer_labels(
      logits, labels)


def distillation(student_logits: jax.Array, teacher_logits: jax.Array,
                 temperature: float) -> jax.Array:
  """Hinton et al. 2015 soft-target loss, one value per example.

  `T^2 * KL(softmax(teacher / T) || softmax(student / T))`: the KL runs from the
  teacher's distribution to the student's, and the T^2 factor keeps gradient
  magnitudes comparable across temperatures. The teacher is not differentiated
  (`stop_gradient`), so only the student learns from this term.
  """
  t = temperature
  targets = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits) / t)
  log_predictions = jax.nn.log_softmax(student_logits / t)
  return t**2 * optax.losses.kl_divergence(log_predictions, targets)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of `values` over entries where `mask` is set; 0 when none is."""
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)
