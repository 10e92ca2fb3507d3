"""Splitting a labelled dataset among federated clients.

Each method first assigns every example an owning client; `_group` then turns
that assignment into per-client index arrays, so the parts always cover every
example exactly once.
"""

import numpy as np

from fedkd import errors

METHODS = ('iid', 'dirichlet', 'shards')

# Resampling bound for `dirichlet`; with a tiny alpha and many clients some
# client may keep drawing (almost) nothing.
_MAX_DIRICHLET_TRIES = 1000
# Clients whose label histogram `describe` prints.
_DESCRIBED_CLIENTS = 5


def partition(
    labels: np.ndarray,
    num_clients: int,
    method: str,
    *,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    seed: int = 0,
    min_examples: int = 1,
) -> list[np.ndarray]:
  """Splits example indices among clients.

  Args:
    labels: int [N] class label of each example.
    num_clients: number of clients.
    method: `iid` (uniformly random near-equal parts), `dirichlet` (label skew
      of Hsu, Qi & Brown 2019) or `shards` (label-sorted shards of McMahan et
      al. 2017).
    alpha: Dirichlet concentration for `dirichlet`; smaller is more skewed.
    shards_per_client: shards each client gets for `shards`.
    seed: seed of the numpy generator that drives the split.
    min_examples: fewest examples any client may get for `dirichlet`, which
      resamples until this holds.

  Returns:
    One sorted int64 index array per client; together they hold every index in
    [0, N) exactly once.

  Raises:
    FedkdError: on an unknown method or out-of-range argument, or when
      `dirichlet` cannot give every client `min_examples` examples.
  """
  labels = np.asarray(labels)
  n = len(labels)
  if method not in METHODS:
    raise errors.FedkdError(
        f'unknown partition method {method!r}; use one of {", ".join(METHODS)}'
    )
  if num_clients < 1:
    raise errors.FedkdError(f'num_clients must be >= 1, got {num_clients}')
  if num_clients > n:
    raise errors.FedkdError(
        f'more clients than examples: {num_clients} clients for {n} examples;'
        ' use fewer clients'
    )
  rng = np.random.default_rng(seed)
  if method == 'iid':
    # Consecutive blocks of a random permutation; sizes differ by at most 1.
    owner = np.empty(n, np.int64)
    owner[rng.permutation(n)] = np.arange(n) * num_clients // n
  elif method == 'dirichlet':
    owner = _dirichlet_owner(labels, num_clients, alpha, min_examples, rng)
  else:
    owner = _shards_owner(labels, num_clients, shards_per_client, rng)
  return _group(owner, num_clients)


def _dirichlet_owner(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    min_examples: int,
    rng: np.random.Generator,
) -> np.ndarray:
  """Gives each class's examples to clients in Dirichlet(alpha) proportions."""
  if alpha <= 0:
    raise errors.FedkdError(f'dirichlet alpha must be > 0, got {alpha}')
  by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
  owner = np.empty(len(labels), np.int64)
  for _ in range(_MAX_DIRICHLET_TRIES):
    for members in by_class:
      shares = rng.dirichlet(np.full(num_clients, alpha))
      cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
      counts = np.diff(cuts, prepend=0, append=len(members))
      owner[rng.permutation(members)] = np.repeat(
          np.arange(num_clients), counts
      )
    if np.bincount(owner, minlength=num_clients).min() >= min_examples:
      return owner
  raise errors.FedkdError(
      f'dirichlet partition with alpha={alpha} left some of the {num_clients}'
      f' clients with fewer than {min_examples} examples in'
      f' {_MAX_DIRICHLET_TRIES} tries; use a larger alpha or fewer clients'
  )


def _shards_owner(
    labels: np.ndarray,
    num_clients: int,
    shards_per_client: int,
    rng: np.random.Generator,
) -> np.ndarray:
  """Deals label-sorted shards, `shards_per_client` random ones per client."""
  if shards_per_client < 1:
    raise errors.FedkdError(
        f'shards_per_client must be >= 1, got {shards_per_client}'
    )
  num_shards = num_clients * shards_per_client
  n = len(labels)
  if num_shards > n:
    raise errors.FedkdError(
        f'num_clients * shards_per_client = {num_shards} shards but only {n}'
        ' examples; use fewer clients or shards per client'
    )
  by_label = np.argsort(labels, kind='stable')
  # Shard of each position in `by_label`: near-equal consecutive runs.
  shard = np.arange(n) * num_shards // n
  shard_owner = rng.permutation(num_shards) % num_clients
  owner = np.empty(n, np.int64)
  owner[by_label] = shard_owner[shard]
  return owner


def _group(owner: np.ndarray, num_clients: int) -> list[np.ndarray]:
  """Turns the owning client of each example into sorted per-client indices."""
  # A stable sort keeps each client's indices ascending.
  order = np.argsort(owner, kind='stable').astype(np.int64)
  sizes = np.bincount(owner, minlength=num_clients)
  return np.split(order, np.cumsum(sizes)[:-1])


def label_histograms(
    labels: np.ndarray, parts: list[np.ndarray], num_classes: int
) -> np.ndarray:
  """Returns int64 [num_clients, num_classes] example counts per label."""
  labels = np.asarray(labels)
  return np.stack(
      [np.bincount(labels[p], minlength=num_classes) for p in parts]
  )


def describe(
    labels: np.ndarray, parts: list[np.ndarray], num_classes: int
) -> str:
  """Summarises a partition in a few lines for logs."""
  hists = label_histograms(labels, parts, num_classes)
  sizes = hists.sum(axis=1)
  lines = [
      f'{len(parts)} clients; examples per client min/median/mean/max ='
      f' {sizes.min()}/{np.median(sizes):g}/{sizes.mean():.1f}/{sizes.max()}',
      'classes per client (>= 1 example): mean'
      f' {(hists > 0).sum(axis=1).mean():.2f} of {num_classes}',
      f'label histograms of the first {min(len(parts), _DESCRIBED_CLIENTS)}'
      ' clients:',
  ]
  for i, hist in enumerate(hists[:_DESCRIBED_CLIENTS]):
    lines.append(f'  client {i}: {" ".join(str(c) for c in hist)}')
  return '\n'.join(lines)
