"""Tests for experiments/flops.py: each rule against a count made another
way (by hand, by XLA's own convolution of ones, by XLA's cost analysis)."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp

from experiments import flops
from fedkd import conv_cpu
from fedkd import layers
from fedkd import losses
from fedkd import models


def _count(fn, *args) -> flops.Count:
  return flops.of_jaxpr(jax.make_jaxpr(fn)(*args))


def _exact(fn, *args) -> int:
  """The FLOPs of `fn(*args)`, which must be exact."""
  counted = _count(fn, *args)
  assert counted.exact, counted
  return counted.flops


def _zeros(*shape):
  return jnp.zeros(shape, jnp.float32)


# Forward FLOPs of one example per layer, by hand. A 'SAME' k x k conv over
# an n x n map has k*n - 2 * (1 + ... + (k-1)/2) taps inside the input per
# axis: 5x5 on 28 (14): 134 (64); 3x3 on 32 (16, 8): 94 (46, 22).
# ResNet's stride-2 3x3 convs pad one pixel on each side (PyTorch's grid):
# (16 * 3)**2 taps if the model pads explicitly (jnp.pad: its zeros are
# input), (16 * 3 - 1)**2 if the conv pads (taps on padding do not count).
_STRIDED = {'explicit': lambda n: (n * 3)**2, 'conv': lambda n: (n * 3 - 1)**2}
LAYERS = {
    'seed_student': [2 * 64 * 32, 2 * 32 * 10],
    'seed_teacher': [2 * 64 * 64, 2 * 64 * 32, 2 * 32 * 10],
    'mnist_2nn': [2 * 784 * 200, 2 * 200 * 200, 2 * 200 * 10],
    'mnist_cnn': [2 * 1 * 32 * 134**2, 2 * 32 * 64 * 64**2,
                  2 * 7 * 7 * 64 * 512, 2 * 512 * 10],
}
for _pad, _strided in _STRIDED.items():
  # Stem; block 1: two 3x3; blocks 2 and 3: the stride-2 3x3, a 3x3, the
  # 1x1 shortcut; the dense layer.
  LAYERS[f'resnet8_gn_{_pad}'] = [
      2 * 3 * 16 * 94**2, 2 * 16 * 16 * 94**2, 2 * 16 * 16 * 94**2,
      2 * 16 * 32 * _strided(16), 2 * 32 * 32 * 46**2, 2 * 16 * 32 * 16**2,
      2 * 32 * 64 * _strided(8), 2 * 64 * 64 * 22**2, 2 * 32 * 64 * 8**2,
      2 * 64 * 10]
SHAPES = {'seed_student': (8, 8, 1), 'seed_teacher': (8, 8, 1),
          'mnist_2nn': (28, 28, 1), 'mnist_cnn': (28, 28, 1),
          'resnet8_gn': (32, 32, 3)}


def training(layers_flops) -> int:
  """Hand count of one example's training: 3 forwards, less the first
  layer's input gradient (never computed)."""
  return 3 * sum(layers_flops) - layers_flops[0]


def training_step(model, batch: int, shape):
  """(one SGD step of `model` on a batch, its parameters' shapes)."""
  x = _zeros(batch, *shape)
  y = jnp.zeros((batch,), jnp.int32)

  def step(params):
    grads = jax.grad(lambda p: jnp.mean(
        losses.cross_entropy(model.apply(p, x), y)))(params)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

  return step, jax.eval_shape(model.init, jax.random.PRNGKey(0), x)


class RulesTest(parameterized.TestCase):

  def test_dot_general(self):
    # A batch of 3 [4, 5] x [5, 6] products: 2 x 3 x 4 x 6 x 5.
    self.assertEqual(_exact(lambda a, b: jnp.einsum('bij,bjk->bik', a, b),
                            _zeros(3, 4, 5), _zeros(3, 5, 6)),
                     2 * 3 * 4 * 6 * 5)

  @parameterized.parameters(
      # (input h, w; kernel h, w; strides; padding; lhs and rhs dilation;
      # feature groups)
      ((7, 5), (3, 3), (1, 1), 'SAME', (1, 1), (1, 1), 1),
      ((9, 6), (5, 2), (2, 3), 'SAME', (1, 1), (1, 1), 1),
      ((8, 7), (3, 4), (2, 1), ((2, 0), (1, 3)), (1, 1), (1, 1), 1),
      ((6, 5), (3, 3), (1, 2), 'VALID', (1, 1), (2, 1), 2),
      ((5, 4), (3, 2), (1, 1), ((1, 2), (0, 1)), (2, 3), (1, 2), 1),
  )
  def test_convolution_counts_the_taps_on_input(self, size, kernel, strides,
                                                padding, lhs_dilation,
                                                rhs_dilation, groups):
    batch, cin, cout = 2, 4, 6
    conv = lambda x, k: jax.lax.conv_general_dilated(
        x, k, strides, padding, lhs_dilation, rhs_dilation,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=groups)
    # Reference: XLA's convolution of ones by ones counts, at each output,
    # the taps that land on an input element.
    taps = int(jax.lax.conv_general_dilated(
        jnp.ones((1, *size, 1)), jnp.ones((*kernel, 1, 1)), strides, padding,
        lhs_dilation, rhs_dilation,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC')).sum())
    self.assertEqual(
        _exact(conv, _zeros(batch, *size, cin),
               _zeros(*kernel, cin // groups, cout)),
        2 * batch * cout * (cin // groups) * taps)

  @parameterized.parameters(
      ((9, 6), (5, 2), (2, 3), 'SAME'),
      ((8, 7), (3, 4), (2, 1), ((2, 0), (1, 3))),
      ((14, 14), (5, 5), (1, 1), 'SAME'))
  def test_both_gradients_of_fedkds_conv_count_as_its_forward(
      self, size, kernel, strides, padding):
    # Each product of the forward pass is made once more in the input
    # gradient and once in the kernel gradient: 3x in all, whatever the
    # strides and padding (a strided input gradient dilates its input).
    pads = jax.lax.padtype_to_pads(size, kernel, strides, padding) if (
        isinstance(padding, str)) else padding
    conv = lambda x, k: conv_cpu.conv(x, k, strides=strides, padding=pads)
    x, k = _zeros(2, *size, 3), _zeros(*kernel, 3, 5)
    forward = _exact(conv, x, k)
    self.assertEqual(forward, _exact(
        lambda x, k: jax.lax.conv_general_dilated(
            x, k, strides, pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC')),
        x, k))
    self.assertEqual(
        _exact(jax.value_and_grad(lambda x, k: conv(x, k).sum(), (0, 1)),
               x, k),
        3 * forward)

  def test_grouped_convolution_gradients_count_as_its_forward(self):
    # The kernel gradient of a grouped convolution groups its batch
    # (`batch_group_count`): each product is still made once a pass.
    conv = lambda x, k: jax.lax.conv_general_dilated(
        x, k, (2, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=2)
    x, k = _zeros(3, 7, 6, 4), _zeros(3, 2, 2, 6)
    jaxpr = jax.make_jaxpr(jax.grad(lambda x, k: conv(x, k).sum(), 1))(x, k)
    self.assertIn('batch_group_count=2', str(jaxpr))
    self.assertEqual(
        _exact(jax.value_and_grad(lambda x, k: conv(x, k).sum(), (0, 1)),
               x, k),
        3 * _exact(conv, x, k))

  def test_a_scan_counts_its_body_each_step(self):
    def fn(a):
      return jax.lax.scan(lambda c, _: (c @ a, None), a, None, length=7)[0]
    self.assertEqual(_exact(fn, _zeros(4, 4)), 7 * 2 * 4**3)

  def test_a_cond_counts_its_costliest_branch_as_a_guess(self):
    def fn(a, b):
      return jax.lax.cond(a.sum() > 0, lambda: a @ a @ a, lambda: a + b)
    self.assertEqual(_count(fn, _zeros(4, 4), _zeros(4, 4)),
                     flops.Count(2 * 2 * 4**3, exact=False))

  def test_a_platform_chosen_cond_counts_its_default_branch(self):
    # As fedkd's CPU Winograd convolution counts as the direct one.
    fn = lambda a: jax.lax.platform_dependent(
        a, cpu=lambda a: a @ a @ a, default=lambda a: a @ a.T)
    self.assertEqual(_exact(fn, _zeros(4, 4)), 2 * 4**3)

  def test_a_cond_of_equal_branches_is_exact(self):
    def fn(a, b):
      return jax.lax.cond(a.sum() > 0, lambda: a @ b, lambda: b @ a)
    self.assertEqual(_exact(fn, _zeros(4, 4), _zeros(4, 4)), 2 * 4**3)

  def test_a_while_loop_counts_its_body_once_as_a_guess(self):
    def fn(a):
      return jax.lax.while_loop(lambda c: c[0, 0] < 10, lambda c: c @ a, a)
    self.assertEqual(_count(fn, _zeros(4, 4)),
                     flops.Count(2 * 4**3, exact=False))

  def test_a_while_loop_without_matmuls_is_exact(self):
    def fn(a):
      a = jax.lax.while_loop(lambda c: c[0, 0] < 10, lambda c: c + 1, a)
      return a @ a
    self.assertEqual(_exact(fn, _zeros(4, 4)), 2 * 4**3)

  def test_a_shard_map_counts_its_body_on_every_device(self):
    # The tests' 8 devices each multiply their [1, 4] rows by [4, 3]: the
    # same FLOPs as the unsplit [8, 4] x [4, 3].
    mesh = jax.make_mesh((8,), ('clients',))
    split = jax.sharding.PartitionSpec('clients')
    fn = jax.shard_map(lambda a, b: a @ b, mesh=mesh,
                       in_specs=(split, jax.sharding.PartitionSpec()),
                       out_specs=split)
    a = jax.device_put(_zeros(8, 4), jax.sharding.NamedSharding(mesh, split))
    self.assertEqual(_exact(jax.jit(fn), a, _zeros(4, 3)), 2 * 8 * 3 * 4)

  @parameterized.parameters(
      ('svd', lambda a: jnp.linalg.svd(a)[1]),
      # Its computations sit in a tuple, where the walk does not look.
      ('custom_linear_solve', lambda a: jax.lax.custom_linear_solve(
          lambda x: a @ x, a[:, 0], lambda mv, b: b)))
  def test_what_it_cannot_count_is_refused(self, name, fn):
    with self.assertRaisesRegex(NotImplementedError,
                                f'no FLOP count for {name}'):
      _count(fn, _zeros(3, 3))


class ModelsTest(parameterized.TestCase):

  @parameterized.parameters('seed_student', 'seed_teacher', 'mnist_2nn',
                            'mnist_cnn')
  def test_a_training_step_by_hand(self, name):
    step, params = training_step(models.get_model(name, 10), 10, SHAPES[name])
    self.assertEqual(_exact(step, params), 10 * training(LAYERS[name]))

  def test_resnet8_gn_training_step_by_hand(self):
    step, params = training_step(models.get_model('resnet8_gn', 10), 10,
                                 SHAPES['resnet8_gn'])
    self.assertIn(_exact(step, params),
                  [10 * training(LAYERS[f'resnet8_gn_{pad}'])
                   for pad in _STRIDED])

  @parameterized.parameters(
      # Outputs at 0 and 2, one pixel of padding after: 3 + 2 taps per axis.
      ('SAME', 5**2),
      # Rows: outputs at -1 and 1 (2 + 3 taps); columns: 0 and 2 (3 + 2).
      (((1, 0), (0, 1)), 5 * 5),
      # Rows as above; columns: one output, at 0 (3 taps).
      (((1, 1), (0, 0)), (2 + 3) * 3),
  )
  def test_strided_conv_layer_skips_padding_taps(self, padding, taps):
    # 3x3 kernel, stride 2, over 4x4 inputs of 3 channels, 4 outputs.
    conv = layers.Conv(4, (3, 3), (2, 2), padding)
    x = _zeros(1, 4, 4, 3)
    params = jax.eval_shape(conv.init, jax.random.PRNGKey(0), x)
    self.assertEqual(_exact(conv.apply, params, x), 2 * 3 * 4 * taps)

  @parameterized.parameters(*SHAPES)
  def test_close_to_xla_count_of_one_training_step(self, name):
    step, params = training_step(models.get_model(name, 10), 10, SHAPES[name])
    # Lowered for GPU (no GPU needed to lower): XLA's own dot and convolution
    # ops, whose count is the arithmetic the model needs. XLA also counts
    # activations, norms, the loss and the update.
    xla = jax.jit(step).trace(params).lower(
        lowering_platforms=('cuda',)).cost_analysis()['flops']
    self.assertBetween(xla / _exact(step, params), 1.0, 1.1)


if __name__ == '__main__':
  absltest.main()
