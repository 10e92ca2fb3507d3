"""The scripts beside main.py (benchmark, profile_round, fedkd_cost, scaling,
fedprox_fig1): one `error:` line and exit code 2 for bad input, before any
work or output, through `experiments/cli.py`.

The bad-input cases run through tests/cli_forkserver.py, one server per
script, each case in a forked child.
"""

import atexit
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import flagsaver
from absl.testing import parameterized

from experiments import benchmark
from experiments import cli
from fedkd.errors import FedkdError
import rundirs
import toys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Output paths of the cases: TMP/file is a file, TMP/out/ a directory that
# holds a previous scaling table.
TMP = tempfile.mkdtemp(prefix='fedkd_scripts_test_')
atexit.register(shutil.rmtree, TMP, ignore_errors=True)
# A scaling run beside the cases (scaling's flags clash with the
# benchmark's, so it cannot run in this process): one cell, 2 clients on 1
# device, split and copied being the same there, into a new directory.
TABLE = f'{TMP}_table/new/table'
atexit.register(shutil.rmtree, f'{TMP}_table', ignore_errors=True)
_SCALING_RUN = ['--clients=2', '--devices=1', '--rounds=1',
                '--shard_data=true,false', f'--out={TABLE}']
_ALGORITHM_CHOICE = 'choose from mlp, cnn_fedavg'
_NOT_POSITIVE = 'takes a comma-separated list of integers >= 1'
_TOO_LARGE = 'GiB, more than this machine\'s'

# (name, script, arguments, what the error line says).
BAD_INPUTS = (
    ('unknown_workload', 'benchmark', ['--workload=mlp,vgg'],
     f"unknown workloads ['vgg']; {_ALGORITHM_CHOICE}"),
    ('no_workload', 'benchmark', ['--workload='],
     f'--workload names none; {_ALGORITHM_CHOICE}'),
    ('zero_clients', 'benchmark', ['--clients=10,0'],
     f"--clients {_NOT_POSITIVE}, got '10,0'"),
    ('negative_clients', 'benchmark', ['--clients=-5'],
     f"--clients {_NOT_POSITIVE}, got '-5'"),
    ('clients_not_a_number', 'benchmark', ['--clients=ten'],
     f"--clients {_NOT_POSITIVE}, got 'ten'"),
    ('no_clients', 'benchmark', ['--clients='],
     f"--clients {_NOT_POSITIVE}, got ''"),
    ('too_many_clients', 'benchmark',
     ['--workload=mlp', '--clients=10000000000'],
     f'10,000,000,000 clients x 50 random examples of 8x8x1 need 121,071.9 '
     f'{_TOO_LARGE}'),
    ('too_large_population', 'benchmark',
     ['--workload=mlp', '--clients=2', '--population=10000000000'],
     f'10,000,000,000 clients x 50 random examples of 8x8x1 need 121,071.9 '
     f'{_TOO_LARGE}'),
    ('zero_rounds', 'benchmark', ['--rounds=0'],
     'flag --rounds=0: 0 is not a positive integer'),
    ('rounds_not_a_number', 'benchmark', ['--rounds=x'],
     "flag --rounds=x: invalid literal for int() with base 10: 'x'"),
    ('int32_epochs', 'benchmark', ['--workload=mlp', '--epochs=2147483648'],
     '--epochs=2147483648 makes 10,737,418,240 local steps a round; they '
     'must be < 2**31'),
    ('zero_torch_threads', 'benchmark', ['--torch_threads=1,0'],
     f"--torch_threads {_NOT_POSITIVE}, got '1,0'"),
    ('too_many_torch_threads', 'benchmark', ['--torch_threads=1,100000'],
     f'--torch_threads=1,100000: at most the {os.cpu_count()} CPU cores'),
    ('negative_population', 'benchmark', ['--population=-3'],
     'flag --population=-3: -3 is not a non-negative integer'),
    ('negative_chunk', 'benchmark', ['--clients_per_chunk=-1'],
     'flag --clients_per_chunk=-1: -1 is not a non-negative integer'),
    ('extra_argument', 'benchmark', ['--workload=mlp', 'cnn_kd'],
     "unexpected arguments ['cnn_kd']"),
    ('profile_unknown_workload', 'profile_round', ['--workload=vgg'],
     "unknown workloads ['vgg']"),
    ('profile_zero_clients', 'profile_round', ['--clients=0'],
     f"--clients {_NOT_POSITIVE}, got '0'"),
    ('profile_zero_top', 'profile_round', ['--top=0'],
     'flag --top=0: 0 is not a positive integer'),
    ('cost_no_setups', 'fedkd_cost', ['--setups='], '--setups is empty'),
    ('cost_bad_setup', 'fedkd_cost', ['--setups=50:10:80,a:b:c'],
     "--setups: 'a:b:c' is not clients:cohort:examples"),
    ('cost_unknown_mentor', 'fedkd_cost', ['--mentor=vgg'],
     "unknown model 'vgg'"),
    ('cost_huge_setup', 'fedkd_cost', ['--setups=10000000000:10:10'],
     f'10,000,000,000 clients x 10 random examples of 28x28x1 need '
     f'292,435.3 {_TOO_LARGE}'),
    ('cost_benchmark_only_flags', 'fedkd_cost',
     ['--clients=10', '--workload=mlp'],
     'fedkd_cost takes no --workload, --clients: it times arm (a) of each '
     '--setups entry'),
    ('scaling_zero_devices', 'scaling', ['--devices=1,0'],
     f"--devices {_NOT_POSITIVE}, got '1,0'"),
    ('scaling_no_clients', 'scaling', ['--clients='],
     f"--clients {_NOT_POSITIVE}, got ''"),
    ('scaling_bad_shard_data', 'scaling', ['--shard_data=yes'],
     "--shard_data takes true, false or true,false, got 'yes'"),
    ('scaling_no_shard_data', 'scaling', ['--shard_data='],
     "--shard_data takes true, false or true,false, got ''"),
    ('scaling_zero_rounds', 'scaling', ['--rounds=0'],
     'flag --rounds=0: 0 is not a positive integer'),
    ('scaling_out_is_a_directory', 'scaling', [f'--out={TMP}/out/'],
     f"--out='{TMP}/out/' names no file prefix"),
    ('scaling_out_under_a_file', 'scaling', [f'--out={TMP}/file/scaling'],
     f'--out: cannot create directory {TMP}/file (File exists)'),
    # One device here, CPU or not: --cpu=false does not split it.
    ('scaling_fewer_devices', 'scaling',
     ['--cpu=false', '--devices=2', '--clients=2', '--rounds=1',
      f'--out={TMP}/out/scaling'],
     '--devices=2: the benchmark saw 1 device(s); lower --devices'),
    # The benchmark's own line, from the process that runs the cell.
    ('scaling_cell_fails', 'scaling',
     ['--clients=10000000000', '--devices=1', f'--out={TMP}/out/scaling'],
     'the benchmark of 10000000000 clients on 1 device(s) failed: '
     '10,000,000,000 clients x 50'),
    ('fig1_no_alphas', 'fedprox_fig1', ['--alphas='], '--alphas is empty'),
    ('fig1_alpha_not_a_number', 'fedprox_fig1', ['--alphas=0,a'],
     '--alphas=a with --percents=0: both take numbers'),
    # Checked before the first panel runs.
    ('fig1_percent_above_100', 'fedprox_fig1', ['--percents=0,150'],
     '--alphas=0 with --percents=150: dropout_rate must be in [0, 1), got '
     '1.5'),
    ('fig1_negative_rounds', 'fedprox_fig1', ['--num_rounds=-1'],
     'flag --num_rounds=-1: -1 is not a non-negative integer'),
    ('fig1_out_is_a_file', 'fedprox_fig1', [f'--out={TMP}/file'],
     f'--out: cannot create directory {TMP}/file (File exists)'),
    ('fig1_no_out', 'fedprox_fig1', ['--out='], '--out is empty'),
    # Not the runs in the working directory.
    ('fig1_no_workdir', 'fedprox_fig1', ['--workdir='],
     '--workdir is required'),
    ('fig1_workdir_is_a_file', 'fedprox_fig1', [f'--workdir={TMP}/file'],
     f'workdir {TMP}/file exists and is not a directory'),
)


class BadInputTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    os.makedirs(f'{TMP}/out')
    for name in ('file', 'out/scaling.json', 'out/scaling.md'):
      with open(f'{TMP}/{name}', 'w') as f:
        f.write('a previous result\n')
    cls.before = rundirs.snapshot(TMP)
    servers = {}
    for script in sorted({case[1] for case in BAD_INPUTS}):
      # A case's own --workdir comes later, and wins.
      cases = [[f'--workdir={TMP}/workdir'] + args
               if script == 'fedprox_fig1' else args
               for _, s, args, _ in BAD_INPUTS if s == script]
      servers[script] = (subprocess.Popen(
          [sys.executable, 'tests/cli_forkserver.py', '2',
           f'experiments/{script}.py'], cwd=ROOT, env=toys.subprocess_env(),
          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True), cases)
    servers['scaling'][1].append(_SCALING_RUN)
    cls.results = {}
    for script, (server, cases) in servers.items():
      out, _ = server.communicate(json.dumps(cases), timeout=300)
      names = [name for name, s, _, _ in BAD_INPUTS if s == script]
      cls.results.update(zip(names + ['scaling_run'], json.loads(out)))

  @parameterized.named_parameters(
      (name, expected) for name, _, _, expected in BAD_INPUTS)
  def test_bad_input(self, expected):
    name = self._testMethodName.removeprefix('test_bad_input').lstrip('_')
    toys.assert_error_line(self, *self.results[name], expected)
    # No file or directory written, made or changed.
    self.assertEqual(rundirs.snapshot(TMP), self.before)

  def test_scaling_writes_the_table_of_its_cells(self):
    code, stderr = self.results['scaling_run']
    self.assertEqual(code, 0, stderr[-2000:])
    with open(TABLE + '.json') as f:
      (cell,) = json.load(f)
    self.assertEqual((cell['workload'], cell['clients'], cell['devices'],
                      cell['rounds'], cell['torch_s']), ('mlp', 2, 1, 1, None))
    with open(TABLE + '.md') as f:
      header, _, row = f.read().splitlines()
    self.assertEqual(len(header.split('|')), len(row.split('|')))
    self.assertStartsWith(row, '| 2 | 1 | - | ')
    self.assertGreater(os.path.getsize(TABLE + '.png'), 0)


class BenchmarkTest(absltest.TestCase):

  def test_says_why_torch_is_not_timed(self):
    # torch hidden, as where the `bench` extra is not installed.
    out = io.StringIO()
    with flagsaver.flagsaver(workload=['mlp'], clients=['2'], rounds=1,
                             loop=False), \
        mock.patch.dict(sys.modules, {'torch': None}), \
        contextlib.redirect_stdout(out):
      benchmark.main([])
    lines = out.getvalue().splitlines()
    self.assertIn('(c) not timed: torch is not installed', lines[0])
    (row,) = json.loads(lines[-1])
    self.assertEqual((row['torch_s'], row['torch_s_by_threads']), (None, {}))


class CheckSizeTest(absltest.TestCase):

  def test_the_examples_must_fit_in_memory(self):
    # 50 examples of 8x8x1 float32 features and an int32 label: 13,000
    # bytes a client.
    workload = benchmark.WORKLOADS['mlp']
    with mock.patch.object(benchmark.npzfile, 'memory_bytes',
                           return_value=10 * 13_000):
      benchmark.check_size(workload, 10)
      with self.assertRaisesRegex(FedkdError, '11 clients x 50 random'):
        benchmark.check_size(workload, 11)

  def test_a_clients_steps_must_fit_in_int32(self):
    # 5 batches of 10 a pass over 50 examples.
    workload = benchmark.WORKLOADS['mlp']
    benchmark.check_size(workload._replace(epochs=(2**31 - 1) // 5), 1)
    with self.assertRaisesRegex(FedkdError, '2,147,483,650 local steps'):
      benchmark.check_size(workload._replace(epochs=2**31 // 5 + 1), 1)

  def test_planned_runs_apply_epochs_and_clients(self):
    with flagsaver.flagsaver(clients=['3', '7'], epochs=4):
      ((name, workload, sizes),) = benchmark.planned_runs(['cnn_kd'])
    self.assertEqual((name, workload.epochs, sizes), ('cnn_kd', 4, [3, 7]))
    self.assertEqual(workload._replace(epochs=1),
                     benchmark.WORKLOADS['cnn_kd'])

  def test_positive_ints(self):
    self.assertEqual(cli.positive_ints('clients', ['1', '20']), [1, 20])
    for values in ([], ['0'], ['2', '-1'], ['1.5']):
      with self.assertRaisesRegex(FedkdError, 'integers >= 1'):
        cli.positive_ints('clients', values)


if __name__ == '__main__':
  absltest.main()
