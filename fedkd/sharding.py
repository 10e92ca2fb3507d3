"""The device mesh: one axis, `clients`, over which cohorts are split."""

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedkd.clients import CLIENTS_AXIS
from fedkd.errors import FedkdError


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh over the first `num_devices` devices (0 means all of them)."""
  # Random bits must not depend on how arrays are split across devices.
  jax.config.update('jax_threefry_partitionable', True)
  devices = jax.devices()
  if num_devices > len(devices):
    raise FedkdError(f'num_devices={num_devices} but only {len(devices)} '
                     'devices are visible; lower num_devices (0 = all)')
  return Mesh(devices[:num_devices or len(devices)], (CLIENTS_AXIS,))


def cohort_sharding(mesh: Mesh) -> NamedSharding:
  """Client-stacked arrays: split along their leading axis."""
  return NamedSharding(mesh, P(CLIENTS_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Server state and shared data: a full copy on every device."""
  return NamedSharding(mesh, P())


def padded_cohort_size(clients_per_round: int, mesh: Mesh) -> int:
  """Cohort slots: clients per round rounded up to a multiple of devices."""
  d = mesh.size
  return -(-clients_per_round // d) * d
