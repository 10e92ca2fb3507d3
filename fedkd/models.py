"""Teacher and student networks (flax linen), chosen by name from the config.

Every model maps a batch of examples to logits. MLPs flatten any input shape,
so the same MLP runs on digits [8, 8, 1], MNIST [28, 28, 1] or vector data.
"""

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedkd.errors import FedkdError
from fedkd.layers import Conv
from fedkd.layers import Dense


class MLP(nn.Module):
  """ReLU MLP over flattened inputs: hidden widths, then `num_classes` logits."""
  hidden: Sequence[int]
  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(Dense(width)(x))
    return Dense(self.num_classes)(x)


class MnistCNN(nn.Module):
  """McMahan et al. 2017 "CNN": conv5x5x32, pool, conv5x5x64, pool, FC512.

  With 28x28x1 inputs and 10 classes it has 1,663,370 parameters ('SAME'
  padding, 2x2 max pooling), as in the paper.
  """
  num_classes: int

  @nn.compact
  def __call__(self, x):
    for features in (32, 64):
      x = nn.relu(Conv(features, (5, 5))(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(Dense(512)(x))
    return Dense(self.num_classes)(x)


_MODELS: dict[str, Callable[[int], nn.Module]] = {
    # The seed's pair: a private teacher and the shared, smaller student.
    'seed_teacher': lambda k: MLP(hidden=(64, 32), num_classes=k),
    'seed_student': lambda k: MLP(hidden=(32,), num_classes=k),
    # McMahan et al. 2017 "2NN": 199,210 parameters on MNIST.
    'mnist_2nn': lambda k: MLP(hidden=(200, 200), num_classes=k),
    'mnist_cnn': MnistCNN,
}

MODEL_NAMES = tuple(sorted(_MODELS))


def get_model(name: str, num_classes: int) -> nn.Module:
  """Returns the model registered as `name` with `num_classes` logits."""
  if name not in _MODELS:
    raise FedkdError(
        f'unknown model {name!r}; choose one of {", ".join(MODEL_NAMES)}')
  return _MODELS[name](num_classes)


def num_params(params) -> int:
  """Number of scalars in a parameter pytree."""
  return sum(int(jnp.size(p)) for p in jax.tree.leaves(params))
