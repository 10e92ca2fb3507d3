"""fedkd.layers against XLA's own ops: values, gradients, forward mode, and
which kernels each backend lowers to."""

import itertools
import re

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
from jax import export
import jax.numpy as jnp
import numpy as np

from fedkd import layers
import toys


def _loss(conv, x, kernel, target):
  return jnp.sum(jnp.sin(conv(x, kernel)) * target)


# (height, width, kernel, strides, padding): odd sizes, both strides, every
# padding form, 1x1 and non-square kernels.
_CASES = (
    (7, 9, (3, 3), (1, 1), 'SAME'),
    (8, 8, (3, 3), (2, 2), 'SAME'),
    (9, 7, (5, 3), (2, 1), 'VALID'),
    (6, 5, (1, 1), (2, 2), 'SAME'),
    (10, 11, (3, 3), (2, 2), ((1, 1), (1, 1))),
    (12, 12, (5, 5), (1, 1), ((2, 1), (0, 3))),
)


class ConvTest(parameterized.TestCase):

  def _data(self, h, w, kernel_hw, clients=2, seed=0):
    rng = np.random.default_rng(seed)
    # Clients with their own kernels, vmapped as in a round.
    x = rng.normal(size=(clients, 3, h, w, 4)).astype(np.float32)
    kernel = rng.normal(size=(clients, *kernel_hw, 4, 5)).astype(np.float32)
    return x, kernel

  def _check_vmapped(self, x, kernel, in_axes, strides, padding):
    """Values and both gradients of `layers.conv` vmapped with `in_axes`
    against XLA's convolution."""
    ref = lambda x, k: toys.xla_conv(x, k, padding, strides)
    ours = lambda x, k: layers.conv(x, k, strides, padding)
    want, got = (jax.jit(jax.vmap(f, in_axes))(x, kernel)
                 for f in (ref, ours))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    target = np.random.default_rng(1).normal(size=want.shape).astype(
        np.float32)
    grads = [jax.jit(jax.grad(
        lambda x, k, f=f: _loss(jax.vmap(f, in_axes), x, k, target),
        argnums=(0, 1)))(x, kernel) for f in (ref, ours)]
    for a, b in zip(*grads):
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)

  @parameterized.parameters(*_CASES)
  def test_matches_xla_values_and_gradients(self, h, w, kernel_hw, strides,
                                            padding):
    x, kernel = self._data(h, w, kernel_hw)
    self._check_vmapped(x, kernel, 0, strides, padding)

  @parameterized.parameters(
      (0, None, 2),  # one kernel for every client: they join the batch
      (None, 0, 2),  # one input (public data): they join the channels
      (0, 0, 9))  # more clients than run unrolled: a loop over them
  def test_every_batching_case(self, x_axis, kernel_axis, clients):
    x, kernel = self._data(8, 7, (3, 3), clients)
    x, kernel = (a if axis == 0 else a[0] for a, axis in
                 ((x, x_axis), (kernel, kernel_axis)))
    self._check_vmapped(x, kernel, (x_axis, kernel_axis), (2, 1), 'SAME')

  @parameterized.parameters(*_CASES[1:3])
  def test_forward_mode_and_hessian_vector_product(self, h, w, kernel_hw,
                                                   strides, padding):
    x, kernel = (a[0] for a in self._data(h, w, kernel_hw, seed=2))
    dx, dk = (a[0] for a in self._data(h, w, kernel_hw, seed=3))
    target = 1.0
    ref = lambda x, k: _loss(
        lambda x, k: toys.xla_conv(x, k, padding, strides), x, k, target)
    ours = lambda x, k: _loss(
        lambda x, k: layers.conv(x, k, strides, padding), x, k, target)
    tangents = [jax.jvp(f, (x, kernel), (dx, dk))[1] for f in (ref, ours)]
    np.testing.assert_allclose(tangents[1], tangents[0], rtol=1e-4,
                               atol=1e-3)
    hvps = [jax.jvp(jax.grad(f, argnums=1), (x, kernel), (dx, dk))[1]
            for f in (ref, ours)]
    np.testing.assert_allclose(hvps[1], hvps[0], rtol=1e-3, atol=1e-3)

  def test_each_backend_lowers_its_own_kernel(self):
    # Chosen when lowering for a platform, not from the default backend:
    # exporting for a GPU works on a CPU-only machine. A vmapped local step
    # in a loop, as a round runs it.
    def steps(x, kernel):
      grad = jax.grad(lambda k: jnp.sum(jnp.tanh(layers.conv(x, k, (2, 2)))))
      return jax.lax.fori_loop(0, 2, lambda _, k: k - grad(k), kernel)

    step = jax.jit(jax.vmap(steps))
    args = (jax.ShapeDtypeStruct((2, 2, 8, 8, 3), jnp.float32),
            jax.ShapeDtypeStruct((2, 3, 3, 3, 4), jnp.float32))
    cpu, gpu = (export.export(step, platforms=[p])(*args).mlir_module()
                for p in ('cpu', 'cuda'))
    convs = lambda text: re.findall(
        r'stablehlo.convolution.*? dim_numbers = (\[.*?\]x\[.*?\]->\[.*?\])'
        r'.*?feature_group_count = (\d+)', text)
    # CPU: the forward conv and the kernel gradient, each in XLA:CPU's fast
    # layout, one client at a time. GPU: XLA's own, grouped over the clients.
    self.assertLen(convs(cpu), 2 * 2)
    self.assertEqual(set(convs(cpu)),
                     {('[b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f]', '1')})
    self.assertIn('2', {groups for _, groups in convs(gpu)})


class MaxPoolTest(parameterized.TestCase):

  @parameterized.parameters((8, 8), (7, 9))  # odd sizes drop the remainder
  def test_matches_flax_max_pool(self, h, w):
    x = np.random.default_rng(0).normal(size=(2, h, w, 3)).astype(np.float32)
    ref = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
    ours = lambda x: layers.max_pool(x, 2)
    np.testing.assert_array_equal(ours(x), ref(x))
    grads = [jax.grad(lambda x, f=f: jnp.sum(f(x) ** 2))(x)
             for f in (ref, ours)]
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-6)


class DenseTest(parameterized.TestCase):

  @parameterized.parameters(1, 10, 16, 40)  # both sides of the batch cutoff
  def test_gradient_matches_plain_matmul(self, batch):
    kx, kk, kd = jax.random.split(jax.random.PRNGKey(batch), 3)
    x = jax.random.normal(kx, (3, batch, 7))
    kernel = jax.random.normal(kk, (3, 7, 5))
    bias = jnp.arange(5.0)
    target = jax.random.normal(kd, (3, batch, 5))

    def loss(f, x, kernel, bias, target):
      return jnp.sum(jnp.tanh(f(x, kernel, bias)) * target)

    def grads(f):  # vmapped over 3 "clients", as in a round
      g = jax.grad(loss, argnums=(1, 2, 3))
      return jax.vmap(lambda *a: g(f, *a), in_axes=(0, 0, None, 0))(
          x, kernel, bias, target)

    plain = grads(lambda x, k, b: x @ k + b)
    custom = grads(layers.dense)
    for a, b in zip(plain, custom):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

  @parameterized.parameters(*itertools.product((4, 40), (True, False)))
  def test_forward_mode_and_hessian_vector_product(self, batch, data_input):
    rng = np.random.default_rng(batch)
    x, dx = rng.normal(size=(2, batch, 7)).astype(np.float32)
    kernel, dk = rng.normal(size=(2, 7, 5)).astype(np.float32)
    bias, db = rng.normal(size=(2, 5)).astype(np.float32)
    if data_input:  # a first layer: no tangent on x (a symbolic zero)
      dx = np.zeros_like(dx)

    def loss(f):
      if data_input:
        return lambda k, b: jnp.sum(jnp.tanh(f(x, k, b)))
      return lambda k, b, x: jnp.sum(jnp.tanh(f(x, k, b)))

    args = (kernel, bias) if data_input else (kernel, bias, x)
    tangents = (dk, db) if data_input else (dk, db, dx)
    plain = loss(lambda x, k, b: x @ k + b)
    custom = loss(layers.dense)
    np.testing.assert_allclose(jax.jvp(custom, args, tangents)[1],
                               jax.jvp(plain, args, tangents)[1], rtol=1e-5)
    hvps = [jax.jvp(jax.grad(f), args, tangents)[1] for f in (plain, custom)]
    np.testing.assert_allclose(hvps[1], hvps[0], rtol=1e-4, atol=1e-5)


if __name__ == '__main__':
  absltest.main()
