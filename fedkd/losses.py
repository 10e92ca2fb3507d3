"""Per-example losses (reduction and masking belong to the caller), and
FedKD's adaptive mutual distillation, whose scale is the batch's own loss."""

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
  return temperature**2 * soft_target_kl(student_logits, teacher_logits,
                                         temperature)


def soft_target_kl(student_logits: jax.Array, teacher_logits: jax.Array,
                   temperature: float) -> jax.Array:
  """`distillation` without the T^2 factor, one value per example.

  `KL(softmax(teacher / T) || softmax(student / T))`, teacher detached: the
  form of FedDF's official code (`F.kl_div(..., reduction='batchmean')`).
  """
  t = temperature
  targets = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits) / t)
  log_predictions = jax.nn.log_softmax(student_logits / t)
  return optax.losses.kl_divergence(log_predictions, targets)


def mutual_kl(target_logits: jax.Array, logits: jax.Array) -> jax.Array:
  """`KL(softmax(target) || softmax(logits))` per example, T = 1.

  Neither side is detached: FedKD's official code (`nn.KLDivLoss`) lets the
  gradient reach both models through each KL term.
  """
  return optax.losses.kl_divergence_with_log_targets(
      jax.nn.log_softmax(logits), jax.nn.log_softmax(target_logits))


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of `values` over entries where `mask` is set; 0 when none is."""
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def not_true_distillation(student_logits: jax.Array,
                          teacher_logits: jax.Array, labels: jax.Array,
                          temperature: float) -> jax.Array:
  """FedNTD's not-true distillation (Lee et al. 2022), one value per example.

  `distillation` restricted to the classes other than the true label: the
  true class's logit is dropped from both models before the tempered softmax,
  so the student keeps the teacher's view of the wrong classes without being
  pulled towards the teacher's (possibly stale) confidence in the right one.
  Same conventions as `distillation`: KL(teacher || student), T^2 factor (as
  in the authors' code), teacher detached.
  """
  k = student_logits.shape[-1]
  others = jnp.arange(k - 1)
  # Row i lists the classes != labels[i], in order.
  columns = others + (others >= labels[..., None])
  take = lambda z: jnp.take_along_axis(z, columns, axis=-1)
  return distillation(take(student_logits), take(teacher_logits), temperature)


def adaptive_mutual_distillation(
    mentor_logits: jax.Array, mentee_logits: jax.Array, labels: jax.Array,
    mask: jax.Array, *, per_example: bool = False
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """FedKD's loss of a minibatch (Wu et al. 2022), mentor and mentee at once.

  Per batch (default, the official code): `CE_t + CE_s + (KL(p_s || p_t) +
  KL(p_t || p_s)) / (K (CE_t + CE_s))`, the CEs and KLs batch means over the
  real examples (`mask`; the KLs as `nn.KLDivLoss()`'s 'mean' reduction,
  which also divides by the K classes), nothing detached (`mutual_kl`).
  `per_example` (the paper's equations read so): mentor `CE_t + KL(p_s ||
  p_t) / (CE_t + CE_s)`, mentee `CE_s + KL(p_t || p_s) / (CE_t + CE_s)` per
  example, each KL `distillation` at T = 1 (the other model detached), the
  scale detached too. Either denominator is floored at 1e-6, so two
  perfectly confident models give 0, not NaN.

  Returns:
    (the loss to differentiate, (the mentor's and the mentee's loss summed
    over the real examples)).
  """
  ce_t = cross_entropy(mentor_logits, labels)
  ce_s = cross_entropy(mentee_logits, labels)
  if per_example:
    scale = jax.lax.stop_gradient(1.0 / jnp.maximum(ce_t + ce_s, 1e-6))
    loss_t = ce_t + scale * distillation(mentor_logits, mentee_logits, 1.0)
    loss_s = ce_s + scale * distillation(mentee_logits, mentor_logits, 1.0)
    # Each distillation term detaches the other model, so the gradient of
    # the sum is (d loss_t / d mentor, d loss_s / d mentee).
    return (masked_mean(loss_t + loss_s, mask),
            (jnp.sum(loss_t * mask), jnp.sum(loss_s * mask)))
  mean = lambda v: masked_mean(v, mask)
  ce_t, ce_s = mean(ce_t), mean(ce_s)
  scale = 1.0 / (mentor_logits.shape[-1] * jnp.maximum(ce_t + ce_s, 1e-6))
  loss_t = ce_t + scale * mean(mutual_kl(mentee_logits, mentor_logits))
  loss_s = ce_s + scale * mean(mutual_kl(mentor_logits, mentee_logits))
  real = jnp.sum(mask)
  return loss_t + loss_s, (loss_t * real, loss_s * real)
