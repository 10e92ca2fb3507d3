"""Dense, Conv and max-pool layers that stay fast when vmapped over clients.

Every model of fedkd is built from these, so the kernels that suit the
backend are chosen in one place, at lowering time, from the platform the
computation is compiled for (`jax.lax.platform_dependent`), not from the
process's default backend. Both paths compute the same function; only
rounding differs. All layers are differentiable in reverse and forward mode
(`jax.grad`, `jax.jvp`, Hessian-vector products).

Why CPU needs its own kernels (profiled with `jax.profiler` per HLO op on a
2-core EPYC, the vmapped local step of `mnist_cnn`, 50 clients, batch 10):

* Dense weight gradient. Under `vmap`, autodiff's `x^T @ dy` is a batched dot
  contracting the minibatch axis, which XLA:CPU runs about 4x slower than the
  forward dot. For minibatches of at most `_MAX_OUTER_PRODUCT_BATCH` examples
  the weight tangent is instead written row by row, `x[i] @ dk`, whose
  transpose is a sum of B outer products: one elementwise loop that XLA fuses
  with the optimizer's update.
* Convolution. XLA:CPU's fast convolution kernel (YNNPACK) takes one layout
  only, and JAX's gradients, `vmap` with per-client kernels and loops keep
  most convolutions of a training step off it: on CPU a conv is
  `fedkd.conv_cpu.conv`, whose derivatives and batching rule stay in that
  layout (clients with their own kernels run one after another, each
  device its own). Its docstring has the measurements. It replaced im2col
  (shifted slices concatenated, then one matmul batched over clients): with
  a device per core (`XLA_FLAGS=--xla_force_host_platform_device_count=2`
  here), the mnist_cnn FedAvg round took 2.49 s against 3.45 s, ResNet-8's
  0.48 s against 0.76 s (README, "Why a device per core"). Stride-1
  float32 convolutions with kernels of 5 rows or more and 8 input channels
  or more run as Winograd's F(m, r) along the rows (`fedkd.winograd`):
  fewer multiply-adds, in one-row convolutions of that same primitive.
* Max pooling. The gradient of `lax.reduce_window` max materialises index
  tensors (iotas and a variadic reduce-window); non-overlapping windows are
  instead a reshape and a max, whose gradient is a cheap equality mask.

Other backends keep XLA's convolution (cuDNN on GPU handles grouped
convolutions natively) and the plain weight-gradient dot.
"""

from collections.abc import Sequence
import functools

import flax.linen as nn
import jax
from jax.custom_derivatives import SymbolicZero
import jax.numpy as jnp

from fedkd import conv_cpu
from fedkd import winograd

_MAX_OUTER_PRODUCT_BATCH = 16

Padding = str | Sequence[tuple[int, int]]


def _rowwise_matmul(x: jax.Array, d_kernel: jax.Array) -> jax.Array:
  """`x @ d_kernel`, one row at a time: transposes to a sum of outer products."""
  return jnp.stack([x[i] @ d_kernel for i in range(x.shape[0])])


def _weight_tangent(x: jax.Array, d_kernel: jax.Array) -> jax.Array:
  if x.shape[0] > _MAX_OUTER_PRODUCT_BATCH:
    return x @ d_kernel
  return jax.lax.platform_dependent(x, d_kernel, cpu=_rowwise_matmul,
                                    default=jnp.matmul)


@jax.custom_jvp
def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """`x @ kernel + bias` for x of shape [batch, in]."""
  return x @ kernel + bias


def _tangent_sum(y, *terms):
  """Sums the `(fn, tangent)` terms whose tangent is not a symbolic zero.

  Symbolic zeros (e.g. the data fed to a first layer) then cost nothing.
  """
  return functools.reduce(
      jnp.add, [fn(t) for fn, t in terms if not isinstance(t, SymbolicZero)],
      jnp.zeros_like(y))


def _dense_jvp(primals, tangents):
  x, kernel, bias = primals
  dx, d_kernel, d_bias = tangents
  y = dense(x, kernel, bias)
  return y, _tangent_sum(y, (lambda t: t @ kernel, dx),
                         (lambda t: _weight_tangent(x, t), d_kernel),
                         (lambda t: jnp.broadcast_to(t, y.shape), d_bias))


dense.defjvp(_dense_jvp, symbolic_zeros=True)


def _pads(x_shape, kernel_shape, strides, padding: Padding):
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(x_shape[1:3], kernel_shape[:2], strides,
                                      padding)
  return tuple(tuple(int(e) for e in p) for p in padding)


def conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int] = (1, 1),
         padding: Padding = 'SAME') -> jax.Array:
  """2-D convolution of NHWC `x` with an HWIO `kernel` (no dilation)."""
  strides = tuple(strides)
  pads = _pads(x.shape, kernel.shape, strides, padding)
  return jax.lax.platform_dependent(
      x, kernel, cpu=functools.partial(_cpu_conv, strides=strides, pads=pads),
      default=functools.partial(conv_cpu.xla_conv, strides=strides,
                                padding=pads))


def _cpu_conv(x, kernel, *, strides, pads):
  if winograd.suits(kernel.shape, strides, x.dtype):
    return winograd.conv(x, kernel, pads)
  return conv_cpu.conv(x, kernel, strides=strides, padding=pads)


def max_pool(x: jax.Array, window: int) -> jax.Array:
  """Max over non-overlapping `window` x `window` patches of NHWC `x`.

  Trailing rows/columns that do not fill a window are dropped ('VALID').
  """
  b, h, w, c = x.shape
  x = x[:, :h - h % window, :w - w % window]
  return jnp.max(x.reshape(b, h // window, window, w // window, window, c),
                 axis=(2, 4))


class Dense(nn.Module):
  """`flax.linen.Dense` for [batch, in] inputs (same parameters and init)."""
  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    return dense(x, kernel, bias)


class Conv(nn.Module):
  """`flax.linen.Conv` for [batch, height, width, channels] inputs.

  Same parameter names, shapes and initialisers: `kernel` [kh, kw, in, out],
  `bias` [out]. `padding` is 'SAME', 'VALID' or ((top, bottom), (left,
  right)).
  """
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Padding = 'SAME'
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (*self.kernel_size, x.shape[-1], self.features))
    y = conv(x, kernel, self.strides, self.padding)
    if self.use_bias:
      y += self.param('bias', nn.initializers.zeros, (self.features,))
    return y
