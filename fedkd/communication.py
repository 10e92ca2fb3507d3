"""Exact byte counts that leave a jitted round as small int32 terms.

JAX runs with 32-bit integers, and a round's bytes do not fit in them: 400
clients uploading a 6.7 MB model already exceed 2^31. So a round reports
`Bytes`: int32 `counts` (how many clients, or traced float counts cut into
11-bit words) and static Python int `units`; the host multiplies and adds
them in Python ints, which are exact at any scale. Other per-client counts
whose sum over a cohort may pass 2^31 leave the round the same way
(`counted`: the examples trained on, 10^6 clients x 100 examples x 22 epochs).
"""

from flax import struct
import jax.numpy as jnp
import numpy as np

from fedkd.typing import Array

FLOAT_BYTES = 4
# A traced count of floats (< 2^31) goes as three 11-bit words, so sums of
# the words over up to 2^20 clients stay below 2^31.
_SHIFTS = (22, 11, 0)
_WORD = (1 << 11) - 1
# The most clients a round may sum such words over (`summed`, and the round's
# sum of each client's `floats`) and stay exact.
MAX_CLIENTS = 1 << 20
_UNITS = tuple(FLOAT_BYTES << s for s in _SHIFTS)
_ONES = tuple(1 << s for s in _SHIFTS)


class Bytes(struct.PyTreeNode):
  """sum(counts[i] * units[i]) bytes (or, from `counted`, things of any
  kind); `int()` of it on the host is exact.

  Attributes:
    counts: int32 [k] (or [clients, k] before the round sums over clients).
    units: k static Python ints, the bytes (the things, from `counted`)
      each count stands for.
  """
  counts: Array
  units: tuple[int, ...] = struct.field(pytree_node=False)

  def __int__(self) -> int:
    counts = np.asarray(self.counts).reshape(-1, len(self.units))
    return sum(int(c) * u for row in counts.tolist()
               for c, u in zip(row, self.units))

  def __add__(self, other: 'Bytes') -> 'Bytes':
    return Bytes(jnp.concatenate([jnp.asarray(self.counts, jnp.int32),
                                  jnp.asarray(other.counts, jnp.int32)],
                                 axis=-1), self.units + other.units)

  def times(self, count: Array) -> 'Bytes':
    """These bytes sent `count` (int32, a number of clients) times."""
    return Bytes(self.counts * count, self.units)


def fixed(count, unit: int) -> Bytes:
  """`count` (a number of clients, int32) transfers of `unit` bytes each."""
  return Bytes(jnp.asarray(count, jnp.int32).reshape(1), (int(unit),))


def _words(count: Array) -> Array:
  """int32 `count` (>= 0) as its three 11-bit words, [..., 3]."""
  count = jnp.asarray(count, jnp.int32)
  return jnp.stack([(count >> s) & _WORD for s in _SHIFTS], axis=-1)


def floats(count: Array) -> Bytes:
  """A traced number of float32 values (int32, >= 0) as exact bytes."""
  return Bytes(_words(count), _UNITS)


def counted(value: Array) -> Bytes:
  """A traced per-client count (int32, >= 0) that a round sums exactly over
  up to `MAX_CLIENTS` clients: `int()` of the sum is the total, past 2^31
  too. Not bytes: its units are 1."""
  return Bytes(_words(value), _ONES)


def summed(values: Array) -> Bytes:
  """The floats of every entry of [clients] int32 `values`, summed exactly."""
  return Bytes(jnp.sum(floats(values).counts, axis=0), _UNITS)
