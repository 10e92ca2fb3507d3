"""experiments/compare.py: seeds, mean +- std against numpy, labels, plots."""

import json
import os
import signal
from unittest import mock

from absl.testing import absltest
import jax
from jax.experimental.compilation_cache import compilation_cache
import numpy as np

from experiments import compare
from experiments import runner
from experiments.configs import default
from fedkd import train
from fedkd.errors import FedkdError


def _rows(accuracies, *, loss=1.0, teacher=None, total=1_000_000):
  return [dict(round=i + 1, accuracy=a, student_loss=loss,
               teacher_accuracy=teacher, cumulative_bytes=total * (i + 1))
          for i, a in enumerate(accuracies)]


class TableTest(absltest.TestCase):

  def test_figures_of_one_run(self):
    figures = compare.seed_figures(
        'fedkd', _rows([0.5, 0.9, 0.7], teacher=0.6), target=0.8)
    self.assertEqual(figures, dict(
        final_accuracy=0.7, best_accuracy=0.9, final_test_loss=1.0,
        rounds_to_target=2, total_bytes=3_000_000, private_accuracy=0.6))
    # fedavg has no private model; fd's teacher accuracy is its headline.
    for name in ('fedavg', 'fd'):
      self.assertIsNone(compare.seed_figures(
          name, _rows([0.5], teacher=0.5), target=0.8)['private_accuracy'])

  def test_mean_and_sample_std_over_seeds(self):
    # Seeds' final accuracies 0.5 and 0.7: mean 0.6, sample std
    # sqrt(((0.1)^2 + (0.1)^2) / 1) = 0.1414; only the second reaches 0.6.
    per_seed = [compare.seed_figures('local_kd', rows, target=0.6)
                for rows in (_rows([0.4, 0.5], teacher=0.8),
                             _rows([0.6, 0.7], teacher=0.9, loss=3.0))]
    table = compare.markdown_table(
        {'local_kd': compare.summarize(per_seed)}, 0.6, num_seeds=2)
    row = table.splitlines()[2]
    self.assertEqual(
        row, '| local_kd | global model | 0.6000 ± 0.1414 | 0.6000 ± 0.1414 '
        '| 2.0000 ± 1.4142 | 1.0 ± 0.0 (1/2 seeds) | 2.000 ± 0.000 | '
        '0.8500 ± 0.0707 (teachers) |')
    self.assertIn('(mean ± std, 2 seeds)', table.splitlines()[0])

  def test_local_model_accuracy_is_labelled(self):
    figures = [compare.seed_figures('fd', _rows([0.3], loss=None), 0.8)]
    row = compare.markdown_table({'fd': compare.summarize(figures)}, 0.8,
                                 num_seeds=1).splitlines()[2]
    self.assertEqual(row, '| fd | mean of local models | 0.3000 | 0.3000 | '
                     '- | not reached | 1.000 | - |')

  def test_each_architecture_has_its_column(self):
    # feddf reports its global models', local_kd its teachers' accuracies.
    feddf = _rows([0.5, 0.6])
    feddf[-1].update(accuracy_a=0.7, accuracy_b=0.5)
    local_kd = _rows([0.8], teacher=0.3)
    local_kd[-1].update(teacher_accuracy_a=0.2, teacher_accuracy_b=0.4)
    table = compare.markdown_table(
        {name: compare.summarize([compare.seed_figures(name, rows, 0.8)])
         for name, rows in (('feddf', feddf), ('local_kd', local_kd))},
        0.8, num_seeds=1)
    self.assertEqual(table.splitlines()[-4:], [
        '| algorithm (accuracy of) | a | b |', '| --- | ---: | ---: |',
        '| feddf (global models) | 0.7000 | 0.5000 |',
        '| local_kd (teachers) | 0.2000 | 0.4000 |'])
    # One architecture: no second table.
    self.assertLen(compare.markdown_table(
        {'fd': compare.summarize([compare.seed_figures(
            'fd', _rows([0.3]), 0.8)])}, 0.8, 1).splitlines(), 3)

  def test_line_styles_differ(self):
    styles = [compare.line_style(i) for i in range(8)]
    for key in ('linestyle', 'marker', 'color'):
      # Neighbours differ in every respect; all 8 differ in marker/colour.
      self.assertTrue(all(a[key] != b[key]
                          for a, b in zip(styles, styles[1:])), key)
    self.assertLen({(s['marker'], s['color']) for s in styles}, 8)
    # Earlier lines are wider, and every width stays positive.
    widths = [compare.line_style(i)['linewidth'] for i in range(20)]
    self.assertTrue(all(w > 0 for w in widths))
    self.assertGreater(widths[0], widths[1])

  def test_title(self):
    config = default.get_config()
    config.alpha, config.num_seeds = 0.1, 3
    self.assertEqual(compare.title(config), 'digits, Dirichlet alpha 0.1, '
                     '3 seeds')
    config.dataset, config.num_seeds = 'synthetic', 1
    self.assertEqual(compare.title(config), 'synthetic(1,1), seed 0')

  def test_num_seeds_must_be_positive(self):
    config = default.get_config()
    config.compare, config.num_seeds = 'fedavg', 0
    with self.assertRaisesRegex(FedkdError, 'num_seeds must be >= 1, got 0'):
      compare.sub_runs(config, '/nonexistent')


class CheckFirstTest(absltest.TestCase):
  """Every sub-run is checked, data and workdir included, before any runs."""

  def _refused(self, config, message):
    workdir = self.create_tempdir().full_path
    with open(os.path.join(workdir, 'fedprox'), 'w') as f:
      f.write('not a directory')
    with mock.patch.object(runner, 'run', side_effect=AssertionError('ran')):
      with self.assertRaisesRegex(FedkdError, message):
        compare.run(config, workdir)
    self.assertEqual(os.listdir(workdir), ['fedprox'])

  def test_workdir_of_a_single_run(self):
    config = default.get_config('smoke')
    config.compare = 'fedavg,fedprox'
    workdir = self.create_tempdir().full_path
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write('{}')
    with mock.patch.object(runner, 'run', side_effect=AssertionError('ran')):
      with self.assertRaisesRegex(FedkdError, r'holds a single run \('
                                  r'config.json\); a comparison'):
        compare.run(config, workdir)
    self.assertEqual(os.listdir(workdir), ['config.json'])

  def test_single_run_into_a_comparison_is_refused(self):
    layouts = {  # what a comparison leaves, finished or not
        'compare.md': 'compare.md', 'fedavg/config.json': 'fedavg',
        'fd/seed_3/config.json': 'fd/seed_3'}
    for made, named in layouts.items():
      with self.subTest(made):
        workdir = self.create_tempdir().full_path
        os.makedirs(os.path.dirname(os.path.join(workdir, made)),
                    exist_ok=True)
        with open(os.path.join(workdir, made), 'w') as f:
          f.write('{}')
        with self.assertRaisesRegex(
            FedkdError, rf'holds a comparison \({named}\); a single run'):
          compare.check_single_run_workdir(workdir)
    workdir = self.create_tempdir().full_path
    for name in ('config.json', 'metrics.jsonl', 'checkpoints/1/x'):
      os.makedirs(os.path.dirname(os.path.join(workdir, name)), exist_ok=True)
      with open(os.path.join(workdir, name), 'w') as f:
        f.write('{}')
    compare.check_single_run_workdir(workdir)  # a single run's: resumed
    compare.check_single_run_workdir(os.path.join(workdir, 'missing'))

  def test_bad_sub_workdir(self):
    config = default.get_config('smoke')
    config.compare = 'fedavg,fedprox'
    self._refused(config, r'fedprox exists and is not a directory')

  def test_model_that_cannot_take_the_data(self):
    path = os.path.join(self.create_tempdir().full_path, 'vectors.npz')
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.random((40, 5)), y_train=np.arange(40) % 3,
             x_test=rng.random((10, 5)), y_test=np.arange(10) % 3)
    config = default.get_config('smoke')
    # local_kd trains the teacher, a CNN; fedavg alone would run.
    config.update(compare='fedavg,local_kd', dataset=f'npz:{path}',
                  teacher='mnist_cnn', num_clients=4, clients_per_round=4)
    self._refused(config, "teacher 'mnist_cnn' cannot take examples")


class RunTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    # The second seed's round has the first one's shapes (iid split): a
    # persistent compilation cache serves it (5x less CPU time).
    flags = ('jax_compilation_cache_dir',
             'jax_persistent_cache_min_compile_time_secs',
             'jax_persistent_cache_min_entry_size_bytes')
    old = {f: getattr(jax.config, f) for f in flags}
    self.addCleanup(compilation_cache.reset_cache)
    self.addCleanup(lambda: [jax.config.update(f, v) for f, v in old.items()])
    for flag, value in zip(flags, (self.create_tempdir().full_path, 0, -1)):
      jax.config.update(flag, value)
    compilation_cache.reset_cache()

  def test_table_is_numpy_over_the_seeds_metrics_files(self):
    config = default.get_config()
    config.compare, config.num_seeds, config.seed = 'fedavg,fedprox', 2, 3
    config.partition, config.num_devices = 'iid', 1
    config.num_clients = config.clients_per_round = 5
    config.num_rounds, config.eval_every, config.local_epochs = 2, 1, 1
    workdir = self.create_tempdir().full_path
    compare.run(config, workdir)
    with open(os.path.join(workdir, 'compare.md')) as f:
      table = f.read().splitlines()
    with open(os.path.join(workdir, 'compare.json')) as f:
      summary = json.load(f)
    for line, name in zip(table[2:], ('fedavg', 'fedprox')):
      finals = []
      for seed in (3, 4):  # seed, seed + 1
        with open(os.path.join(workdir, name, f'seed_{seed}',
                               'metrics.jsonl')) as f:
          rows = [json.loads(l) for l in f]
        self.assertEqual(json.load(open(os.path.join(
            workdir, name, f'seed_{seed}', 'config.json')))['seed'], seed)
        finals.append(rows[-1]['accuracy'])
      expected = f'{np.mean(finals):.4f} ± {np.std(finals, ddof=1):.4f}'
      self.assertEqual(line.split(' | ')[2], expected, line)
      self.assertAlmostEqual(
          summary[name]['summary']['final_accuracy']['mean'],
          np.mean(finals))
    self.assertNotEqual(*summary['fedavg']['per_seed'])  # seeds differ
    self.assertEqual(summary['fedprox']['accuracy_of'], 'global model')
    for plot in ('accuracy_vs_round.png', 'accuracy_vs_bytes.png'):
      self.assertGreater(os.path.getsize(os.path.join(workdir, plot)), 1000)



class StopTest(absltest.TestCase):

  def test_signal_while_the_results_are_written_lets_them_finish(self):
    config = default.get_config('smoke')
    config.compare = 'fedavg,fedprox'
    workdir = self.create_tempdir().full_path
    title = compare.title

    def signalled(config):  # as the plots start
      os.kill(os.getpid(), signal.SIGINT)
      return title(config)

    # Where the comparison does not handle it, the signal does nothing here.
    self.addCleanup(signal.signal, signal.SIGINT,
                    signal.signal(signal.SIGINT, signal.SIG_IGN))
    with mock.patch.object(runner, 'check'), mock.patch.object(
        runner, 'run', return_value=_rows([0.5, 0.7])), mock.patch.object(
            compare, 'title', signalled):
      with self.assertRaises(train.Interrupted) as raised:
        compare.run(config, workdir)
    self.assertEqual(str(raised.exception), 'stopped by SIGINT after the '
                     'last round (2); the run is complete and saved')
    self.assertCountEqual(os.listdir(workdir), [
        'compare.md', 'compare.json', 'accuracy_vs_round.png',
        'accuracy_vs_bytes.png'])


if __name__ == '__main__':
  absltest.main()
