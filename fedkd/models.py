"""Teacher and student networks (flax linen), chosen by name from the config.

Every model maps a batch of examples to logits. MLPs flatten any input shape,
so the same MLP runs on digits [8, 8, 1], MNIST [28, 28, 1] or vector data;
the CNN and ResNets need images [batch, height, width, channels].
"""

from collections.abc import Callable, Sequence
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedkd.errors import FedkdError
from fedkd.layers import Conv
from fedkd.layers import Dense
from fedkd.layers import max_pool


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
      x = max_pool(x, 2)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(Dense(512)(x))
    return Dense(self.num_classes)(x)


def _conv3x3(features: int, strides: int, x: jax.Array) -> jax.Array:
  """PyTorch's `Conv2d(kernel_size=3, padding=1, bias=False)`.

  'SAME' pads a stride-2 conv of an even input only after (0, 1), shifting
  the sampling grid by a pixel against PyTorch's (1, 1): pad explicitly.
  """
  if strides == 1:
    return Conv(features, (3, 3), use_bias=False)(x)
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return Conv(features, (3, 3), (strides, strides), 'VALID',
              use_bias=False)(x)


def _group_norm(num_groups: int) -> nn.Module:
  return nn.GroupNorm(num_groups, epsilon=1e-5)  # PyTorch's epsilon


class _BasicBlock(nn.Module):
  """He et al.'s basic block: conv3x3-norm-relu, conv3x3-norm, add, relu.

  Where the shape changes, the shortcut is a 1x1 conv (no bias) and a norm,
  as in FedDF's code ("option B" of He et al.).
  """
  features: int
  strides: int
  num_groups: int

  @nn.compact
  def __call__(self, x):
    y = _conv3x3(self.features, self.strides, x)
    y = nn.relu(_group_norm(self.num_groups)(y))
    y = _group_norm(self.num_groups)(_conv3x3(self.features, 1, y))
    if self.strides != 1 or x.shape[-1] != self.features:
      stride = (self.strides, self.strides)
      x = Conv(self.features, (1, 1), stride, use_bias=False)(x)
      x = _group_norm(self.num_groups)(x)
    return nn.relu(x + y)


class CifarResNet(nn.Module):
  """FedDF's CIFAR ResNet (`ResNet_cifar`, basic blocks) with GroupNorm.

  He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Sec.
  4.2: a 3x3 conv to 16 channels, 3 stages of n = (depth - 2) / 6 basic
  blocks with 16, 32 and 64 channels (stride 2 entering stages 2 and 3),
  global average pooling and a dense layer. As in FedDF's official code (Lin
  et al., NeurIPS 2020, arXiv:2006.07242; github.com/epfml/
  federated-learning-public-code, codes/FedDF-code/pcode/models/resnet.py):
  convs without bias, a norm after every conv, and 1x1-conv + norm shortcuts
  where the shape changes, where He et al. pad with zeros instead (their
  ResNet-20 has 269,722 parameters, "0.27M" in their Table 6). With 10
  classes, depth 8 has 78,042 parameters and depth 20 272,474.

  Differences from FedDF's code:
  * GroupNorm with `num_groups` groups instead of its default BatchNorm,
    which its Table 2 runs used. 2 groups, as in the ResNet-20 GN released
    with Hsieh et al., "The Non-IID Data Quagmire of Decentralized Machine
    Learning", ICML 2020 (github.com/kevinhsieh/non_iid_dml) and in the
    example of FedDF's resnet.py; epsilon 1e-5 as in PyTorch. GroupNorm
    learns BatchNorm's parameters (a scale and a bias per channel) and keeps
    no running statistics, so clients upload and the server averages
    parameters only.
  * Kernels start from `fedkd.layers`' LeCun normal (variance 1 / fan_in),
    not He normal over fan_out (variance 2 / (9 out)); the dense layer from
    LeCun normal with zero bias, not PyTorch's uniform(+-1 / sqrt(fan_in)).
  * Global average pooling instead of `AvgPool2d(8)`: the same on 32x32
    inputs, and defined on others (28x28 inputs end in 7x7 maps).
  * Depths 8 to 38 only: from 44 on, FedDF's code uses bottleneck blocks.
  """
  depth: int
  num_classes: int
  num_groups: int = 2

  @nn.compact
  def __call__(self, x):
    if (self.depth - 2) % 6 or not 8 <= self.depth < 44:
      raise FedkdError(f'CifarResNet depth must be 6n + 2 in [8, 38] (basic '
                       f'blocks), got {self.depth}')
    if x.ndim != 4:
      raise FedkdError(
          'ResNets need images [batch, height, width, channels], got inputs '
          f'of shape {x.shape}; use an MLP (e.g. mnist_2nn) for vector data')
    x = Conv(16, (3, 3), use_bias=False)(x)
    x = nn.relu(_group_norm(self.num_groups)(x))
    for stage, features in enumerate((16, 32, 64)):
      for block in range((self.depth - 2) // 6):
        strides = 2 if stage and not block else 1
        x = _BasicBlock(features, strides, self.num_groups)(x)
    return Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


_MODELS: dict[str, Callable[[int], nn.Module]] = {
    # The seed's pair: a private teacher and the shared, smaller student.
    'seed_teacher': lambda k: MLP(hidden=(64, 32), num_classes=k),
    'seed_student': lambda k: MLP(hidden=(32,), num_classes=k),
    # McMahan et al. 2017 "2NN": 199,210 parameters on MNIST.
    'mnist_2nn': lambda k: MLP(hidden=(200, 200), num_classes=k),
    # Multinomial logistic regression (one Dense layer on the flattened
    # input): FedProx's model for its Synthetic(alpha, beta) data.
    'logreg': lambda k: MLP(hidden=(), num_classes=k),
    'mnist_cnn': MnistCNN,
    'resnet8_gn': lambda k: CifarResNet(depth=8, num_classes=k),
    'resnet20_gn': lambda k: CifarResNet(depth=20, num_classes=k),
}

MODEL_NAMES = tuple(sorted(_MODELS))

# The papers' ResNets use BatchNorm, whose running statistics would be mutable
# per-client state that the round does not carry. Offering them with batch
# statistics at test time would be silently wrong, so they are refused.
_BATCHNORM = {'resnet8': 'resnet8_gn', 'resnet20': 'resnet20_gn'}


def check_name(name: str, field: str = 'model') -> None:
  """Raises `FedkdError` unless `name` is a registered model.

  Args:
    name: the model name.
    field: the config field that holds it, for the message.
  """
  if name in _BATCHNORM:
    raise FedkdError(
        f'{field} {name!r} would need BatchNorm, which fedkd does not support '
        '(its running statistics are per-client state); use '
        f'{_BATCHNORM[name]!r}, the same network with GroupNorm')
  if name not in _MODELS:
    raise FedkdError(
        f'unknown {field} {name!r}; choose one of {", ".join(MODEL_NAMES)}')


def get_model(name: str, num_classes: int) -> nn.Module:
  """Returns the model registered as `name` with `num_classes` logits."""
  check_name(name)
  return _MODELS[name](num_classes)


def num_params(params) -> int:
  """Number of scalars in a parameter pytree (or its `jax.eval_shape`)."""
  return sum(math.prod(p.shape) for p in jax.tree.leaves(params))
