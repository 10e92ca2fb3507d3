"""Update compression, with the exact number of bytes it sends.

The truncated SVD is computed without LAPACK: jaxlib's CPU LAPACK kernels
(SVD, eigh, QR, Cholesky, ...) split a batched call into tasks on the XLA
thread pool and block until they finish, so two such calls running at once on
a two-thread pool wait for each other forever (a vmapped FedKD round, whose
layers are compressed concurrently, hung in `gesdd`). Everything here is
matmuls, elementwise ops and loops, which batch under `vmap` on any backend.

Of `A` ([m, n]), only the eigenvectors V_r of the Gram matrix of its shorter
side (`G = A^T A` for m >= n) that the energy criterion keeps are computed, a
block of them at a time: a few steps of subspace iteration on `G`, with the
directions already found projected out, then Jacobi rotations within the
block (Rayleigh-Ritz). Blocks stop once the kept energy is reached, so an
update typically costs one or two. The receiver's matrix `A V_r V_r^T` is
then one matmul with `A`, so the kept directions come out to float32
accuracy although `G` squares the condition number (it loses singular values
below ~sqrt(eps) sigma_1, a negligible share of the energy). The kept energy
is measured exactly, so the target is always met; where the singular values
are flat at the cut, r may exceed the optimal rank by a few.
"""

from collections.abc import Callable
import functools

import jax
import jax.numpy as jnp

from fedkd import aggregation
from fedkd import communication
from fedkd.typing import Array, PyTree

# A Gram matrix of at most _BLOCK + _OVERSAMPLE rows is diagonalised outright
# (Jacobi until converged, at most _MAX_SWEEPS sweeps). Larger ones go by
# blocks of _BLOCK eigenvectors, iterated with _OVERSAMPLE extra vectors
# (which speed up the convergence of the kept ones) for _POWER_STEPS steps,
# then _RITZ_SWEEPS Jacobi sweeps: on FedKD updates of a 2NN the rank is then
# the optimal one or one more (tests/compression_test.py checks the rest).
# Blocks of 16, not 32: an update of rank <= 16 (a few local steps) needs
# one block, 1.5-1.8x faster (vmapped over 1000 [784, 200] updates of
# rank 10); updates needing more took as long with either size (ranks of
# about 18 and 55, and sums of 20 steps).
_BLOCK = 16
_OVERSAMPLE = 8
_POWER_STEPS = 3
_MAX_SWEEPS = 12
_RITZ_SWEEPS = 3
_JACOBI_TOL = 1e-6  # of the Frobenius norm; rounding leaves ~2e-7

_dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)


def _diagonal(x: Array, offset: int = 0) -> Array:
  """x[i, i + offset] of a square matrix, as a strided slice (no gather)."""
  n = x.shape[-1]
  return x.reshape(n * n)[offset::n + 1][:n - offset]


def _rotate_rows(x: Array, c: Array, s: Array) -> Array:
  """Rotates row i with row h + i of `x` ([2h, ...]) by (c_i, s_i), then
  reorders the rows so the next round pairs new neighbours (round robin).

  Row 0 stays; the others move one step around a circle, so in 2h - 1 rounds
  every row meets every other once. Only whole rows move: cheap on CPU.
  """
  h = x.shape[0] // 2
  c, s = c[:, None], s[:, None]
  top, bottom = c * x[:h] - s * x[h:], s * x[:h] + c * x[h:]
  return jnp.concatenate(
      [top[:1], bottom[:1], top[1:h - 1], bottom[1:], top[h - 1:]])


def _jacobi_round(carry, _):
  """Zeroes g[i, h + i] for every i at once (then pairs new neighbours).

  With J the rotations and P the reordering, g becomes P J^T g J P^T, which
  for a symmetric g is rows(rows(g)^T), rows(x) = P J^T x; the rows of vt
  (eigenvector estimates) turn the same way.
  """
  g, vt = carry
  h = g.shape[0] // 2
  d = _diagonal(g)
  app, aqq, apq = d[:h], d[h:], _diagonal(g, h)
  nonzero = apq != 0
  theta = (aqq - app) / (2 * jnp.where(nonzero, apq, 1))
  t = jnp.sign(theta) / (jnp.abs(theta) + jnp.sqrt(1 + theta * theta))
  t = jnp.where(nonzero, jnp.where(theta == 0, 1.0, t), 0.0)
  c = jax.lax.rsqrt(1 + t * t)
  s = t * c
  return (_rotate_rows(_rotate_rows(g, c, s).T, c, s),
          _rotate_rows(vt, c, s)), None


def _jacobi_eigh(sym: Array, max_sweeps: int) -> tuple[Array, Array]:
  """Cyclic Jacobi on a small symmetric matrix, in parallel round-robin order.

  Sweeps of n - 1 rounds (each rotating n / 2 disjoint pairs) repeat until
  the off-diagonal part is at rounding level (a few sweeps: the convergence
  is quadratic), at most `max_sweeps`.

  Returns:
    (w, v), v orthogonal with w = diag(v^T sym v) descending: eigenvalues
    and eigenvectors once converged, and in any case the exact Rayleigh
    quotients of the columns of v. An odd matrix gets one more value, 0,
    with a zero vector.
  """
  n = sym.shape[0]
  size = n + n % 2  # An odd matrix gets a zero row and column, never rotated.
  g = jnp.pad(sym, (0, size - n))
  norm = jnp.sqrt(jnp.sum(g * g))

  def unconverged(state):
    g, _, sweeps = state
    off = g - jnp.diag(_diagonal(g))
    return (jnp.sqrt(jnp.sum(off * off)) > _JACOBI_TOL * norm) & (
        sweeps < max_sweeps)

  def sweep(state):
    g, vt, sweeps = state
    (g, vt), _ = jax.lax.scan(_jacobi_round, (g, vt), None, length=size - 1)
    return g, vt, sweeps + 1

  g, vt, _ = jax.lax.while_loop(
      unconverged, sweep, (g, jnp.eye(size, dtype=g.dtype), 0))
  order = jnp.argsort(-_diagonal(g))
  return _diagonal(g)[order], vt[order, :n].T


def _orthonormalize(y: Array) -> Array:
  """Orthonormal columns spanning those of `y` (a dependent column becomes
  zero): Gram-Schmidt on the small Gram matrix `y^T y`, twice.

  Column by column it works on [k, k] coefficients only; `y` itself is read
  in two matmuls a pass. The Gram matrix squares the condition number, which
  the second pass repairs (as in CholeskyQR2), for columns scaled to unit
  norm first; a column within ~1e-4 of the span of the earlier ones is
  dropped, as it would be in Gram-Schmidt on `y`.
  """
  for _ in range(2):  # Twice is enough (Kahan, Parlett; CholeskyQR2).
    y = _dot(y, _orthonormalizing_coefficients(_dot(y.T, y)))
  return y


def _orthonormalizing_coefficients(gram: Array) -> Array:
  """T (upper triangular) with (y T)^T (y T) = I on the kept columns, for
  `gram` = y^T y: classical Gram-Schmidt with every inner product read from
  `gram` (u^T v of u = y a, v = y b is a^T gram b)."""
  k = gram.shape[0]
  diagonal = _diagonal(gram)
  # Unit columns: scaling alone must not make a column look dependent.
  scale = jnp.where(diagonal > 0, jax.lax.rsqrt(jnp.where(
      diagonal > 0, diagonal, 1)), 0)
  unit = gram * scale[:, None] * scale[None, :]

  def column(j, t):
    e_j = (jnp.arange(k) == j).astype(gram.dtype)
    earlier = (jnp.arange(k) < j).astype(gram.dtype)
    # y_j less its projections on the orthonormal q_p = y t_p, p < j.
    x = e_j - _dot(t, _dot(t.T, unit[:, j]) * earlier)
    norm2 = _dot(x, _dot(unit, x))
    keep = norm2 > 1e-8 * unit[j, j]  # |x| > 1e-4 |y_j|
    x = jnp.where(keep, x * jax.lax.rsqrt(jnp.where(keep, norm2, 1)), 0)
    return jax.lax.dynamic_update_slice_in_dim(t, x[:, None], j, axis=1)

  t = jax.lax.fori_loop(0, k, column, jnp.zeros_like(gram))
  return t * scale[:, None]


def _kept(power: Array, before: Array, target: Array) -> Array:
  """How many of `power` (descending) to add to `before` to reach `target`."""
  needed = jnp.sum(before + jnp.cumsum(power) < target) + 1
  return jnp.where(before < target, jnp.minimum(needed, power.shape[0]), 0)


Projection = Callable[[Array], Array]  # V ([n, k]) -> A V V^T (or V V^T A)


def _factor_exact(gram: Array, target: Array,
                  project: Projection) -> tuple[Array, Array]:
  """(rank, A V_r V_r^T) from the full eigendecomposition of a small `gram`."""
  power, v = _jacobi_eigh(gram, _MAX_SWEEPS)
  rank = _kept(power, jnp.zeros_like(target), target)
  return rank, project(v * (jnp.arange(v.shape[1]) < rank))


def _factor_blocks(gram: Array, target: Array, max_rank: int,
                   project: Projection) -> tuple[Array, Array]:
  """(rank, A V_r V_r^T) from blocks of subspace iteration on `gram`.

  Each block finds the next _BLOCK eigenvectors; the next one first projects
  them out of the Gram matrix (G <- P G P, P = I - V V^T), so it works in the
  remaining directions only; blocks stop once the energies reach `target`.
  Returns a rank above `max_rank` when `max_rank` vectors do not. Each
  block's vectors are applied to A as they are found: two thin matmuls a
  block, against one [n, n] one for all of them.
  """
  n = gram.shape[0]

  def block(index, gram, kept):
    """(the block's kept vectors, zero past their count; that count; the
    energy kept with them; all the block's vectors)."""
    y = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), index),
                          (n, _BLOCK + _OVERSAMPLE), gram.dtype)
    y = jax.lax.fori_loop(
        0, _POWER_STEPS, lambda _, y: _orthonormalize(_dot(gram, y)), y)
    power, w = _jacobi_eigh(_dot(y.T, _dot(gram, y)), _RITZ_SWEEPS)
    v = _dot(y, w[:, :_BLOCK])
    take = _kept(power[:_BLOCK], kept, target)
    mask = jnp.arange(_BLOCK) < take
    return (v * mask, take, kept + jnp.sum(jnp.where(mask, power[:_BLOCK], 0)),
            v)

  def unfinished(state):
    index, _, _, _, rank, kept = state
    return (kept < target) & (index * _BLOCK < max_rank) & (rank <= max_rank)

  def next_block(state):
    index, gram, found, recon, rank, kept = state
    # The directions found so far projected out: P G P, P = I - V V^T, is
    # G - V W^T - W V^T with W = G V - V (V^T G V) / 2.
    gv = _dot(gram, found)
    vw = _dot(found, (gv - _dot(found, _dot(found.T, gv)) / 2).T)
    gram = gram - vw - vw.T
    used, take, kept, found = block(index, gram, kept)
    return index + 1, gram, found, recon + project(used), rank + take, kept

  # The first block outside the loop: its projection starts the sum, and
  # updates it holds go through no loop, whose vmapped body selects every
  # client's [m, n] sum and Gram matrix (a zero start, a deflated Gram
  # matrix and the selects cost ~0.4 ms a [784, 200] update).
  used, rank, kept, found = block(0, gram, jnp.zeros_like(target))
  state = (1, gram, found, project(used), rank, kept)
  _, _, _, recon, rank, kept = jax.lax.while_loop(
      unfinished, next_block, state)
  return jnp.where(kept < target, max_rank + 1, rank), recon


def _svd_truncate(matrix: Array, energy: Array) -> tuple[Array, Array]:
  """Keeps the fewest singular values holding `energy` of sum(sigma^2).

  The factors `U_r diag(s_r) V_r^T` cost r (m + n + 1) floats; when that is
  not less than the m n of the matrix itself, the matrix is sent instead (and
  arrives exact). A zero matrix sends nothing. A non-finite matrix (or one
  whose squares overflow) is decomposed as zeros and comes back as all-NaN,
  so the update stays visibly broken.
  """
  m, n = matrix.shape
  wide = m < n  # The Gram matrix of the shorter side, and V on that side.
  gram = _dot(matrix, matrix.T) if wide else _dot(matrix.T, matrix)
  total = jnp.sum(_diagonal(gram))  # jnp.trace selects over all of it
  finite = jnp.isfinite(total)  # Any NaN or inf reaches the diagonal.
  # A non-finite matrix keeps nothing, so no loop runs on it (every loop's
  # test is also false on NaN); zeroing its Gram matrix instead cost a pass
  # over every client's.
  target = jnp.where(finite, energy * total, 0)
  # Above it, the dense matrix is no larger than the factors.
  max_rank = (m * n - 1) // (m + n + 1)
  if wide:
    project = lambda v: _dot(v, _dot(v.T, matrix))
  else:
    project = lambda v: _dot(_dot(matrix, v), v.T)
  if gram.shape[0] <= _BLOCK + _OVERSAMPLE:
    rank, recon = _factor_exact(gram, target, project)
  else:
    rank, recon = _factor_blocks(gram, target, max_rank, project)
  rank = jnp.where(finite & (total > 0), rank, 0).astype(jnp.int32)
  dense = rank > max_rank
  # A V_r V_r^T (or V_r V_r^T A), A itself when dense, all NaN if not finite.
  recon = jnp.where(finite, jnp.where(dense, matrix, recon), jnp.nan)
  return recon, jnp.where(dense, m * n, rank * (m + n + 1))


def svd_compress(tree: PyTree, energy: Array) -> tuple[PyTree, Array]:
  """FedKD's SVD compression of an update (Wu et al. 2022, Sec. "Methods").

  Every leaf of rank >= 2 (kernels; a conv kernel as [fan_in, fan_out]) is
  replaced by its truncated SVD `U_r diag(s_r) V_r^T`, r the smallest rank
  whose singular values hold at least `energy` of the leaf's squared
  singular values, or sent dense when that is smaller; vectors (biases) are
  sent as they are.

  Returns:
    The reconstructed update (what the receiver applies) and the number of
    float32 values sent (int32; `communication.floats` turns it into exact
    bytes): r (m + n + 1) per factored matrix, m n per dense one, plus the
    vectors.
  """
  leaves, treedef = jax.tree.flatten(tree)
  out, sent = [], jnp.zeros((), jnp.int32)
  for leaf in leaves:
    if leaf.ndim < 2:
      out.append(leaf)
      sent += leaf.size
      continue
    matrix, leaf_floats = _svd_truncate(leaf.reshape(-1, leaf.shape[-1]),
                                        energy)
    out.append(matrix.reshape(leaf.shape))
    sent += leaf_floats
  return jax.tree.unflatten(treedef, out), sent


def svd_stage(energy: Callable[[Array], Array]) -> aggregation.Aggregator:
  """The aggregator stage that uploads `svd_compress`'s factors: the upload
  becomes what the server reconstructs, and the bytes those of the factors
  (or of the matrices where they would not be smaller) and vectors.

  Args:
    energy: round index -> the energy to keep (`energy_schedule`).
  """

  def encode(upload, weight, sent, round_index):
    del sent  # The factors replace the dense upload.
    upload, floats = svd_compress(upload, energy(round_index))
    return upload, weight, communication.floats(floats), {}

  return aggregation.Aggregator(encode)


def energy_schedule(start: float, end: float, num_rounds: int):
  """round r -> `start + (end - start) (r + 1) / R`, the official `run.py`.

  Round 0 already keeps more than `start`; the last round (R - 1) keeps `end`,
  and later rounds (a resumed, longer run) stay there.
  """
  def value(round_index):
    progress = jnp.minimum(round_index + 1, num_rounds) / num_rounds
    return start + (end - start) * progress
  return value
