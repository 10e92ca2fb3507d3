"""Test-set evaluation of the global model and of many private models.

Evaluating every private model at once on a whole test batch holds [models x
batch] activations (50 MNIST CNNs x 1,000 examples: tens of GB).
`evaluate_stacked` instead takes the models a chunk at a time and the test
set a batch at a time; `plan_chunks` sizes both so that one chunk's
activations fit a memory budget, estimated per example by
`activation_bytes` and bounded by `available_bytes`.
"""

from collections.abc import Sequence
import math
import os
import resource

import flax.linen as nn
import jax
import jax.extend.core as jex
import jax.numpy as jnp

from fedkd import clients
from fedkd import losses
from fedkd.errors import FedkdError
from fedkd.typing import Array, Params, PyTree


def evaluate(model: nn.Module, params: Params, x: Array, y: Array, *,
             batch_size: int) -> tuple[Array, Array]:
  """Mean cross-entropy and accuracy of `model` on (x, y), in batches.

  Each batch is `batch_size` consecutive rows; the last one ends at the last
  row and masks out the rows its predecessor counted, so no padded copy of
  the test set is made.

  Raises:
    FedkdError: `batch_size` below 1 or no examples (the means would divide
      by zero).
  """
  n = x.shape[0]
  if batch_size < 1 or not n:
    raise FedkdError(f'evaluate needs batch_size >= 1 and at least one '
                     f'example, got batch_size={batch_size} and {n} examples')
  batch_size = min(batch_size, n)

  def batch_sums(i):
    first = i * batch_size
    start = jnp.minimum(first, n - batch_size)
    bx = jax.lax.dynamic_slice_in_dim(x, start, batch_size)
    by = jax.lax.dynamic_slice_in_dim(y, start, batch_size)
    new = start + jnp.arange(batch_size) >= first
    logits = model.apply(params, bx)
    loss = jnp.sum(jnp.where(new, losses.cross_entropy(logits, by), 0.0))
    correct = jnp.sum(new & (jnp.argmax(logits, -1) == by))
    return loss, correct

  loss, correct = jax.lax.map(batch_sums, jnp.arange(-(-n // batch_size)))
  return jnp.sum(loss) / n, jnp.sum(correct) / n


def evaluate_stacked(model: nn.Module, stacked: Params, x: Array, y: Array, *,
                     batch_size: int,
                     models_per_chunk: int) -> tuple[Array, Array]:
  """`evaluate` of each of N models stacked along axis 0.

  Chunks of `models_per_chunk` models run one after another (`lax.map`),
  each vmapped over its models, so only one chunk's activations are alive.
  The last chunk is clamped to the final models; its repeats are dropped.

  Returns:
    ([N] mean losses, [N] accuracies).
  """
  n = jax.tree.leaves(stacked)[0].shape[0]
  m = min(models_per_chunk, n)
  mapped = clients.map_clients(
      lambda xy, params: evaluate(model, params, *xy, batch_size=batch_size))

  def chunk(k):
    ids = jnp.minimum(k * m + jnp.arange(m), n - 1)
    return mapped((x, y), jax.tree.map(lambda s: s[ids], stacked))

  loss, accuracy = jax.lax.map(chunk, jnp.arange(-(-n // m)))
  return loss.reshape(-1)[:n], accuracy.reshape(-1)[:n]


def _bytes(aval) -> int:
  return math.prod(aval.shape) * aval.dtype.itemsize if hasattr(
      aval, 'shape') else 0


def _conv_patch_bytes(eqn) -> int:
  """The im2col patches of a convolution: [output pixels, window x in]."""
  # The kernel's input-feature axis is already per feature group.
  _, rhs_spec, out_spec = eqn.params['dimension_numbers']
  out = eqn.outvars[0].aval
  rhs = eqn.invars[1].aval.shape
  pixels = math.prod(out.shape[d] for d in (out_spec[0], *out_spec[2:]))
  window = math.prod(rhs[d] for d in rhs_spec[1:])
  return pixels * window * out.dtype.itemsize


def _jaxpr_bytes(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    total += sum(_bytes(v.aval) for v in eqn.outvars)
    if eqn.primitive.name == 'conv_general_dilated':
      total += _conv_patch_bytes(eqn)
    for sub in jex.jaxprs_in_params(eqn.params):
      total += _jaxpr_bytes(sub)
  return total


def activation_bytes(model: nn.Module, params: PyTree,
                     example: jax.ShapeDtypeStruct) -> int:
  """An upper estimate of `model.apply`'s working memory per example.

  The sum of every value the forward pass computes (in nested calls too;
  XLA frees or fuses most of them, hence an over-estimate) plus, for each
  convolution, the im2col patches a convolution kernel may materialise,
  which no value of the program shows. Counted at batch 2 less batch 1, so
  values the size of the parameters drop out.

  Args:
    model: the model.
    params: its parameters, or their `jax.ShapeDtypeStruct`s.
    example: shape and dtype of one example.
  """
  def program_bytes(batch):
    x = jax.ShapeDtypeStruct((batch, *example.shape), example.dtype)
    return _jaxpr_bytes(jax.make_jaxpr(model.apply)(params, x).jaxpr)
  return max(program_bytes(2) - program_bytes(1), 1)


def step_bytes(trained: Sequence[Sequence[tuple[nn.Module, PyTree]]],
               example: jax.ShapeDtypeStruct, batch_size: int) -> int:
  """An upper estimate of the activations of one client's local step.

  Args:
    trained: the kinds of model a client trains (say its teacher and its
      student), each a sequence of the (model, params) it may be (one per
      architecture); the largest `activation_bytes` of each kind counts.
    example: shape and dtype of one example.
    batch_size: examples a step.
  """
  return batch_size * sum(
      max(activation_bytes(model, params, example) for model, params in kind)
      for kind in trained if kind)


def plan_chunks(per_example_bytes: int, *, num_models: int, num_examples: int,
                max_batch_size: int, budget_bytes: int) -> tuple[int, int]:
  """The largest (batch_size, models_per_chunk) that fit `budget_bytes`.

  The batch grows first, up to `max_batch_size` and the test set, then the
  chunk of models; never below one example of one model. Both are then
  evened out over the batches and chunks they need (10,000 examples in
  batches of at most 900 become 12 batches of 834).
  """
  fits = max(budget_bytes // per_example_bytes, 1)
  even = lambda n, most: -(-n // -(-n // most))
  batch = even(num_examples, max(min(max_batch_size, num_examples, fits), 1))
  models = even(num_models, max(min(num_models, fits // batch), 1))
  return batch, models


def _cgroup_free_bytes() -> int | None:
  """The memory left under this process's cgroup (v2) limit, if it has one."""
  try:
    with open('/sys/fs/cgroup/memory.max') as f:
      limit = f.read().strip()
    with open('/sys/fs/cgroup/memory.current') as f:
      used = int(f.read())
  except (OSError, ValueError):
    return None
  return None if limit == 'max' else int(limit) - used


def _address_space_left() -> int | None:
  """What an address-space limit (`ulimit -v`) leaves this process, if set."""
  limit, _ = resource.getrlimit(resource.RLIMIT_AS)
  if limit == resource.RLIM_INFINITY:
    return None
  try:
    with open('/proc/self/status') as f:
      mapped = next(int(line.split()[1]) * 1024 for line in f
                    if line.startswith('VmSize:'))
  except (OSError, StopIteration, ValueError):
    return None
  return max(limit - mapped, 0)


def _host_available_bytes() -> int:
  """What the OS can give this process without swapping."""
  free = None
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          free = int(line.split()[1]) * 1024
  except OSError:
    pass
  if free is None:
    free = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_AVPHYS_PAGES')
  limits = (_cgroup_free_bytes(), _address_space_left())
  return min([free, *(n for n in limits if n is not None)])


def available_bytes(device: jax.Device) -> int:
  """Memory free for new buffers on `device`.

  Accelerators report their allocator's limit and use; CPU devices report
  nothing and share the host's memory, so the OS's figure stands in.
  """
  stats = device.memory_stats()
  if stats and 'bytes_limit' in stats:
    return stats['bytes_limit'] - stats.get('bytes_in_use', 0)
  return _host_available_bytes()


# Evaluation may use this share of the free memory, up to the cap: the rest
# stays for training, and larger chunks no longer make evaluation faster.
_EVAL_MEMORY_FRACTION = 0.25
_EVAL_MEMORY_CAP_BYTES = 1 << 30


def eval_budget_bytes(device: jax.Device) -> int:
  """The working memory evaluation may take on `device`."""
  return min(int(_EVAL_MEMORY_FRACTION * available_bytes(device)),
             _EVAL_MEMORY_CAP_BYTES)
