"""Client and server optimizers by name (all optax)."""

from collections.abc import Callable

import optax

from fedkd.errors import FedkdError

OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
    'sgd': optax.sgd,
    'momentum': lambda lr: optax.sgd(lr, momentum=0.9),
    'adam': optax.adam,
    'yogi': optax.yogi,
}


def get_optimizer(name: str, learning_rate: float
                 ) -> optax.GradientTransformation:
  if name not in OPTIMIZERS:
    raise FedkdError(f'unknown optimizer {name!r}; choose one of '
                     f'{", ".join(sorted(OPTIMIZERS))}')
  return OPTIMIZERS[name](learning_rate)
