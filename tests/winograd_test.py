"""fedkd.winograd: the Toom-Cook matrices, and the convolution against XLA's
(values, both gradients, forward mode, vmapped clients), and which
convolutions `fedkd.layers.conv` runs in this form on CPU."""

import re

from absl.testing import absltest
from absl.testing import parameterized
import jax
from jax import export
import jax.numpy as jnp
import numpy as np

from fedkd import layers
from fedkd import winograd
import toys

# float32 Winograd rounds more than the direct convolution (module
# docstring): up to about 1e-5 of the largest output for F(7, 5).
_TOLERANCE = dict(rtol=2e-4, atol=2e-4)


class ToomCookTest(parameterized.TestCase):

  @parameterized.product(m=(2, 4, 5, 7), r=(3, 5, 7))
  def test_computes_the_correlation(self, m, r):
    a_t, g, b_t = winograd.toom_cook(m, r)
    self.assertEqual((a_t.shape, g.shape, b_t.shape),
                     ((m, m + r - 1), (m + r - 1, r), (m + r - 1,) * 2))
    rng = np.random.default_rng(m * r)
    for _ in range(3):
      d, k = rng.normal(size=m + r - 1), rng.normal(size=r)
      np.testing.assert_allclose(a_t @ ((g @ k) * (b_t @ d)),
                                 np.correlate(d, k, 'valid'), atol=1e-9)

  def test_tile_needs_fewest_one_row_convolutions(self):
    # 14 rows, 5-row kernel: F(7, 5) needs 2 tiles x 11 = 22 one-row
    # convolutions, F(4, 5) 4 x 8 = 32, F(5, 5) 3 x 9 = 27.
    self.assertEqual(winograd.tile_rows(5, 14), 7)
    # 10 rows: F(5, 5) 2 x 9 = 18 against F(7, 5) 2 x 11 = 22.
    self.assertEqual(winograd.tile_rows(5, 10), 5)
    # 16 rows: F(6, 5) 3 x 10 = 30 against F(4, 5) 4 x 8 = 32 and F(7, 5)
    # 3 x 11 = 33.
    self.assertEqual(winograd.tile_rows(5, 16), 6)


class ConvTest(parameterized.TestCase):

  # (height, width, kernel, padding): odd sizes, tiles that overhang the
  # output, asymmetric and no padding, a 7-row kernel.
  @parameterized.parameters(
      (14, 14, (5, 5), ((2, 2), (2, 2))),
      (13, 9, (5, 3), ((2, 2), (1, 1))),
      (11, 12, (5, 5), ((0, 0), (0, 0))),
      (12, 10, (5, 5), ((2, 1), (0, 3))),
      (9, 8, (7, 5), ((3, 3), (2, 2))),
  )
  def test_matches_xla_values_and_gradients(self, h, w, kernel_hw, padding):
    rng = np.random.default_rng(0)
    # Clients with their own kernels, vmapped as in a round.
    x = rng.normal(size=(3, 2, h, w, 8)).astype(np.float32)
    kernel = rng.normal(size=(3, *kernel_hw, 8, 5)).astype(np.float32)
    ref = jax.vmap(lambda x, k: toys.xla_conv(x, k, padding))
    ours = jax.vmap(lambda x, k: winograd.conv(x, k, padding))
    want = ref(x, kernel)
    scale = np.abs(want).max()
    np.testing.assert_allclose(jax.jit(ours)(x, kernel) / scale,
                               want / scale, **_TOLERANCE)
    target = rng.normal(size=want.shape).astype(np.float32)
    grads = [jax.jit(jax.grad(lambda x, k, f=f: jnp.sum(
        jnp.sin(f(x, k)) * target), argnums=(0, 1)))(x, kernel)
             for f in (ref, ours)]
    for a, b in zip(*grads):
      np.testing.assert_allclose(b / np.abs(a).max(), a / np.abs(a).max(),
                                 **_TOLERANCE)

  def test_forward_mode_and_hessian_vector_product(self):
    rng = np.random.default_rng(2)
    x, dx = rng.normal(size=(2, 2, 10, 9, 8)).astype(np.float32)
    kernel, dk = rng.normal(size=(2, 5, 5, 8, 4)).astype(np.float32)
    padding = ((2, 2), (2, 2))
    loss = lambda conv: lambda x, k: jnp.sum(jnp.sin(conv(x, k, padding)))
    ref, ours = loss(toys.xla_conv), loss(winograd.conv)
    tangents = [jax.jvp(f, (x, kernel), (dx, dk))[1] for f in (ref, ours)]
    np.testing.assert_allclose(tangents[1], tangents[0], rtol=1e-3)
    hvps = [jax.jvp(jax.grad(f, argnums=1), (x, kernel), (dx, dk))[1]
            for f in (ref, ours)]
    np.testing.assert_allclose(hvps[1] / np.abs(hvps[0]).max(),
                               hvps[0] / np.abs(hvps[0]).max(), atol=1e-3)


class RoutingTest(parameterized.TestCase):

  @parameterized.parameters(
      ((5, 5, 8, 4), (1, 1), jnp.float32, True),
      ((5, 3, 16, 4), (1, 1), jnp.float32, True),
      ((5, 5, 4, 4), (1, 1), jnp.float32, False),  # few input channels
      ((3, 3, 64, 64), (1, 1), jnp.float32, False),  # a short kernel
      ((5, 5, 8, 4), (2, 2), jnp.float32, False),  # strided
      ((5, 5, 8, 4), (1, 1), jnp.bfloat16, False),  # half precision
  )
  def test_cpu_lowers_winograd_only_where_it_suits(self, kernel_shape,
                                                   strides, dtype, expected):
    args = (jax.ShapeDtypeStruct((2, 12, 12, kernel_shape[2]), dtype),
            jax.ShapeDtypeStruct(kernel_shape, dtype))
    grad = jax.grad(lambda x, k: jnp.sum(layers.conv(x, k, strides)), (0, 1))
    text = export.export(jax.jit(grad), platforms=['cpu'])(
        *args).mlir_module()
    kernels = re.findall(r'stablehlo.convolution.*?tensor<.*?tensor<(\d+)x',
                         text)
    self.assertTrue(kernels)
    # One-row kernels (the forward's and input gradient's products) appear
    # exactly where Winograd runs.
    self.assertEqual('1' in kernels, expected)
    self.assertEqual(winograd.suits(kernel_shape, strides, dtype), expected)


if __name__ == '__main__':
  absltest.main()
