"""Small shared fixtures for the tests: toy client data and algorithms."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedkd import clients
from fedkd.algorithms import fedavg
from fedkd.algorithms import local_kd

INPUT_SHAPE = (4, 4, 1)
NUM_CLASSES = 3


def toy_data(sizes, seed=0, pad_to=None) -> clients.ClientData:
  """Random client data with the given client sizes.

  `pad_to` raises `max_examples`, so every epoch gets extra padded steps.
  """
  rng = np.random.default_rng(seed)
  n = sum(sizes)
  x = rng.normal(size=(n, *INPUT_SHAPE)).astype(np.float32)
  y = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
  bounds = np.cumsum([0, *sizes])
  data = clients.stack_clients(
      x, y, [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])])
  return jax.tree.map(jnp.asarray, data.replace(
      max_examples=pad_to or data.max_examples))


def cohort(ids, size=None, num_clients=None) -> clients.Cohort:
  """A cohort of `ids`, padded to `size` slots with id `num_clients`."""
  size = size or len(ids)
  padded = np.full(size, num_clients if num_clients is not None else 0,
                   np.int32)
  padded[:len(ids)] = ids
  mask = np.arange(size) < len(ids)
  return clients.Cohort(client_ids=jnp.asarray(padded),
                        client_mask=jnp.asarray(mask))


def student():
  return nn.Sequential([lambda x: x.reshape((x.shape[0], -1)),
                        nn.Dense(8), nn.relu, nn.Dense(NUM_CLASSES)])


def teacher():
  return nn.Sequential([lambda x: x.reshape((x.shape[0], -1)),
                        nn.Dense(16), nn.relu, nn.Dense(NUM_CLASSES)])


def algorithms(num_clients, epochs=2, batch_size=3):
  """Both algorithms on the toy models, keyed by name."""
  common = dict(client_tx=optax.sgd(0.1), server_tx=optax.sgd(1.0),
                epochs=epochs, batch_size=batch_size)
  return {
      'fedavg': fedavg(model=student(), **common),
      'local_kd': local_kd(
          teacher=teacher(), student=student(), input_shape=INPUT_SHAPE,
          num_clients=num_clients, teacher_tx=optax.sgd(0.05),
          temperature=2.0, distill_weight=0.5, **common),
  }


def init_state(alg, seed=0):
  params = student().init(jax.random.PRNGKey(seed),
                          jnp.zeros((1, *INPUT_SHAPE)))
  return alg.init(params, jax.random.PRNGKey(seed + 1))


def assert_trees_close(a, b, atol=1e-6):
  chex.assert_trees_all_close(a, b, atol=atol, rtol=1e-5)
