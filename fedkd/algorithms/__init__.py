"""Federated algorithms, one module each, chosen by name from the config."""

from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn

from fedkd import models
from fedkd import optimizers
from fedkd.algorithm import FederatedAlgorithm
from fedkd.algorithm import ServerState
from fedkd.algorithms.fd import fd
from fedkd.algorithms.fedavg import fedavg
from fedkd.algorithms.feddf import feddf
from fedkd.algorithms.fedkd import fedkd
from fedkd.algorithms.fedmd import fedmd
from fedkd.algorithms.fedntd import fedntd
from fedkd.algorithms.fedprox import fedprox
from fedkd.algorithms.local_kd import local_kd
from fedkd.typing import Params

ALGORITHMS = ('fd', 'fedavg', 'feddf', 'fedkd', 'fedmd', 'fedntd', 'fedprox',
              'local_kd')
# Algorithms that read the public (proxy) data, `config.public_examples`.
PUBLIC_DATA = ('feddf', 'fedmd')


class Built(NamedTuple):
  """A configured algorithm and what evaluation needs to know of it.

  Attributes:
    algorithm: the `FederatedAlgorithm`.
    student: the global (shared) model, evaluated every `eval_every` rounds.
    teacher: the clients' private model, or None.
    teachers: reads the stacked private teacher parameters from a state.
  """
  algorithm: FederatedAlgorithm
  student: nn.Module
  teacher: nn.Module | None = None
  teachers: Callable[[ServerState], Params] | None = None


def build(config, input_shape, num_classes: int) -> Built:
  """The algorithm named by `config.algorithm`, configured from `config`."""
  student = models.get_model(config.student, num_classes)
  common = dict(
      client_tx=optimizers.get_optimizer(config.client_optimizer,
                                         config.client_lr),
      server_tx=optimizers.get_optimizer(config.server_optimizer,
                                         config.server_lr),
      epochs=config.local_epochs, batch_size=config.batch_size)
  if config.algorithm == 'fedavg':
    return Built(fedavg(model=student, **common), student)
  teacher = models.get_model(config.teacher, num_classes)
  alg = local_kd(
      teacher=teacher, student=student, input_shape=input_shape,
      num_clients=config.num_clients,
      teacher_tx=optimizers.get_optimizer(config.client_optimizer,
                                          config.teacher_lr),
      temperature=config.temperature, distill_weight=config.distill_weight,
      **common)
  return Built(alg, student, teacher, lambda state: state.clients[0])
