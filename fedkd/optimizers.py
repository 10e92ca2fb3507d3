"""Client and server optimizers by name (all optax)."""

from collections.abc import Callable

import optax

from fedkd.errors import FedkdError

OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
    'sgd': optax.sgd,
    'momentum': lambda lr: optax.sgd(lr, momentum=0.9),
    'adam': optax.adam,
    'yogi': optax.yogi,
    # Server optimizers of Reddi et al., "Adaptive Federated Optimization",
    # ICLR 2021 (arXiv:2003.00295): beta1 0.9, beta2 0.99, tau (eps) 1e-3.
    # optax's Adam/Yogi add bias correction, which the paper's omit.
    'fedadam': lambda lr: optax.adam(lr, b1=0.9, b2=0.99, eps=1e-3),
    'fedyogi': lambda lr: optax.yogi(lr, b1=0.9, b2=0.99, eps=1e-3),
}
# Reddi et al.'s optimizers apply to the server's mean client delta only.
SERVER_ONLY = ('fedadam', 'fedyogi')
CLIENT_OPTIMIZERS = tuple(n for n in OPTIMIZERS if n not in SERVER_ONLY)


def get_optimizer(name: str, learning_rate: float
                 ) -> optax.GradientTransformation:
  if name not in OPTIMIZERS:
    raise FedkdError(f'unknown optimizer {name!r}; choose one of '
                     f'{", ".join(sorted(OPTIMIZERS))}')
  return OPTIMIZERS[name](learning_rate)
