"""Tests for experiments.torch_baseline: local KD against a NumPy reference,
FedAvg of the CNN against fedkd's own round."""

import functools
import operator
import unittest

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedkd import clients
from fedkd import models
from fedkd.algorithms import fedavg

try:
  import torch
except ImportError:  # torch is the optional `bench` extra.
  torch = None

if torch is not None:
  from experiments import torch_baseline

_NUM_CLASSES = 3
_EXAMPLE_SHAPE = (2, 3, 1)


def _data(n, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, *_EXAMPLE_SHAPE)).astype(np.float32)
  y = rng.integers(0, _NUM_CLASSES, size=n).astype(np.int64)
  return x, y


def _layers(state):
  """[(W, b), ...] in float64, in layer order, from an nn.Sequential state."""
  indices = sorted({int(name.split('.')[0]) for name in state})
  return [(state[f'{i}.weight'].astype(np.float64),
           state[f'{i}.bias'].astype(np.float64)) for i in indices]


def _forward(layers, x):
  """Logits and each layer's input for a ReLU MLP on flattened x."""
  inputs = [x.reshape(len(x), -1)]
  for i, (w, b) in enumerate(layers):
    z = inputs[-1] @ w.T + b
    if i == len(layers) - 1:
      return z, inputs
    inputs.append(np.maximum(z, 0.0))


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _sgd_step(layers, inputs, grad_logits, lr):
  """Backpropagates d(loss)/d(logits) by hand and takes one SGD step."""
  grads = []
  delta = grad_logits
  for i in reversed(range(len(layers))):
    w, _ = layers[i]
    grads.append((delta.T @ inputs[i], delta.sum(0)))
    # inputs[i] = relu(z), so relu'(z) is (inputs[i] > 0).
    delta = (delta @ w) * (inputs[i] > 0)
  grads.reverse()
  return [(w - lr * gw, b - lr * gb)
          for (w, b), (gw, gb) in zip(layers, grads)]


def _reference_client(student, teacher, x, y, batches, *, client_lr,
                      teacher_lr, temperature, distill_weight):
  """One client's local KD in NumPy over the given index batches."""
  t, w = temperature, distill_weight
  for idx in batches:
    xb, onehot = x[idx].astype(np.float64), np.eye(_NUM_CLASSES)[y[idx]]
    n = len(idx)
    teacher_logits, teacher_inputs = _forward(teacher, xb)
    teacher = _sgd_step(teacher, teacher_inputs,
                        (_softmax(teacher_logits) - onehot) / n, teacher_lr)
    logits, inputs = _forward(student, xb)
    # d/ds of T^2 KL(softmax(t/T) || softmax(s/T)) is T (softmax(s/T) -
    # softmax(t/T)), with the teacher's pre-step logits.
    grad = ((1 - w) * (_softmax(logits) - onehot)
            + w * t * (_softmax(logits / t) - _softmax(teacher_logits / t)))
    student = _sgd_step(student, inputs, grad / n, client_lr)
  return student, teacher


def _assert_layers_close(testcase, state, layers):
  for (w, b), (ref_w, ref_b) in zip(_layers(state), layers, strict=True):
    np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b, ref_b, rtol=1e-5, atol=1e-6)
  testcase.assertLen(_layers(state), len(layers))


_HPARAMS = dict(client_lr=0.3, teacher_lr=0.2, temperature=2.0)


def _local_kd(xs, ys, *, client_lr, teacher_lr, temperature, distill_weight,
              **kwargs):
  """The torch local-KD simulator of the seed MLPs over clients xs, ys."""
  model = lambda name: lambda: torch_baseline.get_model(
      name, _EXAMPLE_SHAPE, _NUM_CLASSES)
  return torch_baseline.TorchFederated(
      xs, ys, model('seed_student'), client_lr=client_lr,
      distillation=torch_baseline.Distillation(
          model('seed_teacher'), teacher_lr, temperature, distill_weight),
      **kwargs)


@unittest.skipIf(torch is None, 'torch (the `bench` extra) is not installed')
class TorchLocalKDTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('ce_only_full_batch', 0.0, 1, 16),
      ('kd_full_batch', 0.4, 1, 7),
      ('kd_minibatches_partial_last', 0.4, 2, 3),
  )
  def test_matches_numpy_reference(self, distill_weight, epochs, batch_size):
    n, seed = 7, 3
    x, y = _data(n, seed=0)
    kd = _local_kd([x], [y], epochs=epochs, batch_size=batch_size,
                   distill_weight=distill_weight, seed=seed, **_HPARAMS)
    student = _layers(kd.global_student_state())
    teacher = _layers(kd.teacher_state(0))
    # The baseline shuffles with one generator seeded by `seed`.
    generator = torch.Generator().manual_seed(seed)
    for _ in range(2):  # Two rounds: the teacher persists, the student too.
      batches = [idx.numpy()
                 for _ in range(epochs)
                 for idx in torch.randperm(n, generator=generator).split(
                     batch_size)]
      student, teacher = _reference_client(
          student, teacher, x, y, batches, distill_weight=distill_weight,
          **_HPARAMS)
      kd.run_round([0])
      _assert_layers_close(self, kd.global_student_state(), student)
      _assert_layers_close(self, kd.teacher_state(0), teacher)

  def test_aggregate_is_example_weighted_mean_of_solo_clients(self):
    (x0, y0), (x1, y1) = _data(5, seed=1), _data(11, seed=2)
    # Full batches, so each client's result is independent of shuffling.
    config = dict(epochs=2, batch_size=11, distill_weight=0.5, seed=4,
                  **_HPARAMS)

    def round_over(cohort):
      kd = _local_kd([x0, x1], [y0, y1], **config)
      initial = kd.global_student_state()
      kd.run_round(cohort)
      return initial, kd.global_student_state()

    initial, both = round_over([0, 1])
    _, solo0 = round_over([0])
    _, solo1 = round_over([1])
    for name, value in both.items():
      self.assertFalse(np.allclose(solo0[name], solo1[name]))
      self.assertFalse(np.allclose(value, initial[name]))
      np.testing.assert_allclose(
          value, (5 * solo0[name] + 11 * solo1[name]) / 16, rtol=1e-5,
          atol=1e-6)

  def test_only_cohort_teachers_train(self):
    data = [_data(4, seed=s) for s in range(3)]
    kd = _local_kd([x for x, _ in data], [y for _, y in data], epochs=1,
                   batch_size=2, distill_weight=0.5, **_HPARAMS)
    before = [kd.teacher_state(k) for k in range(3)]
    kd.run_round([2, 0])
    for k, changed in ((0, True), (1, False), (2, True)):
      after = kd.teacher_state(k)
      for name in after:
        self.assertEqual(
            not np.array_equal(after[name], before[k][name]), changed,
            msg=f'client {k} {name}')

  def test_rejects_unknown_client(self):
    x, y = _data(4, seed=0)
    kd = _local_kd([x], [y], epochs=1, batch_size=2, distill_weight=0.0,
                   **_HPARAMS)
    with self.assertRaisesRegex(ValueError, 'out of range'):
      kd.run_round([1])


def _paths_in_creation_order(tree, prefix=()):
  """Key paths of nested dicts in insertion order."""
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _paths_in_creation_order(value, prefix + (key,))
    else:
      yield prefix + (key,)


def _to_torch(params, name, example_shape):
  """fedkd parameters of model `name` as its torch twin's `state_dict`.

  The twins register their parameters in the order fedkd creates them:
  conv kernels go from HWIO to OIHW, dense kernels are transposed.
  """
  channels, height, width = example_shape
  paths = []

  def init(x):
    # Only `init`'s own dicts keep flax's creation order: returning them
    # through any pytree operation (jit, eval_shape, tree.map) sorts keys.
    variables = models.get_model(name, 10).init(jax.random.PRNGKey(0), x)
    paths.extend(_paths_in_creation_order(variables['params']))
    return variables

  jax.eval_shape(init, jnp.zeros((1, height, width, channels)))
  module = torch_baseline.get_model(name, example_shape, 10)
  layouts = {4: (3, 2, 0, 1), 2: (1, 0), 1: (0,)}
  state = {}
  for (key, value), path in zip(module.state_dict().items(), paths,
                                strict=True):
    leaf = np.asarray(functools.reduce(operator.getitem, path,
                                       params['params']))
    state[key] = leaf.transpose(layouts[leaf.ndim])
    assert state[key].shape == tuple(value.shape), (key, path)
  return state


def _cnn_to_torch(params, example_shape):
  """fedkd's MnistCNN parameters as its torch twin's `state_dict`."""
  p = jax.tree.map(np.asarray, params['params'])
  # Flax flattens [h, w, c] feature maps, torch [c, h, w]: reorder the rows
  # of the first Dense kernel accordingly.
  kernel = p['Dense_0']['kernel']
  _, height, width = example_shape
  p['Dense_0']['kernel'] = kernel.reshape(
      height // 4, width // 4, -1, kernel.shape[-1]).transpose(
          2, 0, 1, 3).reshape(kernel.shape)
  return _to_torch({'params': p}, 'mnist_cnn', example_shape)


@unittest.skipIf(torch is None, 'torch (the `bench` extra) is not installed')
class TorchTwinsTest(absltest.TestCase):

  def test_cnn_round_matches_fedkd(self):
    # Two clients of 4 and 3 examples, full batches (so the shuffle orders,
    # which differ between the two, change nothing), two local epochs.
    num_clients, n, shape, lr = 2, 4, (8, 8, 1), 0.05
    torch_shape = (1, 8, 8)
    rng = np.random.default_rng(0)
    x = rng.random((num_clients * n, *shape), np.float32)
    y = rng.integers(0, 10, num_clients * n).astype(np.int64)
    parts = [np.arange(4), np.arange(4, 7)]
    model = models.get_model('mnist_cnn', 10)
    params = jax.jit(model.init)(jax.random.PRNGKey(0),
                                 jnp.zeros((1, *shape)))
    alg = fedavg(model=model, client_tx=optax.sgd(lr),
                 server_tx=optax.sgd(1.0), epochs=2, batch_size=n)
    with jax.default_matmul_precision('highest'):  # no TF32 on GPUs
      state, _ = jax.jit(alg.apply)(
          alg.init(params, jax.random.PRNGKey(1)),
          clients.stack_clients(x, y, parts),
          clients.Cohort(client_ids=jnp.arange(num_clients),
                         client_mask=jnp.ones(num_clients, bool)),
          jax.random.PRNGKey(2))

    channels_first = x.transpose(0, 3, 1, 2)
    sim = torch_baseline.TorchFederated(
        [channels_first[p] for p in parts], [y[p] for p in parts],
        lambda: torch_baseline.get_model('mnist_cnn', torch_shape, 10),
        client_lr=lr, epochs=2, batch_size=n)
    sim.load_global_student(_cnn_to_torch(params, torch_shape))
    sim.run_round([0, 1])

    expected = _cnn_to_torch(state.params, torch_shape)
    initial = _cnn_to_torch(params, torch_shape)
    got = sim.global_student_state()
    self.assertEqual(set(got), set(expected))
    for name, value in got.items():
      self.assertFalse(np.allclose(value, initial[name]), msg=name)
      np.testing.assert_allclose(value, expected[name], rtol=1e-4, atol=1e-5,
                                 err_msg=name)

  def test_resnet8_gn_forward_matches_fedkd(self):
    # 12x12: stride 2 on even maps (12, 6), where PyTorch's padding differs
    # from 'SAME', and odd 3x3 maps in the last stage.
    shape, torch_shape = (12, 12, 3), (3, 12, 12)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, *shape)).astype(np.float32)
    model = models.get_model('resnet8_gn', 10)
    # Random values for every parameter, GroupNorm scales and biases too, so
    # a mismatch cannot hide behind ones and zeros.
    params = jax.tree.map(
        lambda p: rng.normal(0.0, 0.5, p.shape).astype(np.float32),
        jax.eval_shape(model.init, jax.random.PRNGKey(0),
                       jnp.zeros((1, *shape))))
    twin = torch_baseline.get_model('resnet8_gn', torch_shape, 10)
    twin.load_state_dict({
        key: torch.tensor(value)
        for key, value in _to_torch(params, 'resnet8_gn', torch_shape).items()})
    with torch.no_grad():
      got = twin(torch.tensor(x.transpose(0, 3, 1, 2))).numpy()
    with jax.default_matmul_precision('highest'):  # no TF32 on GPUs
      expected = jax.jit(model.apply)(params, x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)

  def test_unknown_model(self):
    with self.assertRaisesRegex(ValueError, 'no torch twin'):
      torch_baseline.get_model('resnet9000', (3, 32, 32), 10)


if __name__ == '__main__':
  absltest.main()
