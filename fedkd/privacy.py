"""Client-level differential privacy for the shared updates: DP-FedAvg.

DP-FedAvg (McMahan, Ramage, Talwar & Zhang, "Learning Differentially Private
Recurrent Language Models", ICLR 2018, arXiv:1710.06963) protects whole
clients, not single examples:

1. each client clips its whole update pytree to global L2 norm <= `clip_norm`
   (`clip_by_global_norm`, written for one client and vmapped);
2. the server sums the clipped updates of the real clients, adds Gaussian
   noise N(0, (noise_multiplier * clip_norm)^2 I) to the sum, and divides by a
   FIXED `expected_clients` (`noised_mean`; `fedkd.algorithm.make_round`
   does the clipping and the sum);
3. the privacy spent is that of the Sampled Gaussian mechanism composed once
   per round (`epsilon`).

The neighbouring relation is add-or-remove one client, matching Poisson
sampling of the cohort.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedkd.errors import FedkdError
from fedkd.typing import PRNGKey, PyTree

ACCOUNTANTS = ('pld', 'rdp')


class DpSettings(NamedTuple):
  """DP-FedAvg's knobs for one run (see the module docstring).

  Attributes:
    clip_norm: S, the bound on each client's update norm.
    noise_multiplier: z; the noise on the summed updates has std z * S.
    expected_clients: the fixed denominator (the cohort size).
  """
  clip_norm: float
  noise_multiplier: float
  expected_clients: float


def global_norm(tree: PyTree) -> jax.Array:
  """L2 norm of all leaves together, accumulated in float32."""
  squares = [jnp.sum(jnp.square(x.astype(jnp.float32)))
             for x in jax.tree.leaves(tree)]
  return jnp.sqrt(sum(squares, jnp.zeros((), jnp.float32)))


def clip_by_global_norm(update: PyTree,
                        clip_norm: float) -> tuple[PyTree, jax.Array]:
  """One client's update scaled to global L2 norm <= clip_norm.

  The whole pytree is scaled by one factor, min(1, clip_norm / norm), so the
  direction is kept and an update already within the norm is unchanged. No
  Python branching on values: safe under `jax.jit` and `jax.vmap`.

  Args:
    update: one client's model delta (no client axis).
    clip_norm: the bound S on the global L2 norm; 0 zeroes the update.

  Returns:
    (clipped update, its global norm before clipping, a float32 scalar).
  """
  norm = global_norm(update)
  # The floor keeps an all-zero update (norm 0) finite: its scale is then 1.
  floor = jnp.finfo(jnp.float32).tiny
  scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, floor))
  clipped = jax.tree.map(lambda x: (x * scale).astype(x.dtype), update)
  return clipped, norm


def noised_mean(clipped_sum: PyTree, rng: PRNGKey, *, clip_norm: float,
                noise_multiplier: float, expected_clients: float) -> PyTree:
  """DP-FedAvg's fixed-denominator estimator of the mean clipped update.

  Returns (clipped_sum + N(0, (noise_multiplier * clip_norm)^2 I)) /
  expected_clients.

  `clipped_sum` must give every real client weight 1, not a weight by example
  count: with updates clipped to norm clip_norm, adding or removing one client
  then moves the sum by at most clip_norm in L2, which is the sensitivity the
  noise is calibrated to. The denominator is fixed (e.g. the expected cohort
  size) rather than the actual number of real clients, because that number
  depends on who took part and dividing by it would change the sensitivity.
  Noise is drawn once for the sum, independently per leaf, not per client.

  Args:
    clipped_sum: the sum over the round's real clients of their updates, each
      clipped to norm <= clip_norm (`clip_by_global_norm`).
    rng: key for the noise.
    clip_norm: the clipping bound S used by the clients.
    noise_multiplier: z; the noise on the sum has std z * S.
    expected_clients: the fixed denominator, > 0.

  Returns:
    A pytree shaped like one client's update.
  """
  leaves, treedef = jax.tree.flatten(clipped_sum)
  keys = jax.random.split(rng, max(len(leaves), 1))
  std = noise_multiplier * clip_norm
  noised = [
      (s + std * jax.random.normal(k, s.shape, jnp.float32)).astype(s.dtype)
      for s, k in zip(leaves, keys)
  ]
  return jax.tree.map(lambda x: x / jnp.asarray(expected_clients, x.dtype),
                      jax.tree.unflatten(treedef, noised))


def noise_stddev(*, clip_norm: float, noise_multiplier: float,
                 expected_clients: float) -> float:
  """Std of the noise on each coordinate of `noised_mean`'s output."""
  return noise_multiplier * clip_norm / expected_clients


def _check_nonnegative(name: str, value: float) -> None:
  if not value >= 0:  # Also rejects NaN.
    raise FedkdError(f'{name} must be >= 0, got {value}')


def _check_delta(delta: float) -> None:
  if not 0 < delta < 1:
    raise FedkdError(f'delta must be in (0, 1), e.g. 1e-5, got {delta}')


def _check_accountant(accountant: str) -> None:
  if accountant not in ACCOUNTANTS:
    raise FedkdError(f'unknown accountant {accountant!r}; choose one of '
                     f'{", ".join(ACCOUNTANTS)}')


def validate(*, clip_norm: float, noise_multiplier: float, delta: float,
             accountant: str) -> None:
  """Checks DP settings before any work; raises FedkdError on the first bad one.

  clip_norm 0 and noise_multiplier 0 together mean DP is off; noise without
  clipping is rejected because the noise only buys privacy relative to a
  bounded contribution per client.

  Args:
    clip_norm: S, >= 0.
    noise_multiplier: z, >= 0; > 0 needs clip_norm > 0.
    delta: target delta, in (0, 1).
    accountant: one of `ACCOUNTANTS`.
  """
  _check_nonnegative('clip_norm', clip_norm)
  _check_nonnegative('noise_multiplier', noise_multiplier)
  if noise_multiplier > 0 and clip_norm <= 0:
    raise FedkdError(f'noise_multiplier {noise_multiplier} needs clip_norm > 0 '
                     '(noise without clipping gives no privacy); set clip_norm')
  _check_delta(delta)
  _check_accountant(accountant)


def dp_event(*, noise_multiplier: float, sampling_probability: float,
             rounds: int):
  """`rounds` rounds of the Poisson-sampled Gaussian mechanism."""
  # Imported here: dp_accounting pulls in scipy, which every run would pay.
  import dp_accounting  # pylint: disable=g-import-not-at-top
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          sampling_probability,
          dp_accounting.GaussianDpEvent(noise_multiplier)),
      rounds)


def epsilon(*, noise_multiplier: float, sampling_probability: float,
            rounds: int, delta: float, accountant: str = 'rdp') -> float:
  """The (epsilon, delta)-DP spent after `rounds` rounds of DP-FedAvg.

  Sampling: the accounting assumes Poisson sampling, each client joining a
  round independently with probability q = clients_per_round / num_clients.
  fedkd samples fixed-size cohorts instead; treating those as Poisson with the
  same q is the standard accounting approximation (as in the DP-FedAvg paper),
  not an exact bound for fixed-size sampling.

  The event is PoissonSampledDpEvent(q, GaussianDpEvent(noise_multiplier))
  self-composed `rounds` times, under add-or-remove-one-client neighbouring.

  Args:
    noise_multiplier: z, >= 0; 0 with rounds > 0 gives inf.
    sampling_probability: q, in [0, 1].
    rounds: rounds run so far, >= 0; 0 gives 0.0.
    delta: target delta, in (0, 1).
    accountant: 'rdp' (dp_accounting.rdp.RdpAccountant, a slightly loose
      upper bound, fast) or 'pld' (dp_accounting.pld.PLDAccountant, tighter,
      slower).

  Returns:
    epsilon, a Python float.
  """
  _check_nonnegative('noise_multiplier', noise_multiplier)
  _check_delta(delta)
  _check_accountant(accountant)
  if not 0 <= sampling_probability <= 1:
    raise FedkdError('sampling_probability must be in [0, 1] (clients per '
                     f'round / num_clients), got {sampling_probability}')
  if int(rounds) != rounds or rounds < 0:
    raise FedkdError(f'rounds must be an integer >= 0, got {rounds}')
  if rounds == 0:
    return 0.0
  import dp_accounting  # pylint: disable=g-import-not-at-top
  if accountant == 'rdp':
    acc = dp_accounting.rdp.RdpAccountant()
  else:
    acc = dp_accounting.pld.PLDAccountant()
  acc.compose(dp_event(noise_multiplier=noise_multiplier,
                       sampling_probability=sampling_probability,
                       rounds=int(rounds)))
  return float(acc.get_epsilon(delta))
