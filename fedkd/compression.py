"""Update compression, with the exact number of bytes it sends."""

import jax
import jax.numpy as jnp

from fedkd.typing import Array, PyTree

_FLOAT_BYTES = 4


def _svd_truncate(matrix: Array, energy: Array) -> tuple[Array, Array]:
  """Keeps the fewest singular values holding `energy` of sum(sigma^2).

  LAPACK's SVD may never return on NaN or inf input, so a non-finite matrix
  is decomposed as zeros and comes back as all-NaN: the update stays visibly
  broken instead of hanging the round.
  """
  finite = jnp.all(jnp.isfinite(matrix))
  u, s, vt = jnp.linalg.svd(jnp.where(finite, matrix, 0),
                            full_matrices=False)
  power = jnp.square(s)
  total = jnp.sum(power)
  fraction = jnp.cumsum(power) / jnp.maximum(total, jnp.finfo(s.dtype).tiny)
  # Values before the one that reaches `energy`, plus that one; a zero matrix
  # sends nothing.
  rank = jnp.minimum(jnp.sum(fraction < energy) + 1, s.shape[0])
  rank = jnp.where(total > 0, rank, 0).astype(jnp.int32)
  kept = jnp.where(jnp.arange(s.shape[0]) < rank, s, 0)
  sent = rank * (matrix.shape[0] + matrix.shape[1] + 1) * _FLOAT_BYTES
  return jnp.where(finite, (u * kept) @ vt, jnp.nan), sent


def svd_compress(tree: PyTree, energy: Array) -> tuple[PyTree, Array]:
  """FedKD's SVD compression of an update (Wu et al. 2022, Sec. "Methods").

  Every leaf of rank >= 2 (kernels; a conv kernel as [fan_in, fan_out]) is
  replaced by its truncated SVD `U_r diag(s_r) V_r^T`, r the smallest rank
  whose singular values hold at least `energy` of the leaf's squared
  singular values; vectors (biases) are sent as they are.

  Returns:
    The reconstructed update (what the receiver applies) and the int32 bytes
    sent: r (m + n + 1) float32 per matrix, plus the vectors.
  """
  leaves, treedef = jax.tree.flatten(tree)
  out, sent = [], jnp.zeros((), jnp.int32)
  for leaf in leaves:
    if leaf.ndim < 2:
      out.append(leaf)
      sent += leaf.size * _FLOAT_BYTES
      continue
    matrix, leaf_bytes = _svd_truncate(leaf.reshape(-1, leaf.shape[-1]),
                                       energy)
    out.append(matrix.reshape(leaf.shape))
    sent += leaf_bytes
  return jax.tree.unflatten(treedef, out), sent


def linear_schedule(start: float, end: float, num_rounds: int):
  """round -> start + (end - start) * round / (num_rounds - 1), clipped."""
  def value(round_index: Array) -> Array:
    progress = round_index / max(num_rounds - 1, 1)
    return start + (end - start) * jnp.clip(progress, 0.0, 1.0)
  return value
