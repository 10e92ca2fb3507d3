"""Client-level differential privacy for the shared updates: DP-FedAvg.

DP-FedAvg (McMahan, Ramage, Talwar & Zhang, "Learning Differentially Private
Recurrent Language Models", ICLR 2018, arXiv:1710.06963) protects whole
clients, not single examples:

1. each client clips its whole update pytree to global L2 norm <= `clip_norm`
   (`clip_by_global_norm`, written for one client and vmapped);
2. the server sums the clipped updates of the real clients, adds Gaussian
   noise N(0, (noise_multiplier * clip_norm)^2 I) to the sum, and divides by a
   FIXED `expected_clients` (`noised_mean`). `private` makes both the last
   stages of an algorithm's aggregator chain (`fedkd.aggregation`);
3. the privacy spent is that of the Sampled Gaussian mechanism composed once
   per round (`epsilon`).

The neighbouring relation is add-or-remove one client, matching Poisson
sampling of the cohort.
"""

from collections.abc import Callable
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedkd import aggregation
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


def private(aggregator: aggregation.Aggregator,
            dp: DpSettings) -> aggregation.Aggregator:
  """`aggregator`'s encoding stages, then DP-FedAvg's: each upload clipped
  (`clipped_clients` counts those above the bound) and weighing 1, the sum
  noised and divided by `expected_clients`.

  With client groups, every upload must be one `aggregation.Pooled` part
  (local_kd's and fedkd's shared student): the groups' sums add up to one
  sum over all clients, each client in it once and clipped, so one noise
  draw of the same scale covers them all and every group receives the same
  mean. Other grouped uploads are refused.
  """

  def clip(upload, weight, sent, round_index):
    del round_index  # The same every round.
    upload, norm = clip_by_global_norm(upload, dp.clip_norm)
    return upload, jnp.ones_like(weight), sent, {
        'clipped_clients': (norm > dp.clip_norm).astype(jnp.int32)}

  def reduce(totals, weights, rng):
    del weights  # The denominator is fixed.
    if len(totals) > 1 and not all(
        isinstance(t, aggregation.Pooled) for t in totals):
      raise ValueError('client-level DP with client groups takes uploads '
                       'that are one aggregation.Pooled part (a model every '
                       'group shares)')
    total = jax.tree.map(lambda *xs: sum(xs), *totals)
    mean = noised_mean(total, rng, clip_norm=dp.clip_norm,
                       noise_multiplier=dp.noise_multiplier,
                       expected_clients=dp.expected_clients)
    return (mean,) * len(totals)

  return aggregation.chain(aggregator._replace(reduce=None),
                           aggregation.Aggregator(clip, reduce))


def noise_stddev(*, clip_norm: float, noise_multiplier: float,
                 expected_clients: float) -> float:
  """Std of the noise on each coordinate of `noised_mean`'s output."""
  return noise_multiplier * clip_norm / expected_clients


def _check_nonnegative(name: str, value: float) -> None:
  # Infinite settings would only surface later, as a diverged model.
  if not 0 <= value < math.inf:  # Also rejects NaN.
    raise FedkdError(f'{name} must be a finite number >= 0, got {value}')


def _check_delta(delta: float, name: str = 'delta') -> None:
  if not 0 < delta < 1:
    raise FedkdError(f'{name} must be in (0, 1), e.g. 1e-5, got {delta}')


def _check_accountant(accountant: str, name: str = 'accountant') -> None:
  if accountant not in ACCOUNTANTS:
    raise FedkdError(f'unknown {name} {accountant!r}; choose one of '
                     f'{", ".join(ACCOUNTANTS)}')


def validate(*, clip_norm: float, noise_multiplier: float, delta: float,
             accountant: str) -> None:
  """Checks DP settings before any work; raises FedkdError on the first bad one,
  naming the settings as `train.Settings` does (`dp_clip_norm`, ...).

  clip_norm 0 and noise_multiplier 0 together mean DP is off; noise without
  clipping is rejected because the noise only buys privacy relative to a
  bounded contribution per client.

  Args:
    clip_norm: S, >= 0.
    noise_multiplier: z, >= 0; > 0 needs clip_norm > 0.
    delta: target delta, in (0, 1).
    accountant: one of `ACCOUNTANTS`.
  """
  _check_nonnegative('dp_clip_norm', clip_norm)
  _check_nonnegative('dp_noise_multiplier', noise_multiplier)
  if noise_multiplier > 0 and clip_norm <= 0:
    raise FedkdError(
        f'dp_noise_multiplier={noise_multiplier} needs dp_clip_norm > 0 '
        '(noise without clipping gives no privacy); set dp_clip_norm')
  _check_delta(delta, 'dp_delta')
  _check_accountant(accountant, 'dp_accountant')


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


# dp_accounting.pld.PLDAccountant's default grid of privacy loss values.
_PLD_DISCRETIZATION = 1e-4
# PLD rounds composed per step (seconds at most): a stop request is seen
# between steps. RDP composes any count at once, in milliseconds.
_PLD_ROUNDS_PER_STEP = 32


class Accountant:
  """The (epsilon, delta)-DP spent by DP-FedAvg, round after round.

  Sampling: the accounting assumes Poisson sampling, each client joining a
  round independently with probability q = clients_per_round / num_clients
  (with client groups, sampled stratified, the largest group's quota over
  its size: `clients.inclusion_probability`, which `fedkd.train` passes).
  fedkd samples fixed-size cohorts instead; treating those as Poisson with the
  same q is the standard accounting approximation (as in the DP-FedAvg paper),
  not an exact bound for fixed-size sampling.

  The event is PoissonSampledDpEvent(q, GaussianDpEvent(noise_multiplier))
  composed once per round, under add-or-remove-one-client neighbouring.

  Composition is incremental: each `epsilon` call composes only the rounds
  added since the previous call. For `pld` the one-round privacy loss
  distribution is built once, in the constructor (about 10 s at noise 0.3),
  and reused: rebuilding it for every evaluated round, as a fresh
  `dp_accounting.pld.PLDAccountant` would, took minutes over a run.
  """

  def __init__(self, *, noise_multiplier: float, sampling_probability: float,
               delta: float, accountant: str = 'rdp'):
    """Checks the settings; for `pld`, builds the one-round distribution.

    Args:
      noise_multiplier: z, >= 0; 0 gives inf after any round.
      sampling_probability: q, in [0, 1].
      delta: target delta, in (0, 1).
      accountant: 'rdp' (dp_accounting.rdp.RdpAccountant, a slightly loose
        upper bound, fast) or 'pld' (privacy loss distributions as in
        dp_accounting.pld.PLDAccountant, tighter, slower).
    """
    _check_nonnegative('noise_multiplier', noise_multiplier)
    _check_delta(delta)
    _check_accountant(accountant)
    if not 0 <= sampling_probability <= 1:
      raise FedkdError('sampling_probability must be in [0, 1] (clients per '
                       f'round / num_clients), got {sampling_probability}')
    self._z, self._q, self._delta = noise_multiplier, sampling_probability, delta
    self._kind = accountant
    self._rounds = 0
    self._state = self._fresh()
    # pld: count -> `count` rounds of the mechanism, composed in by `epsilon`.
    self._powers = {}
    if accountant == 'pld' and self._q > 0 and self._z > 0:
      # pylint: disable-next=g-import-not-at-top
      from dp_accounting.pld import privacy_loss_distribution as pld_lib
      self._powers[1] = pld_lib.from_gaussian_mechanism(
          standard_deviation=self._z, sampling_prob=self._q,
          value_discretization_interval=_PLD_DISCRETIZATION)

  def _fresh(self):
    """What has composed no rounds yet."""
    import dp_accounting  # pylint: disable=g-import-not-at-top
    if self._kind == 'rdp':
      return dp_accounting.rdp.RdpAccountant()
    return dp_accounting.pld.privacy_loss_distribution.identity(
        value_discretization_interval=_PLD_DISCRETIZATION)

  def _compose(self, count: int) -> None:
    """Adds `count` rounds to the composed state."""
    if self._kind == 'rdp':
      self._state.compose(dp_event(
          noise_multiplier=self._z, sampling_probability=self._q,
          rounds=count))
    elif self._powers:
      if count not in self._powers:
        self._powers[count] = self._powers[1].self_compose(count)
      self._state = self._state.compose(self._powers[count])
    self._rounds += count

  def epsilon(self, rounds: int,
              should_stop: Callable[[], bool] = lambda: False) -> float | None:
    """Epsilon after `rounds` rounds, composing only the rounds added.

    Args:
      rounds: rounds run so far, an integer >= 0; 0 gives 0.0. Fewer than at
        the previous call starts the composition over.
      should_stop: asked between composition steps (each at most 32 rounds);
        once it returns True, this gives up and returns None. The rounds
        composed so far are kept for the next call.

    Returns:
      epsilon, a Python float (inf without noise), or None if stopped.
    """
    if int(rounds) != rounds or rounds < 0:
      raise FedkdError(f'rounds must be an integer >= 0, got {rounds}')
    if rounds < self._rounds:
      self._state, self._rounds = self._fresh(), 0
    step = _PLD_ROUNDS_PER_STEP if self._kind == 'pld' else math.inf
    while self._rounds < rounds:
      self._compose(int(min(rounds - self._rounds, step)))
      # Not before the first step: a stop requested during the round would
      # then cancel even a quick accounting, and leave its row's epsilon
      # null where an uninterrupted (or resumed) run has one.
      if self._rounds < rounds and should_stop():
        return None
    if not rounds or not self._q:
      return 0.0
    if not self._z:
      return math.inf
    if self._kind == 'rdp':
      return float(self._state.get_epsilon(self._delta))
    return float(self._state.get_epsilon_for_delta(self._delta))


def epsilon(*, noise_multiplier: float, sampling_probability: float,
            rounds: int, delta: float, accountant: str = 'rdp') -> float:
  """The (epsilon, delta)-DP spent after `rounds` rounds of DP-FedAvg.

  A one-off `Accountant(...).epsilon(rounds)`; see `Accountant`.

  Returns:
    epsilon, a Python float.
  """
  return Accountant(noise_multiplier=noise_multiplier,
                    sampling_probability=sampling_probability, delta=delta,
                    accountant=accountant).epsilon(rounds)
