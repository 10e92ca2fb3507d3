"""Convolution by Winograd's minimal filtering along the rows (fedkd's CPU
path for convolutions with tall kernels).

A stride-1 convolution with an r-row kernel computes each output row from r
input rows. Winograd's F(m, r) computes m output rows of a column from
n = m + r - 1 input rows with n multiplications instead of m * r
(Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks"):

    rows of output tile = A^T [(G kernel_rows) * (B^T input_rows)]

Applied to whole rows (channels and columns carried along), the image's
tiles of m output rows become n transformed rows each, the kernel's r rows
become n kernel rows, and the products become n convolutions of one row
(1 x kw kernels), run as `fedkd.conv_cpu.conv` like any other convolution.
For mnist_cnn's second conv (14 rows, 5 x 5 kernel, m = 7): 22 one-row
convolutions instead of 70 row products, 3.2x fewer multiply-adds. The
transforms are dots with small constant matrices (`_row_transforms`), so
reverse and forward mode, `vmap` and sharding come from JAX's rules for
dots and for `conv_cpu.conv`.

Measured on a 2-core Xeon (AVX-512), values and both gradients of one
client's convolution (batch 10, SAME, one core, arms alternated):

    input   kernel  channels    direct -> Winograd
    14x14   5x5     32 -> 64    6.68 -> 4.30 ms (1.55x)
    14x14   5x5     16 -> 64    3.30 -> 2.39 ms (1.38x)
    14x14   5x5      8 -> 64    2.16 -> 1.78 ms (1.21x)
    14x14   5x5      4 -> 64    1.28 -> 1.42 ms (0.90x)
    28x28   5x5      1 -> 32    1.06 -> 1.41 ms (0.75x)
    32x32   3x3     16 -> 16    4.48 -> 4.48 ms (1.00x)
    16x16   3x3     64 -> 64    6.60 -> 5.59 ms (1.18x)

A whole ResNet-8 round was slower with its 3x3 convolutions in this form
(0.90-0.95x of direct, all channel thresholds), so `suits` takes stride-1
kernels of at least 5 rows and 8 input channels, in float32 or float64.

Rounding: the transforms scale rows by powers of the interpolation points,
so the rounding error is larger than the direct convolution's. For
mnist_cnn's second conv in float32 (normal inputs, F(7, 5)), the largest
error was 1.2e-5 of the largest output against 6e-7 direct (root mean
square 15x); float32 training does not see it. `POINTS` is the set that
gave F(7, 5) the smallest error of those tried (2.5x below 0, +-1, +-2,
+-1/2, +-3, 1/3).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fedkd import conv_cpu

# Interpolation points, used in this order (F(m, r) takes the first m + r - 2
# and the point at infinity). All exact in binary.
POINTS = (0, 1, -1, 2, -2, 0.5, -0.5, 0.75, -0.75, -4, 4, 0.25, -0.25)
# Output rows a tile, at most: more points cost accuracy.
MAX_TILE = 7
# `suits`' thresholds (measured, see the module docstring).
_MIN_KERNEL_ROWS = 5
_MIN_IN_CHANNELS = 8


def suits(kernel_shape, strides, dtype) -> bool:
  """Whether an undilated convolution with an HWIO kernel of `kernel_shape`,
  these strides and `dtype` runs faster in this form on CPU, and accurately:
  half precision would round the transforms too coarsely."""
  rows, _, in_channels, _ = kernel_shape
  return (tuple(strides) == (1, 1) and rows >= _MIN_KERNEL_ROWS
          and rows <= len(POINTS)  # F(2, r) takes r points
          and in_channels >= _MIN_IN_CHANNELS
          and jnp.dtype(dtype) in (jnp.float32, jnp.float64))


def toom_cook(m: int, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(A^T [m, n], G [n, r], B^T [n, n]) of F(m, r) in float64, n = m + r - 1:
  y[i] = sum_k d[i + k] g[k] = (A^T ((G g) * (B^T d)))[i] for any d, g."""
  n = m + r - 1
  points = np.array(POINTS[:n - 1], np.float64)
  if len(points) < n - 1:
    raise ValueError(f'F({m}, {r}) needs {n - 1} points; POINTS has '
                     f'{len(POINTS)}')
  a_t, g = np.zeros((m, n)), np.zeros((n, r))
  for j, p in enumerate(points):
    a_t[:, j] = p ** np.arange(m)
    g[j] = p ** np.arange(r) / np.prod(np.delete(p - points, j))
  a_t[m - 1, n - 1] = g[n - 1, r - 1] = 1  # the point at infinity
  # B^T solves the identity's linear equations: sum_j a_t[i, j] g[j, k]
  # b_t[j, l] = [l == i + k] for every i, k, l.
  products = np.einsum('ij,jk->ikj', a_t, g).reshape(m * r, n)
  shifts = np.zeros((m, r, n))
  for i in range(m):
    shifts[i, np.arange(r), i + np.arange(r)] = 1
  b_t = np.linalg.lstsq(products, shifts.reshape(m * r, n), rcond=None)[0]
  assert np.allclose(products @ b_t, shifts.reshape(m * r, n), atol=1e-9)
  return a_t, g, b_t


def tile_rows(kernel_rows: int, out_rows: int) -> int:
  """The m of F(m, r) that needs the fewest one-row convolutions for
  `out_rows` output rows (ties: the larger m)."""
  return min(range(2, min(MAX_TILE, len(POINTS) + 2 - kernel_rows) + 1),
             key=lambda m: ((m + kernel_rows - 1) * -(-out_rows // m), -m))


@functools.lru_cache
def _row_transforms(kernel_rows: int, rows: int, low: int, high: int):
  """(G [n, r], B [n, tiles, rows], A [out_rows, n, tiles]) in float64 for
  an input of `rows` rows padded by (low, high): B maps the input rows to
  each tile's n transformed rows (the padding's rows are zero, so they are
  left out), A the n products of each tile to its output rows."""
  out_rows = rows + low + high - kernel_rows + 1
  m = tile_rows(kernel_rows, out_rows)
  a_t, g, b_t = toom_cook(m, kernel_rows)
  n, tiles = m + kernel_rows - 1, -(-out_rows // m)
  b = np.zeros((n, tiles, rows))
  for t in range(tiles):
    for i in range(rows):
      if 0 <= i + low - m * t < n:
        b[:, t, i] = b_t[:, i + low - m * t]
  a = np.zeros((out_rows, n, tiles))
  for o in range(out_rows):
    a[o, :, o // m] = a_t[o % m]
  return g, b, a


def conv(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
  """Stride-1 `lax.conv_general_dilated` of NHWC `x` with an HWIO `kernel`,
  `padding` explicit: ((top, bottom), (left, right))."""
  batch, rows, cols, channels = x.shape
  (low, high), col_padding = padding
  g, b, a = (jnp.asarray(t, x.dtype) for t in _row_transforms(
      kernel.shape[0], rows, low, high))
  n, tiles = b.shape[:2]
  # Rows first, so that both transforms contract the leading axes.
  v = jnp.einsum('xti,ibwc->xtbwc', b, jnp.swapaxes(x, 0, 1))
  u = jnp.tensordot(g, kernel, 1)  # [n, kw, in, out]
  one_row = lambda v, u: conv_cpu.conv(
      v.reshape(tiles * batch, 1, cols, channels), u[None],
      padding=((0, 0), col_padding))
  # Over the n transformed rows, not clients (those are clients.py's vmap).
  products = jax.vmap(one_row)(v, u)
  y = jnp.tensordot(a, products.reshape(n, tiles, batch,
                                        *products.shape[-2:]), 2)
  return jnp.swapaxes(y, 0, 1)
