"""Model parameter counts (paper goldens) and the custom Dense gradient."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from fedkd import layers
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
  )
  def test_parameter_counts(self, name, shape, expected):
    model = models.get_model(name, 10)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)))
    self.assertEqual(models.num_params(params), expected)
    self.assertEqual(model.apply(params, jnp.zeros((3, *shape))).shape,
                     (3, 10))

  def test_mlp_flattens_any_input_shape(self):
    model = models.get_model('seed_student', 4)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))
    self.assertEqual(model.apply(params, jnp.ones((2, 5))).shape, (2, 4))

  def test_unknown_model(self):
    with self.assertRaisesRegex(FedkdError, 'unknown model'):
      models.get_model('resnet9000', 10)


class DenseGradientTest(parameterized.TestCase):

  @parameterized.parameters(1, 10, 16, 40)  # both sides of the batch cutoff
  def test_gradient_matches_plain_matmul(self, batch):
    kx, kk, kd = jax.random.split(jax.random.PRNGKey(batch), 3)
    x = jax.random.normal(kx, (3, batch, 7))
    kernel = jax.random.normal(kk, (3, 7, 5))
    bias = jnp.arange(5.0)
    target = jax.random.normal(kd, (3, batch, 5))

    def loss(f, x, kernel, bias, target):
      return jnp.sum(jnp.tanh(f(x, kernel, bias)) * target)

    def grads(f):  # vmapped over 3 "clients", as in a round
      g = jax.grad(loss, argnums=(1, 2, 3))
      return jax.vmap(lambda *a: g(f, *a), in_axes=(0, 0, None, 0))(
          x, kernel, bias, target)

    plain = grads(lambda x, k, b: x @ k + b)
    custom = grads(layers.dense)
    for a, b in zip(plain, custom):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


if __name__ == '__main__':
  absltest.main()
