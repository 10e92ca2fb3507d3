"""The convolution of fedkd's CPU layers: XLA's own, kept in its fast form.

XLA:CPU runs a convolution in one layout through YNNPACK (NHWC input, HWIO
kernel, NHWC output) and any other through generic code. Outside loops XLA
transposes operands into that layout itself; inside a `while` loop (the
`lax.scan` of local steps) it does not, and JAX's own gradients of
`lax.conv_general_dilated` are in other layouts. For the second conv of
mnist_cnn (10 examples) in a loop, the kernel gradient took 76 ms against
2.8 ms in that layout, the input gradient 7.6 ms against 2.1 ms. Under `vmap`
with per-client kernels JAX makes a grouped convolution, also off the fast
path (the forward of 5 clients 3.3x slower than 5 separate ones).

`conv` is therefore a primitive whose derivatives and batching rule are
again this primitive in that layout (with explicit transposes and flips of
the operands):

* reverse mode: the input gradient is the convolution of the output
  gradient with the flipped kernel, its input and output channels swapped;
  the kernel gradient is the convolution of the input, batch and channel
  axes swapped, with the output gradient as kernel. Both are JAX's rules
  (`lax.conv_general_dilated`'s transposes), written in that layout.
* forward mode: the primitive is bilinear, so its tangent is two more of it.
* `vmap`: clients with their own kernels run one after another (unrolled up
  to `_MAX_UNROLLED`, then `lax.map`), and under the `clients` mesh axis
  each device runs its own (`shard_map`); a shared kernel folds the clients
  into the batch, shared inputs fold them into the output channels.

5 clients' forward and both gradients, one at a time, in a loop: 32 ms for
mnist_cnn's second conv against 41 ms for the im2col that fedkd used before
(shifted slices concatenated, one matmul batched over the clients), 14 ms
against 33 ms for ResNet-8's 16-channel 3x3 convs. XLA runs each of these
convolutions on one core, where its matmuls use all of them: on a CPU of N
cores, N devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N`) run
N clients at once.
"""

import functools
import math

import jax
from jax.extend.core import Primitive
from jax.interpreters import ad
from jax.interpreters import batching
from jax.interpreters import mlir
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

# The layouts of XLA:CPU's fast convolution (input, kernel, output).
DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')
# Clients with their own kernels up to this many run unrolled, more in a loop.
_MAX_UNROLLED = 8


def xla_conv(x, kernel, *, strides, padding, lhs_dilation=(1, 1),
             rhs_dilation=(1, 1)):
  """XLA's own convolution of NHWC `x` with an HWIO `kernel`, as JAX
  differentiates and batches it (what other backends run)."""
  return jax.lax.conv_general_dilated(
      x, kernel, strides, padding, lhs_dilation, rhs_dilation,
      dimension_numbers=DIMENSIONS)


_conv_p = Primitive('fedkd_conv_nhwc')
_conv_p.def_impl(xla_conv)
mlir.register_lowering(_conv_p, mlir.lower_fun(xla_conv,
                                               multiple_results=False))


@_conv_p.def_abstract_eval
def _shape(x, kernel, **params):
  out = jax.eval_shape(functools.partial(xla_conv, **params), x, kernel)
  return jax.core.ShapedArray(out.shape, out.dtype)


def conv(x: jax.Array, kernel: jax.Array, *, strides=(1, 1),
         padding=((0, 0), (0, 0)), lhs_dilation=(1, 1),
         rhs_dilation=(1, 1)) -> jax.Array:
  """`lax.conv_general_dilated` of NHWC `x` with an HWIO `kernel`.

  `padding` is explicit: ((top, bottom), (left, right)).
  """
  as_tuple = lambda pairs: tuple(tuple(int(e) for e in p) for p in pairs)
  return _conv_p.bind(
      x, kernel, strides=tuple(strides), padding=as_tuple(padding),
      lhs_dilation=tuple(lhs_dilation), rhs_dilation=tuple(rhs_dilation))


def _dilated(size: int, dilation: int) -> int:
  return 0 if size == 0 else 1 + dilation * (size - 1)


def _transpose_input(g, x, kernel, *, strides, padding, lhs_dilation,
                     rhs_dilation):
  """The input gradient (`lax.conv_general_dilated`'s lhs transpose)."""
  pads = []
  for n, k, o, s, (low, _), ld, rd in zip(
      x.aval.shape[1:3], kernel.shape[:2], g.shape[1:3], strides, padding,
      lhs_dilation, rhs_dilation):
    before = _dilated(k, rd) - low - 1
    pads.append((before, _dilated(n, ld) + _dilated(k, rd) - 1
                 - _dilated(o, s) - before))
  flipped = jnp.swapaxes(jnp.flip(kernel, (0, 1)), 2, 3)
  return conv(g, flipped, strides=lhs_dilation, padding=pads,
              lhs_dilation=strides, rhs_dilation=rhs_dilation)


def _transpose_kernel(g, x, kernel, *, strides, padding, lhs_dilation,
                      rhs_dilation):
  """The kernel gradient (`lax.conv_general_dilated`'s rhs transpose)."""
  pads = []
  for n, k, o, s, (low, _), ld, rd in zip(
      x.shape[1:3], kernel.aval.shape[:2], g.shape[1:3], strides, padding,
      lhs_dilation, rhs_dilation):
    pads.append((low, _dilated(o, s) - _dilated(n, ld)
                 + _dilated(k, rd) - low - 1))
  # Channels become the batch and the batch the contracted channels.
  out = conv(jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(g, (1, 2, 0, 3)),
             strides=rhs_dilation, padding=pads, lhs_dilation=lhs_dilation,
             rhs_dilation=strides)
  return jnp.transpose(out, (1, 2, 0, 3))


ad.defbilinear(_conv_p, _transpose_input, _transpose_kernel)


def _each(params, x, kernel):
  """The convolutions of x[i] with kernel[i], one after another."""
  one = lambda xk: _conv_p.bind(*xk, **params)
  if x.shape[0] > _MAX_UNROLLED:
    return jax.lax.map(one, (x, kernel))
  return jnp.stack([one(xk) for xk in zip(x, kernel)])


def _batch(axis, args, dims, **params):
  x, kernel = args
  dx, dk = dims
  if dk is None:  # one kernel: the clients join the batch
    x = jnp.moveaxis(x, dx, 0)
    y = _conv_p.bind(x.reshape(-1, *x.shape[2:]), kernel, **params)
    return y.reshape(*x.shape[:2], *y.shape[1:]), 0
  kernel = jnp.moveaxis(kernel, dk, -2)
  if dx is None:  # one input: the clients join the output channels
    y = _conv_p.bind(x, kernel.reshape(*kernel.shape[:3], -1), **params)
    return y.reshape(*y.shape[:3], *kernel.shape[3:]), 3
  x, kernel = jnp.moveaxis(x, dx, 0), jnp.moveaxis(kernel, -2, 0)
  each = functools.partial(_each, params)
  mesh = jax.sharding.get_abstract_mesh()
  devices = 1 if mesh.empty or not axis.spmd_name else math.prod(
      dict(mesh.shape)[name] for name in axis.spmd_name)
  if devices == 1 or x.shape[0] % devices:
    return each(x, kernel), 0
  # Clients split over devices (vmap's `spmd_axis_name`): each device runs
  # its own, where XLA's partitioner would gather every client's operands.
  split = P(axis.spmd_name)
  return jax.shard_map(each, mesh=mesh, in_specs=(split, split),
                       out_specs=split)(x, kernel), 0


batching.fancy_primitive_batchers[_conv_p] = _batch
