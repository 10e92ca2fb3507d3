"""Baseline (c): federated rounds as typical PyTorch FL code runs them.

The same rounds as `fedkd.algorithms.fedavg` and `fedkd.algorithms.local_kd`
(SGD clients, FedAvg server), written the way PyTorch FL code usually is: a
Python loop over the cohort, one client at a time, each with its own
`nn.Module` teacher and `torch.optim.SGD` optimizer. It is meant to be a fair,
reasonably efficient implementation, not a straw man: data lives in
preallocated per-client tensors, one student module is reused across clients,
and server-side work runs under `torch.no_grad`.

Per minibatch, as in the JAX engine:

* FedAvg: one SGD step (`client_lr`) of the student on mean cross-entropy.
* Local KD (with `Distillation`): the teacher takes a forward pass, mean
  cross-entropy, backward and an SGD step (`teacher_lr`); its logits from that
  forward pass (before the step), detached, are the distillation targets. The
  student takes one SGD step (`client_lr`) on `(1 - w) * CE + w * T^2 *
  KL(softmax(teacher / T) || softmax(student / T))`, averaged over the batch.

Teachers and their optimizers persist across rounds; the student starts every
round from the global model with a fresh optimizer, and the server replaces
the global student with the example-count-weighted mean of the cohort's.

The models are twins of `fedkd.models` (same layers and parameter counts),
channels-first: image inputs are [n, channels, height, width].

Requires the optional `bench` extra (`torch`).
"""

from collections.abc import Callable, Sequence
import math
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


def mlp(example_shape: Sequence[int], hidden: Sequence[int],
        num_classes: int) -> nn.Module:
  """ReLU MLP over flattened inputs, the twin of `fedkd.models.MLP`."""
  layers = [nn.Flatten()]
  width = math.prod(example_shape)
  for out in hidden:
    layers += [nn.Linear(width, out), nn.ReLU()]
    width = out
  return nn.Sequential(*layers, nn.Linear(width, num_classes))


def mnist_cnn(example_shape: Sequence[int], num_classes: int) -> nn.Module:
  """McMahan et al. 2017 "CNN", the twin of `fedkd.models.MnistCNN`."""
  channels, height, width = example_shape
  return nn.Sequential(
      nn.Conv2d(channels, 32, 5, padding='same'), nn.ReLU(), nn.MaxPool2d(2),
      nn.Conv2d(32, 64, 5, padding='same'), nn.ReLU(), nn.MaxPool2d(2),
      nn.Flatten(),
      nn.Linear(64 * (height // 4) * (width // 4), 512), nn.ReLU(),
      nn.Linear(512, num_classes))


class _BasicBlock(nn.Module):
  """The twin of `fedkd.models._BasicBlock`: conv3x3-norm-relu,
  conv3x3-norm, add the (1x1 conv + norm where the shape changes) shortcut,
  relu."""

  def __init__(self, in_channels: int, features: int, stride: int,
               num_groups: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, features, 3, stride, padding=1,
                           bias=False)
    self.norm1 = nn.GroupNorm(num_groups, features)
    self.conv2 = nn.Conv2d(features, features, 3, padding=1, bias=False)
    self.norm2 = nn.GroupNorm(num_groups, features)
    self.shortcut = nn.Identity()
    if stride != 1 or in_channels != features:
      self.shortcut = nn.Sequential(
          nn.Conv2d(in_channels, features, 1, stride, bias=False),
          nn.GroupNorm(num_groups, features))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.norm1(self.conv1(x)))
    y = self.norm2(self.conv2(y))
    return F.relu(self.shortcut(x) + y)


def cifar_resnet(depth: int, example_shape: Sequence[int], num_classes: int,
                 num_groups: int = 2) -> nn.Module:
  """The twin of `fedkd.models.CifarResNet` (FedDF's ResNet, GroupNorm).

  Parameters are registered in the order fedkd creates them.
  """
  blocks = []
  channels = 16
  for stage, features in enumerate((16, 32, 64)):
    for block in range((depth - 2) // 6):
      blocks.append(_BasicBlock(channels, features,
                                2 if stage and not block else 1, num_groups))
      channels = features
  return nn.Sequential(
      nn.Conv2d(example_shape[0], 16, 3, padding=1, bias=False),
      nn.GroupNorm(num_groups, 16), nn.ReLU(), *blocks,
      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


_MODELS: dict[str, Callable[[Sequence[int], int], nn.Module]] = {
    'seed_teacher': lambda shape, k: mlp(shape, (64, 32), k),
    'seed_student': lambda shape, k: mlp(shape, (32,), k),
    'mnist_2nn': lambda shape, k: mlp(shape, (200, 200), k),
    'mnist_cnn': mnist_cnn,
    'resnet8_gn': lambda shape, k: cifar_resnet(8, shape, k),
}


def get_model(name: str, example_shape: Sequence[int],
              num_classes: int) -> nn.Module:
  """The torch twin of `fedkd.models.get_model(name, num_classes)`.

  Args:
    name: a `fedkd.models` name that has a twin here.
    example_shape: one example's shape, channels first.
    num_classes: number of logits.
  """
  if name not in _MODELS:
    raise ValueError(f'no torch twin of model {name!r}; twins exist for '
                     f'{", ".join(sorted(_MODELS))}')
  return _MODELS[name](tuple(example_shape), num_classes)


class Distillation(NamedTuple):
  """Local KD settings: each client trains a private teacher beside the
  student and distills it into the student.

  Attributes:
    teacher: builds one client's teacher.
    teacher_lr: the teachers' SGD learning rate.
    temperature: distillation temperature T.
    distill_weight: w, the weight of the distillation term.
  """
  teacher: Callable[[], nn.Module]
  teacher_lr: float
  temperature: float
  distill_weight: float


class TorchFederated:
  """FedAvg or local-KD rounds, one client after another."""

  def __init__(self, client_x: Sequence[np.ndarray],
               client_y: Sequence[np.ndarray],
               student: Callable[[], nn.Module], *, client_lr: float,
               epochs: int, batch_size: int,
               distillation: Distillation | None = None, seed: int = 0,
               num_threads: int | None = None):
    """Builds the global student and, with `distillation`, every teacher.

    Args:
      client_x: per client, [n_k, ...] float32 features in the models' layout.
        Every client must have the same example shape.
      client_y: per client, [n_k] integer labels.
      student: builds the shared model (called for the global and the local
        copy).
      client_lr: the student's local SGD learning rate.
      epochs: local passes over each client's data per round.
      batch_size: local minibatch size; the last minibatch may be partial.
      distillation: local KD settings; None trains the student alone
        (FedAvg).
      seed: seeds model initialisation (without touching torch's global RNG)
        and the generator that shuffles every client's examples.
      num_threads: if given, calls `torch.set_num_threads(num_threads)`. That
        setting is process-wide, so it outlives this object; None leaves
        torch's default (usually the number of physical cores).
    """
    if len(client_x) != len(client_y) or not client_x:
      raise ValueError('need one label array per feature array, and at least '
                       f'one client; got {len(client_x)} and {len(client_y)}')
    if epochs < 1 or batch_size < 1:
      raise ValueError(f'epochs ({epochs}) and batch_size ({batch_size}) must '
                       'be at least 1')
    if num_threads is not None:
      torch.set_num_threads(num_threads)
    example_shape = np.shape(client_x[0])[1:]
    self._x = []
    self._y = []
    for k, (x, y) in enumerate(zip(client_x, client_y)):
      if np.shape(x)[1:] != example_shape or len(x) != len(y) or not len(x):
        raise ValueError(f'client {k}: features {np.shape(x)} and labels '
                         f'{np.shape(y)} do not match example shape '
                         f'{example_shape} or are empty')
      # Converted once, so rounds only index into ready tensors.
      self._x.append(torch.as_tensor(np.asarray(x, np.float32)))
      self._y.append(torch.as_tensor(np.asarray(y, np.int64)))
    self._num_examples = [len(y) for y in self._y]

    self._client_lr = client_lr
    self._epochs = epochs
    self._batch_size = batch_size
    self._distillation = distillation

    with torch.random.fork_rng(devices=[]):
      torch.manual_seed(seed)
      self._student = student()
      self._teachers = ([distillation.teacher() for _ in self._x]
                        if distillation else [])
      # One local student, loaded from the global one for every client.
      self._local = student()
    self._teacher_opts = [
        torch.optim.SGD(t.parameters(), lr=distillation.teacher_lr)
        for t in self._teachers]
    self._generator = torch.Generator().manual_seed(seed)

  @property
  def num_clients(self) -> int:
    return len(self._x)

  def run_round(self, cohort: Sequence[int]) -> None:
    """Runs one federated round over the clients `cohort` (ids)."""
    cohort = list(cohort)
    if not cohort:
      raise ValueError('empty cohort')
    bad = [k for k in cohort if not 0 <= k < self.num_clients]
    if bad:
      raise ValueError(f'client ids {bad} out of range [0, {self.num_clients})')
    global_params = list(self._student.parameters())
    local_params = list(self._local.parameters())
    # Running n_k-weighted sum of the client students: no per-client copies.
    totals = [torch.zeros_like(p) for p in global_params]
    for k in cohort:
      with torch.no_grad():
        for local, param in zip(local_params, global_params):
          local.copy_(param)
      self._train_client(k)
      with torch.no_grad():
        for total, local in zip(totals, local_params):
          total.add_(local, alpha=self._num_examples[k])
    count = sum(self._num_examples[k] for k in cohort)
    with torch.no_grad():
      for param, total in zip(global_params, totals):
        param.copy_(total.div_(count))

  def _train_client(self, k: int) -> None:
    """Trains client k's local student (and teacher) on its data in place."""
    x, y = self._x[k], self._y[k]
    student_opt = torch.optim.SGD(self._local.parameters(),
                                  lr=self._client_lr)
    for _ in range(self._epochs):
      perm = torch.randperm(len(y), generator=self._generator)
      for idx in perm.split(self._batch_size):
        xb, yb = x[idx], y[idx]
        logits = self._local(xb)
        loss = F.cross_entropy(logits, yb)
        if self._distillation:
          loss = self._distilled(k, xb, yb, logits, loss)
        student_opt.zero_grad()
        loss.backward()
        student_opt.step()

  def _distilled(self, k: int, xb: torch.Tensor, yb: torch.Tensor,
                 logits: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
    """Steps client k's teacher on the batch; returns the student's KD loss."""
    teacher, teacher_opt = self._teachers[k], self._teacher_opts[k]
    t, w = self._distillation.temperature, self._distillation.distill_weight
    teacher_logits = teacher(xb)
    teacher_opt.zero_grad()
    F.cross_entropy(teacher_logits, yb).backward()
    teacher_opt.step()
    targets = F.softmax(teacher_logits.detach() / t, dim=-1)
    kl = F.kl_div(F.log_softmax(logits / t, dim=-1), targets,
                  reduction='none').sum(-1).mean()
    return (1.0 - w) * ce + w * t**2 * kl

  def global_student_state(self) -> dict[str, np.ndarray]:
    """A copy of the global student's parameters, by `state_dict` name."""
    return _numpy_state(self._student)

  def teacher_state(self, client: int) -> dict[str, np.ndarray]:
    """A copy of client `client`'s private teacher, by `state_dict` name."""
    return _numpy_state(self._teachers[client])

  def load_global_student(self, state: dict[str, np.ndarray]) -> None:
    """Replaces the global student's parameters (`state_dict` names)."""
    self._student.load_state_dict(
        {name: torch.tensor(value) for name, value in state.items()})


def _numpy_state(module: nn.Module) -> dict[str, np.ndarray]:
  return {name: value.detach().numpy().copy()
          for name, value in module.state_dict().items()}
