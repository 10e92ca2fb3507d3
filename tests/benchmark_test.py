"""Tests for experiments/benchmark.py: FLOP counts against hand counts and
XLA's, and a smoke run of every workload's arms (2 clients, 1 round)."""

import contextlib
import io
import json
import os
import re
import subprocess
import sys

from absl.testing import absltest
from absl.testing import flagsaver
from absl.testing import parameterized
import jax
import jax.numpy as jnp

from experiments import benchmark
from experiments import fedkd_cost
from experiments import profile_round
from fedkd import algorithms
from fedkd import layers
from fedkd import losses
from fedkd import models
import toys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
  import torch  # pylint: disable=unused-import
except ImportError:  # torch is the optional `bench` extra.
  torch = None

# Forward FLOPs of one example per layer, by hand. A 'SAME' k x k conv over
# an n x n map has k*n - 2 * (1 + ... + (k-1)/2) taps inside the input per
# axis: 5x5 on 28 (14): 134 (64); 3x3 on 32 (16, 8): 94 (46, 22).
# ResNet's stride-2 3x3 convs pad one pixel on each side (PyTorch's grid):
# (16 * 3)**2 taps if the model pads explicitly (jnp.pad: its zeros are
# input), (16 * 3 - 1)**2 if the conv pads (taps on padding do not count).
_STRIDED = {'explicit': lambda n: (n * 3)**2, 'conv': lambda n: (n * 3 - 1)**2}
_LAYERS = {
    'seed_student': [2 * 64 * 32, 2 * 32 * 10],
    'mnist_2nn': [2 * 784 * 200, 2 * 200 * 200, 2 * 200 * 10],
    'mnist_cnn': [2 * 1 * 32 * 134**2, 2 * 32 * 64 * 64**2,
                  2 * 7 * 7 * 64 * 512, 2 * 512 * 10],
}
for _pad, _strided in _STRIDED.items():
  # Stem; block 1: two 3x3; blocks 2 and 3: the stride-2 3x3, a 3x3, the
  # 1x1 shortcut; the dense layer.
  _LAYERS[f'resnet8_gn_{_pad}'] = [
      2 * 3 * 16 * 94**2, 2 * 16 * 16 * 94**2, 2 * 16 * 16 * 94**2,
      2 * 16 * 32 * _strided(16), 2 * 32 * 32 * 46**2, 2 * 16 * 32 * 16**2,
      2 * 32 * 64 * _strided(8), 2 * 64 * 64 * 22**2, 2 * 32 * 64 * 8**2,
      2 * 64 * 10]


def _training(layers_flops):
  """Hand count: 3 forwards, less the first layer's input gradient."""
  return 3 * sum(layers_flops) - layers_flops[0]


class FlopsTest(parameterized.TestCase):

  @parameterized.parameters(
      ('seed_student', (8, 8, 1)), ('mnist_2nn', (28, 28, 1)),
      ('mnist_cnn', (28, 28, 1)))
  def test_layers_by_hand(self, name, shape):
    model = models.get_model(name, 10)
    self.assertEqual(benchmark.layer_flops(model, shape), _LAYERS[name])
    self.assertEqual(benchmark.training_flops(model, shape),
                     _training(_LAYERS[name]))

  def test_resnet8_gn_layers_by_hand(self):
    model = models.get_model('resnet8_gn', 10)
    self.assertIn(benchmark.layer_flops(model, (32, 32, 3)),
                  [_LAYERS[f'resnet8_gn_{pad}'] for pad in _STRIDED])

  @parameterized.parameters(
      # Outputs at 0 and 2, one pixel of padding after: 3 + 2 taps per axis.
      ('SAME', 5**2),
      # Rows: outputs at -1 and 1 (2 + 3 taps); columns: 0 and 2 (3 + 2).
      (((1, 0), (0, 1)), 5 * 5),
      # Rows as above; columns: one output, at 0 (3 taps).
      (((1, 1), (0, 0)), (2 + 3) * 3),
  )
  def test_strided_conv_skips_padding_taps(self, padding, taps):
    # 3x3 kernel, stride 2, over 4x4 inputs of 3 channels, 4 outputs.
    conv = layers.Conv(4, (3, 3), (2, 2), padding)
    self.assertEqual(benchmark.layer_flops(conv, (4, 4, 3)),
                     [2 * 3 * 4 * taps])

  @parameterized.parameters(
      ('seed_teacher', (8, 8, 1)), ('mnist_2nn', (28, 28, 1)),
      ('mnist_cnn', (28, 28, 1)), ('resnet8_gn', (32, 32, 3)))
  def test_close_to_xla_count_of_one_training_step(self, name, shape):
    model = models.get_model(name, 10)
    x = jnp.zeros((10, *shape))
    y = jnp.zeros((10,), jnp.int32)

    def step(params):
      grads = jax.grad(lambda p: jnp.mean(
          losses.cross_entropy(model.apply(p, x), y)))(params)
      return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    # Lowered for GPU (no GPU needed to lower): XLA's own dot and convolution
    # ops, whose count is the arithmetic the model needs. fedkd's CPU kernels
    # (Dense's outer products) count differently.
    xla = jax.jit(step).trace(params).lower(
        lowering_platforms=('cuda',)).cost_analysis()['flops']
    # XLA also counts activations, norms, the loss and the update.
    ratio = xla / (10 * benchmark.training_flops(model, shape))
    self.assertBetween(ratio, 1.0, 1.1)


class WorkloadsTest(parameterized.TestCase):

  def _check_row(self, row, num_clients, flops_per_example, examples, *,
                 timed_torch):
    for arm in ('vmapped_s', 'loop_s') + (('torch_s',) if timed_torch else ()):
      self.assertGreater(row[arm], 0.0, msg=arm)
    self.assertAlmostEqual(row['loop_over_vmapped'],
                           row['loop_s'] / row['vmapped_s'])
    if timed_torch:
      self.assertAlmostEqual(row['torch_over_vmapped'],
                             row['torch_s'] / row['vmapped_s'])
      self.assertEqual(row['torch_s'], min(row['torch_s_by_threads'].values()))
    else:
      self.assertIsNone(row['torch_s'])
    self.assertEqual(row['clients'], num_clients)
    self.assertAlmostEqual(row['gflops_per_round'],
                           flops_per_example * examples * num_clients / 1e9)
    self.assertAlmostEqual(row['vmapped_gflop_s'],
                           row['gflops_per_round'] / row['vmapped_s'])

  @parameterized.parameters(
      ('cnn_fedavg', ['mnist_cnn']),
      ('cnn_kd', ['mnist_2nn', 'mnist_cnn']),
      ('cnn_fedkd', ['mnist_2nn', 'mnist_cnn']),
      ('resnet8', None))
  def test_arms_run(self, name, trained):
    toys.full_or(self, name == 'cnn_fedavg')
    # One local step per client keeps the smoke run cheap.
    workload = benchmark.WORKLOADS[name]._replace(examples=10)
    row = benchmark.benchmark(name, workload, 2, rounds=1, peak=1.0,
                              loop=True, torch_threads=[1] if torch else [])
    per_example = (
        sum(_training(_LAYERS[model]) for model in trained) if trained
        else benchmark.training_flops(models.get_model('resnet8_gn', 10),
                                      (32, 32, 3)))  # checked by hand above
    # PyTorch has FedAvg and local KD only.
    self._check_row(row, 2, per_example, 10,
                    timed_torch=torch is not None and not workload.algorithm)
    table = benchmark.markdown_table([row]).splitlines()
    self.assertLen(table, 3)
    self.assertEqual(table[0].count('|'), table[2].count('|'))

  def test_table_ratios_keep_two_decimals(self):
    # 2.93 s against 2.0 s is 1.465x: short of 1.5x, whatever one decimal
    # would print.
    row = dict(clients=50, vmapped_s=2.0, compile_s=3.0, loop_s=2.93,
               torch_s=2.93, torch_threads=2, loop_over_vmapped=2.93 / 2.0,
               torch_over_vmapped=2.93 / 2.0, gflops_per_round=249.0,
               vmapped_gflop_s=124.5, matmul_peak_gflop_s=249.0)
    cells = benchmark.markdown_table([row]).splitlines()[2].split(' | ')
    self.assertEqual(cells[5:7], ['1.47x', '1.47x'])
    self.assertEqual(cells[-1], '50.0% |')

  def test_heterogeneous_feddf_arms_run(self):
    toys.full_or(self, False)  # a minute of compiling; the round is tested
    # Three clients, one of each architecture; PyTorch has no FedDF arm.
    workload = benchmark.WORKLOADS['feddf_hetero']._replace(examples=10)
    row = benchmark.benchmark('feddf_hetero', workload, 3, rounds=1,
                              peak=1.0, loop=True, torch_threads=[1])
    on_8x8 = [[2 * 64 * 32, 2 * 32 * 10],  # seed_student
              [2 * 64 * 64, 2 * 64 * 32, 2 * 32 * 10],  # seed_teacher
              [2 * 64 * 200, 2 * 200 * 200, 2 * 200 * 10]]  # mnist_2nn
    per_client = sum(_training(f) for f in on_8x8) / 3
    self._check_row(row, 3, per_client, 10, timed_torch=False)

  @parameterized.parameters(*algorithms.ALGORITHMS)
  def test_every_algorithm_arms_run(self, name):
    # Built by experiments/builder as the CLI builds it. fd by default (its
    # private models go through the loop's per-client state; 6 s against
    # fedmd's 11), the rest in full mode.
    toys.full_or(self, name == 'fd')
    workload = benchmark.WORKLOADS[f'mlp_{name}']._replace(examples=10)
    row = benchmark.benchmark(f'mlp_{name}', workload, 2, rounds=1, peak=1.0,
                              loop=True, torch_threads=[1])
    trained = [_LAYERS['seed_student']] + (
        [[2 * 64 * 64, 2 * 64 * 32, 2 * 32 * 10]]  # the seed teacher
        if name in algorithms.PRIVATE_TEACHERS else [])
    self._check_row(row, 2, sum(map(_training, trained)), 10,
                    timed_torch=False)

  def test_algorithms_stands_for_every_algorithms_workload(self):
    self.assertEqual(
        benchmark.check_workloads(['mlp', 'algorithms']),
        ['mlp'] + [f'mlp_{name}' for name in algorithms.ALGORITHMS])
    with self.assertRaisesRegex(Exception, 'unknown workloads'):
      benchmark.check_workloads(['algorithms', 'mlp_fedsgd'])
    # A workload named twice, or in a group too, is timed once.
    self.assertEqual(
        benchmark.check_workloads(['mlp_fd', 'algorithms', 'mlp', 'mlp']),
        ['mlp_fd'] + [f'mlp_{name}' for name in algorithms.ALGORITHMS
                      if name != 'fd'] + ['mlp'])

  def test_cnn_algorithms_is_every_algorithm_at_cnn_fedavgs_shape(self):
    names = benchmark.check_workloads(['cnn_algorithms'])
    hand_built = {'cnn_fedavg': 'fedavg', 'cnn_kd': 'local_kd'}
    self.assertCountEqual(
        [benchmark.WORKLOADS[n].algorithm or hand_built[n] for n in names],
        algorithms.ALGORITHMS)
    for name in names:
      workload = benchmark.WORKLOADS[name]
      self.assertEqual((workload.input_shape, workload.examples,
                        workload.clients), ((28, 28, 1), 80, (50,)), name)
      private = ((workload.algorithm or hand_built[name])
                 in algorithms.PRIVATE_TEACHERS)
      self.assertEqual((workload.student, workload.teacher),
                       ('mnist_2nn', 'mnist_cnn') if private
                       else ('mnist_cnn', None), name)

  def test_json_only_prints_one_parsable_line(self):
    # The interface experiments/scaling.py reads; (c) with each thread count;
    # 2 clients a round of a population of 4, two local epochs.
    out = io.StringIO()
    with flagsaver.flagsaver(workload=['mlp'], clients=['2'], population=4,
                             rounds=1, epochs=2, json_only=True,
                             torch_threads=['1', '2']), \
        contextlib.redirect_stdout(out):
      benchmark.main([])
    (line,) = out.getvalue().splitlines()
    (row,) = json.loads(line)
    self.assertEqual((row['workload'], row['epochs']), ('mlp', 2))
    # Seed teacher and student, 50 examples per client, each trained twice.
    teacher = _training([2 * 64 * 64, 2 * 64 * 32, 2 * 32 * 10])
    self._check_row(row, 2, teacher + _training(_LAYERS['seed_student']),
                    2 * 50, timed_torch=torch is not None)
    # 4 x 50 examples of 64 float32 features and an int32 label, split over
    # the tests' 8 devices.
    self.assertEqual(row['population'], 4)
    self.assertTrue(row['shard_data'])
    self.assertEqual(row['examples_mib_per_device'],
                     4 * 50 * (64 + 1) * 4 / 8 / 2**20)
    if torch:
      self.assertSameElements(row['torch_s_by_threads'], ['1', '2'])
      self.assertEqual(row['torch_s_by_threads'][str(row['torch_threads'])],
                       row['torch_s'])

  def test_chunk_rounded_up_to_the_groups_and_devices(self):
    # A chunk of 5 fits neither 2 client groups nor the tests' 8 devices: it
    # becomes 16 (2 x 8), as a run rounds it, not a ValueError of the round.
    num_clients = 32
    data = toys.toy_data([3] * num_clients)
    alg = toys.algorithms(num_clients, epochs=1, client_models=(
        toys.teacher(), toys.teacher()))['local_kd']  # two groups
    run, _, _, chunk = benchmark.compiled_round(
        alg, toys.init_state(alg), data, clients_per_chunk=5)
    self.assertEqual(chunk, 16)
    run()

  def test_unknown_workload(self):
    with flagsaver.flagsaver(workload=['mlp', 'vgg']):
      with self.assertRaisesRegex(Exception, 'unknown workloads'):
        benchmark.main([])


class ProfileRoundTest(absltest.TestCase):

  def test_the_rounds_ops_with_the_layers_they_came_from(self):
    # On one device, as a user runs it (the tests' 8 devices partition the
    # round, and XLA drops the metadata of the partitioned dots).
    out = subprocess.run(
        [sys.executable, '-m', 'experiments.profile_round', '--workload=mlp',
         '--clients=2', '--rounds=1', '--top=1000'],
        env=toys.subprocess_env(devices=1), cwd=_REPO, capture_output=True,
        text=True, timeout=300, check=True).stdout
    lines = out.splitlines()
    total = float(re.search(r': ([\d.]+) ms of ops per round', out)[1])
    rows = [[cell.strip() for cell in line.split('|')[1:-1]]
            for line in lines if re.match(r'\| \d', line)]
    self.assertNotEmpty(rows)
    # Every op is listed (top=1000): the rows add up to the total.
    self.assertAlmostEqual(sum(float(r[0]) for r in rows), total, delta=1)
    # The Dense layers' forward dots, once per local step (2 clients x 50
    # examples / B=10: 5 steps, the clients vmapped into one op), emitted by
    # fedkd.layers.dense.
    dense = [runs for _, runs, _, source, _ in rows if re.search(
        r'closed_call/jvp\(MLP\)/Dense_\d/dot_general$', source)]
    self.assertNotEmpty(dense, rows)
    self.assertTrue(all(int(runs) == 5 for runs in dense), rows)
    self.assertTrue(any(re.fullmatch(r'layers\.py:\d+ dense', code)
                        for *_, code in rows), rows)

  def test_a_fusion_is_named_after_the_dot_it_holds(self):
    # Trimmed from a cnn_fedavg round: XLA names the fusion after its root
    # (max_pool's gradient), but its time is the Dense layer's dot.
    hlo = """
%fused_computation.7 (param_2.7: f32[5,10,512], param_3: f32[5,3136,512]) -> f32[5,10,7,7,64] {
  %param_2.7 = f32[5,10,512]{2,1,0} parameter(0)
  %param_3 = f32[5,3136,512]{2,1,0} parameter(1)
  %dot_general.77 = f32[5,10,3136]{2,1,0} dot(%param_2.7, %param_3), lhs_batch_dims={0}, metadata={op_name="jit(apply)/transpose(jvp(MnistCNN))/Dense_0/dot_general"}
  ROOT %reduce_sum.221 = f32[5,10,7,7,64]{4,3,2,1,0} reduce(%dot_general.77), metadata={op_name="jit(apply)/jvp(MnistCNN)/reduce_sum"}
}

%fused_computation.8 (param_0: f32[4]) -> f32[4] {
  ROOT %param_0 = f32[4]{0} parameter(0)
}

ENTRY %main.1 (a: f32[5,10,512], b: f32[5,3136,512], c: f32[4]) -> f32[5,10,7,7,64] {
  %ynn_fusion.7 = f32[5,10,7,7,64]{4,3,2,1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.7, metadata={op_name="jit(apply)/jvp(MnistCNN)/reduce_sum"}
  %copy_fusion = f32[4]{0} fusion(%c), kind=kLoop, calls=%fused_computation.8
}
"""
    self.assertEqual(profile_round.principal_ops(hlo),
                     {'ynn_fusion.7': 'dot_general.77'})
    self.assertEqual(profile_round.op_sources(hlo)['dot_general.77'],
                     'transpose(jvp(MnistCNN))/Dense_0/dot_general')

  def test_unknown_workload(self):
    with flagsaver.flagsaver(workload=['vgg']):
      with self.assertRaisesRegex(Exception, 'unknown workloads'):
        profile_round.main([])


class FedkdCostTest(absltest.TestCase):

  def test_times_every_round_and_prints_fedkds_ratios(self):
    # A mentor other than the mentee adds FedAvg of the mentor.
    out = io.StringIO()
    with flagsaver.flagsaver(setups=['3:2:10'], mentor='logreg', rounds=1), \
        contextlib.redirect_stdout(out):
      fedkd_cost.main([])
    header, _, row = out.getvalue().splitlines()[-3:]
    cells = lambda line: [c.strip() for c in line.strip('|').split('|')]
    table = dict(zip(cells(header), cells(row)))
    self.assertEqual(list(table), [
        'clients', 'cohort', 'examples', 'fedavg s', 'fedavg_mentor s',
        'local_kd s', 'fedkd s', 'fedkd/fedavg', 'fedkd/fedavg_mentor',
        'fedkd/local_kd'])
    self.assertEqual([table[c] for c in ('clients', 'cohort', 'examples')],
                     ['3', '2', '10'])
    for cell in list(table)[3:]:
      self.assertGreater(float(table[cell].rstrip('x')), 0, msg=cell)

  def test_epochs_reach_every_compared_round(self):
    compared = fedkd_cost.workloads('mnist_cnn', 10, epochs=3)
    self.assertEqual({w.epochs for w in compared.values()}, {3})

  def test_ratios_are_fedkds_round_over_each_other(self):
    self.assertEqual(
        fedkd_cost.ratios({'fedavg': 0.5, 'local_kd': 2.0, 'fedkd': 3.0}),
        {'fedkd/fedavg': 6.0, 'fedkd/local_kd': 1.5})

  def test_a_malformed_setup_is_a_usage_error(self):
    for setup in ('50:10', '10:20:5', '10:5:0', 'a:b:c'):
      with flagsaver.flagsaver(setups=[setup]), self.assertRaisesRegex(
          Exception, 'is not clients:cohort:examples'):
        fedkd_cost.main([])


if __name__ == '__main__':
  absltest.main()
