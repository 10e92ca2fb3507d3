"""Model parameter counts (paper goldens), the ResNets against a numpy
reference, and forward-mode autodiff through every model."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from experiments import validation
from experiments.configs import default
from fedkd import models
from fedkd.errors import FedkdError


class ModelsTest(parameterized.TestCase):

  @parameterized.parameters(
      # McMahan et al. 2017: 2NN 199,210 and CNN 1,663,370 parameters.
      ('mnist_2nn', (28, 28, 1), 199_210),
      ('mnist_cnn', (28, 28, 1), 1_663_370),
      # 64*64+64 + 64*32+32 + 32*10+10 and 64*32+32 + 32*10+10.
      ('seed_teacher', (8, 8, 1), 6_570),
      ('seed_student', (8, 8, 1), 2_410),
      # Synthetic(alpha, beta)'s 60 features to 10 classes: 60*10 + 10.
      ('logreg', (60,), 610),
      # FedDF's ResNet_cifar (kernels [3, 3, in, out], no conv bias; every
      # GroupNorm a scale and a bias per channel; 1x1 projection shortcuts):
      # stem 3*3*3*16 + 2*16 = 464; a 16->16 block 2*(9*16*16 + 2*16) = 4,672;
      # 16->32 block 9*16*32 + 9*32*32 + 16*32 + 3*2*32 = 14,528;
      # 32->64 block 9*32*64 + 9*64*64 + 32*64 + 3*2*64 = 57,728;
      # a 32->32 block 2*(9*32*32 + 2*32) = 18,560, a 64->64 one
      # 2*(9*64*64 + 2*64) = 73,984; dense 64*10 + 10 = 650.
      # ResNet-8 (one block a stage): 464 + 4,672 + 14,528 + 57,728 + 650.
      ('resnet8_gn', (32, 32, 3), 78_042),
      # ResNet-20 (three a stage): ResNet-8 + 2*(4,672 + 18,560 + 73,984),
      # He et al. Table 6: "0.27M" (their zero-padding shortcuts: 269,722).
      ('resnet20_gn', (32, 32, 3), 272_474),
      # One input channel: the stem loses 3*3*2*16 = 288 weights.
      ('resnet8_gn', (28, 28, 1), 77_754),
      ('resnet20_gn', (28, 28, 1), 272_186),
  )
  def test_parameter_counts(self, name, shape, expected):
    model = models.get_model(name, 10)
    # Shapes only: nothing is compiled or run.
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, *shape)))
    self.assertEqual(models.num_params(params), expected)
    self.assertEqual(
        jax.eval_shape(model.apply, params, jnp.zeros((3, *shape))).shape,
        (3, 10))

  def test_mlp_flattens_any_input_shape(self):
    model = models.get_model('seed_student', 4)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))
    self.assertEqual(model.apply(params, jnp.ones((2, 5))).shape, (2, 4))

  def test_logreg_is_affine_logits(self):
    # Logistic regression: logits x W + b of the flattened input, no hidden
    # layer, against numpy with the model's own parameters.
    model = models.get_model('logreg', 3)
    x = np.random.default_rng(0).normal(size=(4, 2, 5)).astype(np.float32)
    params = model.init(jax.random.PRNGKey(0), x[:1])
    (layer,) = params['params'].values()
    expected = x.reshape(4, 10) @ layer['kernel'] + layer['bias']
    np.testing.assert_allclose(model.apply(params, x), expected, rtol=1e-5,
                               atol=1e-6)

  def test_unknown_model(self):
    with self.assertRaisesRegex(FedkdError, 'unknown model'):
      models.get_model('resnet9000', 10)

  @parameterized.parameters('resnet8', 'resnet20')
  def test_batchnorm_resnets_are_refused(self, name):
    with self.assertRaisesRegex(FedkdError, f'BatchNorm.*{name}_gn'):
      models.get_model(name, 10)
    config = default.get_config()
    config.student = name
    with self.assertRaisesRegex(FedkdError, f'student {name!r}.*BatchNorm'):
      validation.validate_config(config)

  def test_resnet_needs_images(self):
    model = models.get_model('resnet8_gn', 10)
    with self.assertRaisesRegex(FedkdError, 'images'):
      jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64)))


def _random_params(model, shape, seed):
  """Parameters of `model` drawn with numpy: no init to compile.

  Kernels ~ N(0, 1 / fan_in); GroupNorm scales ~ N(1, 0.2) and biases
  ~ N(0, 0.2), so that neither is the identity.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, *shape)))

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if 'kernel' in name:
      fan_in = np.prod(leaf.shape[:-1])
      return rng.normal(0, fan_in ** -0.5, leaf.shape).astype(np.float32)
    mean = 1.0 if 'scale' in name else 0.0
    return rng.normal(mean, 0.2, leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _np_conv(x, kernel, stride, pad):
  """PyTorch Conv2d(padding=pad, stride=stride, bias=False), NHWC/HWIO."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kh, kw = kernel.shape[:2]
  out_h = (x.shape[1] - kh) // stride + 1
  out_w = (x.shape[2] - kw) // stride + 1
  out = 0
  for i in range(kh):
    for j in range(kw):
      window = x[:, i:i + stride * out_h:stride, j:j + stride * out_w:stride]
      out = out + window @ kernel[i, j]
  return out


def _np_group_norm(x, p, groups=2, eps=1e-5):
  n, h, w, c = x.shape
  g = x.reshape(n, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  g = (g - mean) / np.sqrt(var + eps)
  return g.reshape(x.shape) * p['scale'] + p['bias']


def _np_resnet(params, x, depth):
  """FedDF's ResNet_cifar forward with GroupNorm(2), in float64 numpy."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params['params'])
  relu = lambda a: np.maximum(a, 0)
  x = relu(_np_group_norm(_np_conv(x, p['Conv_0']['kernel'], 1, 1),
                          p['GroupNorm_0']))
  n = (depth - 2) // 6
  for i in range(3 * n):
    b = p[f'_BasicBlock_{i}']
    stride = 2 if i in (n, 2 * n) else 1  # first block of stages 2 and 3
    y = relu(_np_group_norm(_np_conv(x, b['Conv_0']['kernel'], stride, 1),
                            b['GroupNorm_0']))
    y = _np_group_norm(_np_conv(y, b['Conv_1']['kernel'], 1, 1),
                       b['GroupNorm_1'])
    if stride == 2:
      x = _np_group_norm(_np_conv(x, b['Conv_2']['kernel'], 2, 0),
                         b['GroupNorm_2'])
    x = relu(x + y)
  # AvgPool2d(8) on 8x8 maps, global on any.
  return x.mean(axis=(1, 2)) @ p['Dense_0']['kernel'] + p['Dense_0']['bias']


@functools.cache
def _compiled(name, shape):
  """(model, params, jitted apply), shared by the tests below."""
  model = models.get_model(name, 10)
  return model, _random_params(model, shape, seed=0), jax.jit(
      _float32(model.apply))


def _float32(f):
  # Full float32 convs: GPUs default to TF32, 1e-3 off the float64 reference.
  return jax.default_matmul_precision('float32')(f)


class ResNetTest(parameterized.TestCase):

  @parameterized.parameters(
      ('resnet8_gn', 8, (32, 32, 3)),
      ('resnet20_gn', 20, (32, 32, 3)),
      # 28 -> 14 -> 7: a stride-2 conv of an odd size has no 'SAME' trap,
      # but 28 and 14 do.
      ('resnet8_gn', 8, (28, 28, 1)),
  )
  def test_matches_numpy_reference(self, name, depth, shape):
    _, params, apply = _compiled(name, shape)
    x = np.random.default_rng(1).normal(size=(2, *shape)).astype(np.float32)
    logits = apply(params, x)
    self.assertEqual(logits.shape, (2, 10))
    np.testing.assert_allclose(logits, _np_resnet(params, x, depth),
                               rtol=2e-4, atol=2e-4)

  def test_examples_do_not_share_statistics(self):
    # GroupNorm normalises each example on its own: unlike BatchNorm, an
    # example's logits do not depend on the rest of its batch.
    _, params, apply = _compiled('resnet8_gn', (32, 32, 3))
    a, b, c = np.random.default_rng(2).normal(size=(3, 1, 32, 32, 3))
    np.testing.assert_allclose(apply(params, np.concatenate([a, b]))[0],
                               apply(params, np.concatenate([a, 10 * c]))[0],
                               rtol=1e-5, atol=1e-5)

  def test_vmap_over_clients_matches_one_by_one(self):
    model, _, apply = _compiled('resnet8_gn', (32, 32, 3))
    shape = (32, 32, 3)
    per_client = [_random_params(model, shape, seed) for seed in (3, 4)]
    x = np.random.default_rng(5).normal(size=(2, 2, *shape))
    stacked = jax.tree.map(lambda *a: np.stack(a), *per_client)
    together = jax.jit(jax.vmap(_float32(model.apply)))(stacked, x)
    for i, params in enumerate(per_client):
      np.testing.assert_allclose(together[i], apply(params, x[i]),
                                 rtol=1e-5, atol=1e-5)

class ForwardModeTest(parameterized.TestCase):

  # resnet20_gn stacks the very blocks of resnet8_gn; its compile alone
  # would take a minute of the suite.
  @parameterized.parameters(
      *sorted(set(models.MODEL_NAMES) - {'resnet20_gn'}))
  def test_forward_mode_agrees_with_reverse_mode(self, name):
    # Small images keep compiles short; every model takes any size.
    shape = (8, 8, 3)
    model = models.get_model(name, 10)
    params = _random_params(model, shape, seed=6)
    tangent = _random_params(model, shape, seed=7)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, *shape)).astype(np.float32)
    cotangent = rng.normal(size=(2, 10)).astype(np.float32)
    f = _float32(lambda p: model.apply(p, x))
    # One compile for both modes: op by op, ResNet-20 takes over a minute.
    forward, reverse = jax.jit(lambda p, t, w: (
        jax.jvp(f, (p,), (t,))[1], jax.vjp(f, p)[1](w)[0]))(
            params, tangent, cotangent)
    # <w, J v> = <J^T w, v>.
    np.testing.assert_allclose(
        np.sum(cotangent * forward),
        sum(np.sum(a * b) for a, b in zip(jax.tree.leaves(reverse),
                                          jax.tree.leaves(tangent))),
        rtol=1e-4)


if __name__ == '__main__':
  absltest.main()
