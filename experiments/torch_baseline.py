"""Baseline (c): federated local KD as typical PyTorch FL code runs it.

The same round as `fedkd.algorithms.local_kd` (SGD clients, FedAvg server),
written the way PyTorch FL code usually is: a Python loop over the cohort, one
client at a time, each with its own `nn.Module` teacher and `torch.optim.SGD`
optimizer. It is meant to be a fair, reasonably efficient implementation, not a
straw man: data lives in preallocated per-client tensors, one student module
is reused across clients, and server-side work runs under `torch.no_grad`.

Per minibatch, as in the JAX engine:

* teacher: forward, mean cross-entropy, backward, SGD step (`teacher_lr`);
  its logits from that forward pass (before the step), detached, are the
  distillation targets;
* student: one SGD step (`client_lr`) on `(1 - w) * CE + w * T^2 *
  KL(softmax(teacher / T) || softmax(student / T))`, averaged over the batch.

Teachers and their optimizers persist across rounds; the student starts every
round from the global model with a fresh optimizer, and the server replaces
the global student with the example-count-weighted mean of the cohort's.

Requires the optional `bench` extra (`torch`).
"""

from collections.abc import Sequence
import math

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


def teacher_mlp(in_features: int, num_classes: int) -> nn.Module:
  """The seed teacher: the torch twin of `models.get_model('seed_teacher')`."""
  return nn.Sequential(
      nn.Flatten(),
      nn.Linear(in_features, 64), nn.ReLU(),
      nn.Linear(64, 32), nn.ReLU(),
      nn.Linear(32, num_classes))


def student_mlp(in_features: int, num_classes: int) -> nn.Module:
  """The seed student: the torch twin of `models.get_model('seed_student')`."""
  return nn.Sequential(
      nn.Flatten(),
      nn.Linear(in_features, 32), nn.ReLU(),
      nn.Linear(32, num_classes))


class TorchLocalKD:
  """Local KD federated rounds, one client after another, on the CPU."""

  def __init__(self, client_x: Sequence[np.ndarray],
               client_y: Sequence[np.ndarray], num_classes: int, *,
               client_lr: float, teacher_lr: float, epochs: int,
               batch_size: int, temperature: float, distill_weight: float,
               seed: int = 0, num_threads: int | None = None):
    """Builds every client's teacher and the global student.

    Args:
      client_x: per client, [n_k, ...] float32 features (any example shape;
        the models flatten it). Every client must have the same example shape.
      client_y: per client, [n_k] integer labels in [0, num_classes).
      num_classes: number of logits.
      client_lr: the student's local SGD learning rate.
      teacher_lr: the teachers' SGD learning rate.
      epochs: local passes over each client's data per round.
      batch_size: local minibatch size; the last minibatch may be partial.
      temperature: distillation temperature T.
      distill_weight: w, the weight of the distillation term.
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
    in_features = math.prod(example_shape)
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
    self._temperature = temperature
    self._distill_weight = distill_weight

    with torch.random.fork_rng(devices=[]):
      torch.manual_seed(seed)
      self._student = student_mlp(in_features, num_classes)
      self._teachers = [teacher_mlp(in_features, num_classes)
                        for _ in self._x]
    self._teacher_opts = [torch.optim.SGD(t.parameters(), lr=teacher_lr)
                          for t in self._teachers]
    # One local student, loaded from the global one for every client.
    self._local = student_mlp(in_features, num_classes)
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
    """Trains client k's teacher and the local student on its data in place."""
    x, y = self._x[k], self._y[k]
    teacher, teacher_opt = self._teachers[k], self._teacher_opts[k]
    student = self._local
    student_opt = torch.optim.SGD(student.parameters(), lr=self._client_lr)
    t, w = self._temperature, self._distill_weight
    for _ in range(self._epochs):
      perm = torch.randperm(len(y), generator=self._generator)
      for idx in perm.split(self._batch_size):
        xb, yb = x[idx], y[idx]

        teacher_logits = teacher(xb)
        teacher_opt.zero_grad()
        F.cross_entropy(teacher_logits, yb).backward()
        teacher_opt.step()
        targets = F.softmax(teacher_logits.detach() / t, dim=-1)

        logits = student(xb)
        kl = F.kl_div(F.log_softmax(logits / t, dim=-1), targets,
                      reduction='none').sum(-1).mean()
        loss = (1.0 - w) * F.cross_entropy(logits, yb) + w * t**2 * kl
        student_opt.zero_grad()
        loss.backward()
        student_opt.step()

  def global_student_state(self) -> dict[str, np.ndarray]:
    """A copy of the global student's parameters, by `state_dict` name."""
    return {name: value.detach().numpy().copy()
            for name, value in self._student.state_dict().items()}

  def teacher_state(self, client: int) -> dict[str, np.ndarray]:
    """A copy of client `client`'s private teacher, by `state_dict` name."""
    return {name: value.detach().numpy().copy()
            for name, value in self._teachers[client].state_dict().items()}
