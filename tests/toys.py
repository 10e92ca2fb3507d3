"""Small shared fixtures for the tests: toy client data and algorithms."""

import os
import unittest

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedkd import algorithm
from fedkd import algorithms as algorithms_lib
from fedkd import clients

INPUT_SHAPE = (4, 4, 1)
NUM_CLASSES = 3
NUM_PUBLIC = 5
FULL = os.environ.get('FEDKD_FULL_TESTS') == '1'


def toy_data(sizes, seed=0, pad_to=None) -> clients.ClientData:
  """Random client data with the given client sizes.

  `pad_to` raises `max_examples`, so every epoch gets extra padded steps.
  Every toy run also holds `NUM_PUBLIC` public examples.
  """
  rng = np.random.default_rng(seed)
  n = sum(sizes)
  x = rng.normal(size=(n, *INPUT_SHAPE)).astype(np.float32)
  y = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
  public_x = rng.normal(size=(NUM_PUBLIC, *INPUT_SHAPE)).astype(np.float32)
  bounds = np.cumsum([0, *sizes])
  data = clients.stack_clients(
      x, y, [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])])
  return jax.tree.map(jnp.asarray, data.replace(
      max_examples=pad_to or data.max_examples, public_x=public_x))


def one_example_clients(num: int) -> clients.ClientData:
  """`num` clients of one zero example each, for client updates that make
  up their own figures."""
  return jax.tree.map(jnp.asarray, clients.stack_clients(
      np.zeros((num, 1), np.float32), np.zeros(num, np.int32),
      np.arange(num).reshape(num, 1)))


def round_of_one_example_clients(client_update, num: int, params, *,
                                 clients_per_chunk: int):
  """The metrics of one round of `client_update` over `one_example_clients`,
  with a server that keeps `params`."""
  data = one_example_clients(num)
  apply = jax.jit(algorithm.make_round(
      client_update, lambda state, mean, data, rng: (state, {}),
      clients_per_chunk=clients_per_chunk))
  _, metrics = apply(algorithm.server_init(optax.identity(), params), data,
                     cohort(list(range(num))), jax.random.PRNGKey(0))
  return jax.device_get(metrics)


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


def algorithms(num_clients, epochs=2, batch_size=3, client_models=None):
  """Every algorithm on the toy models, keyed by name.

  `client_models`: the clients' model(s) of fd, fedmd and feddf (default:
  `student()`) and local_kd's teacher(s) and fedkd's mentor(s)
  (`teacher()`), e.g. a tuple for client groups.
  """
  model = client_models or student()
  common = dict(client_tx=optax.sgd(0.1), epochs=epochs,
                batch_size=batch_size)
  averaging = dict(common, server_tx=optax.sgd(1.0))
  private = dict(input_shape=INPUT_SHAPE, num_clients=num_clients)
  public = dict(public_batch_size=2)
  return {
      'fedavg': algorithms_lib.fedavg(model=student(), **averaging),
      'fedprox': algorithms_lib.fedprox(model=student(), mu=0.1,
                                        **averaging),
      'fedntd': algorithms_lib.fedntd(model=student(), beta=1.0,
                                      temperature=2.0, **averaging),
      'local_kd': algorithms_lib.local_kd(
          teacher=client_models or teacher(), student=student(), teacher_tx=optax.sgd(0.05),
          temperature=2.0, distill_weight=0.5, **private, **averaging),
      'fedkd': algorithms_lib.fedkd(
          mentor=client_models or teacher(), mentee=student(), mentor_tx=optax.sgd(0.05),
          energy_start=0.8, energy_end=0.9, num_rounds=3,
          **private, **averaging),
      'feddf': algorithms_lib.feddf(
          model=model, distill_tx=optax.sgd(0.5), distill_epochs=2,
          temperature=1.0, **public, **averaging),
      'fd': algorithms_lib.fd(model=model, num_classes=NUM_CLASSES,
                              temperature=2.0, distill_weight=0.5,
                              **private, **common),
      'fedmd': algorithms_lib.fedmd(
          model=model, num_public=NUM_PUBLIC, num_classes=NUM_CLASSES,
          digest_epochs=1, **public, **private, **common),
  }


def init_state(alg, seed=0):
  params = student().init(jax.random.PRNGKey(seed),
                          jnp.zeros((1, *INPUT_SHAPE)))
  return alg.init(params, jax.random.PRNGKey(seed + 1))


# What the tests compile with (conftest.py sets it for the test processes,
# `subprocess_env` for the runs they start): XLA's backend optimisations off,
# which cuts about a third of compile time, most of the suite's time. Every
# comparison is between programs compiled alike; FEDKD_FULL_TESTS=1 keeps
# XLA's defaults.
XLA_TEST_FLAGS = '' if FULL else (
    '--xla_backend_optimization_level=0 '
    '--xla_llvm_disable_expensive_passes=true')


def subprocess_env(devices: int = 1, **extra: str) -> dict[str, str]:
  """The environment of a run a test starts: `devices` CPU devices."""
  flags = XLA_TEST_FLAGS
  if devices > 1:
    flags += f' --xla_force_host_platform_device_count={devices}'
  return dict(os.environ, XLA_FLAGS=flags.strip(), **extra)


def full_or(test: unittest.TestCase, runs_by_default: bool) -> None:
  """Skips `test` unless it `runs_by_default` or FEDKD_FULL_TESTS=1.

  The default run keeps every invariant for a representative case; the full
  run (`FEDKD_FULL_TESTS=1 python -m pytest`) repeats the costlier ones for
  every case, e.g. every algorithm.
  """
  if not (runs_by_default or FULL):
    test.skipTest('a repeat for another case: FEDKD_FULL_TESTS=1 runs it')


def assert_error_line(test: unittest.TestCase, code: int, stderr: str,
                      expected: str) -> None:
  """A script's bad-input ending: exit code 2 and one `error:` line on
  stderr that holds `expected`."""
  test.assertEqual(code, 2, stderr[-2000:])
  lines = [l for l in stderr.splitlines() if l.strip()]
  test.assertLen(lines, 1, stderr)
  test.assertStartsWith(lines[0], 'error: ')
  test.assertIn(expected, lines[0])


def assert_trees_close(a, b, atol=1e-6):
  chex.assert_trees_all_close(a, b, atol=atol, rtol=1e-5)


def xla_conv(x, kernel, padding, strides=(1, 1)):
  """XLA's own convolution of NHWC `x` with an HWIO `kernel` at full
  precision: the reference that fedkd's convolutions are checked against."""
  return jax.lax.conv_general_dilated(
      x, kernel, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=jax.lax.Precision.HIGHEST)
