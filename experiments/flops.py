"""The matmul and convolution FLOPs a traced JAX computation executes.

    flops.of_jaxpr(jax.jit(fn).trace(*args).jaxpr)  # Count(flops, exact)

Counted from the jaxpr, so every algorithm's round is counted as it runs:
local training, and also what some algorithms add to it (FedDF's ensemble
and server distillation, FedMD's digest on the public data, FedNTD's global
model on every example, FedKD's mentor and compression). A multiply-add is 2
FLOPs:

* `dot_general`: 2 x the output's elements x the contracted size.
* A convolution (`lax.conv_general_dilated`, or `fedkd.conv_cpu`'s
  primitive): 2 x each output element's products, counting only the kernel
  taps that land on an input element, not on padding or on the holes of an
  input dilation (a strided convolution's input gradient). XLA's cost
  analysis counts the same way.
* Loops and calls: a `scan` counts its body `length` times; a `shard_map`
  its body once a device it splits over (the body sees one device's
  share); a `cond` its costliest branch, and a `while_loop` its body and
  condition once, whatever its trip count. The count is then `exact` only
  if the branches count the same and the loop body counts nothing.
  Otherwise it is a guess: FedDF's server scores its validation split in a
  `cond` at every step, and runs it every `distill_eval_every` steps (an
  overcount); FedKD's SVD finds the kept directions by blocks of 16, the
  first before its `while_loop` and the rest in it (low where the rank
  takes three blocks or more, high where one is enough).
* A `cond` that the platform chooses (`jax.lax.platform_dependent`) counts
  its default branch, XLA's own kernels: the FLOPs of the model as written.
  fedkd's CPU branch computes the same function, with fewer multiplications
  where it runs a convolution as Winograd's (`fedkd.winograd`), so a CPU
  rate of such a round is an effective rate.

What is computed counts, masked or not: `experiments.benchmark` traces its
rounds on one device with every client at once, so that no padded client
slot counts (but where clients have several architectures, each gets as
many slots as the most numerous). Elementwise ops, reductions and the
optimizer are not counted. A primitive that multiplies matrices without a
rule here (LAPACK's decompositions, ragged or Pallas kernels), or holds
computations where this walk does not look, raises NotImplementedError
rather than counting nothing.
"""

import math
from typing import NamedTuple

import jax
import jax.extend.core

from fedkd import conv_cpu

_UNCOUNTED = frozenset((
    'cholesky', 'cholesky_update', 'eig', 'eigh', 'fft', 'geqp3', 'geqrf',
    'hessenberg', 'householder_product', 'lu', 'ormqr', 'pallas_call', 'qr',
    'ragged_dot_general', 'schur', 'svd', 'symmetric_product',
    'triangular_solve', 'tridiagonal', 'tridiagonal_solve'))
_JAXPRS = (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)


def _taps(size: int, kernel: int, stride: int, low: int, lhs_dilation: int,
          rhs_dilation: int, outputs: int) -> int:
  """Kernel taps that land on an input element, summed over one spatial
  axis' outputs."""
  last = (size - 1) * lhs_dilation
  count = 0
  for o in range(outputs):
    for t in range(kernel):
      p = o * stride - low + t * rhs_dilation
      count += 0 <= p <= last and p % lhs_dilation == 0
  return count


def _conv_flops(eqn) -> int:
  """FLOPs of `lax.conv_general_dilated` or of `fedkd.conv_cpu`'s primitive
  (which has its layouts and no groups)."""
  params = eqn.params
  lhs, rhs, out = (v.aval.shape for v in (*eqn.invars, eqn.outvars[0]))
  if eqn.primitive.name == 'fedkd_conv_nhwc':
    dims = jax.lax.conv_dimension_numbers(lhs, rhs, conv_cpu.DIMENSIONS)
    strides, groups = params['strides'], 1
  else:
    dims = params['dimension_numbers']
    strides, groups = params['window_strides'], params['feature_group_count']
  # The specs index (batch, feature, spatial...) of lhs and out, and (out
  # feature, in feature, spatial...) of rhs.
  taps = math.prod(
      _taps(lhs[l], rhs[r], s, low, ld, rd, out[o])
      for l, r, o, s, (low, _), ld, rd in zip(
          dims.lhs_spec[2:], dims.rhs_spec[2:], dims.out_spec[2:], strides,
          params['padding'], params['lhs_dilation'], params['rhs_dilation']))
  return (2 * out[dims.out_spec[0]] * out[dims.out_spec[1]]
          * lhs[dims.lhs_spec[1]] // groups * taps)


class Count(NamedTuple):
  """FLOPs, and whether they are what runs: False where a `while_loop` or a
  data-chosen `cond` with matmuls or convolutions makes them a guess."""
  flops: int
  exact: bool

  def __add__(self, other: 'Count') -> 'Count':
    return Count(self.flops + other.flops, self.exact and other.exact)

  def times(self, n: int) -> 'Count':
    return Count(n * self.flops, self.exact)


def _eqn_count(eqn) -> Count:
  """The count of one equation, its sub-computations included."""
  name, params = eqn.primitive.name, eqn.params
  shape = lambda v: v.aval.shape
  if name == 'dot_general':
    (contracted, _), _ = params['dimension_numbers']
    return Count(2 * math.prod(shape(eqn.outvars[0])) * math.prod(
        shape(eqn.invars[0])[d] for d in contracted), True)
  if name in ('conv_general_dilated', 'fedkd_conv_nhwc'):
    return Count(_conv_flops(eqn), True)
  if name == 'cond':
    platforms = params.get('branches_platforms') or ()
    if None in platforms:
      return of_jaxpr(params['branches'][platforms.index(None)])
    branches = [of_jaxpr(b) for b in params['branches']]
    flops = {b.flops for b in branches}
    return Count(max(flops),
                 len(flops) == 1 and all(b.exact for b in branches))
  hidden = any(isinstance(v, (tuple, list)) and any(
      isinstance(e, _JAXPRS) for e in v) for v in params.values())
  if name in _UNCOUNTED or hidden:
    raise NotImplementedError(f'no FLOP count for {name}; add it to '
                              'experiments/flops.py')
  inner = sum((of_jaxpr(v) for v in params.values()
               if isinstance(v, _JAXPRS)), Count(0, True))
  if name == 'scan':
    return inner.times(params['length'])
  if name == 'shard_map':
    return inner.times(math.prod(params['mesh'].shape[a]
                                 for a in params['newly_manual_axes']))
  if name == 'while':
    return Count(inner.flops, inner.flops == 0)
  return inner


def of_jaxpr(jaxpr) -> Count:
  """Matmul and convolution FLOPs of a `Jaxpr` or `ClosedJaxpr`."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  return sum(map(_eqn_count, jaxpr.eqns), Count(0, True))
