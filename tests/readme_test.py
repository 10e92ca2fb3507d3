"""The README's Python example runs as written, and what it says of the
files, modules and test counts is what there is."""

import ast
import contextlib
import glob
import io
import os
import re
import shutil
import tempfile

from absl.testing import absltest
from flax import serialization

from experiments import runner
from experiments.configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

with open(os.path.join(ROOT, 'README.md')) as _f:
  README = _f.read()


def _section(start: str, end: str) -> str:
  """The README's text from `start` up to the next `end`."""
  head = README.index(start)
  return README[head:README.index(end, head + len(start))]


class ReadmeTest(absltest.TestCase):

  def test_custom_algorithm_example_trains(self):
    blocks = re.findall(r'```python\n(.*?)```', README, re.DOTALL)
    self.assertLen(blocks, 1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      # pylint: disable-next=exec-used
      exec(compile(blocks[0], 'README.md', 'exec'), {})
    accuracy = float(re.search(r'accuracy after 5 rounds: ([\d.]+)',
                               out.getvalue()).group(1))
    # Ten balanced classes: chance is 0.1; 5 rounds of FedAvg reach ~0.4.
    self.assertGreater(accuracy, 0.25)


class CountsTest(absltest.TestCase):

  def test_bad_settings_count_is_main_tests(self):
    with open(os.path.join(ROOT, 'tests', 'main_test.py')) as f:
      tree = ast.parse(f.read())
    cases = next(node.value for node in tree.body
                 if isinstance(node, ast.Assign)
                 and getattr(node.targets[0], 'id', '') == 'BAD_INPUTS')
    written = int(re.search(r'`tests/main_test.py` tries (\d+) bad',
                            ' '.join(README.split())).group(1))
    self.assertEqual(written, len(cases.elts))

  def test_layout_names_every_module(self):
    layout = README[README.index('## Layout'):]
    for directory in ('fedkd', 'experiments'):
      for path in glob.glob(os.path.join(ROOT, directory, '*.py')):
        name = os.path.basename(path)
        if name != '__init__.py':
          self.assertRegex(layout, rf'\b{re.escape(name)}\b')
    # And names no module that is not there.
    for name in re.findall(r'(\w+)\.py\b', layout):
      self.assertTrue(
          glob.glob(os.path.join(ROOT, '*', f'{name}.py')), name)


class RunOutputTest(absltest.TestCase):
  """What a run writes, against the README's list of files and of the
  metrics.jsonl keys."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.runs = {}
    for name, overrides in (
        # Private teachers of two architectures: the per-model keys.
        ('local_kd', dict(client_models='seed_student,seed_teacher')),
        ('feddf', dict(public_examples=40)),  # server_distill_loss
    ):
      config = default.get_config('smoke')
      config.num_clients = config.clients_per_round = 4
      config.num_rounds = 1
      config.algorithm = name
      config.update(overrides)
      workdir = tempfile.mkdtemp(prefix=f'fedkd_readme_{name}_')
      cls.addClassCleanup(shutil.rmtree, workdir, ignore_errors=True)
      rows = runner.run(config, workdir, progress=False)
      cls.runs[name] = (workdir, rows)

  def test_workdir_holds_the_files_the_readme_names(self):
    row = _section('| `--workdir=DIR` |', '\n')
    for workdir, _ in self.runs.values():
      for entry in os.listdir(workdir):
        if entry.startswith('.'):  # the lock: see Reliability
          self.assertIn(f'`WORKDIR/{entry}`', README)
          continue
        is_dir = os.path.isdir(os.path.join(workdir, entry))
        self.assertIn(f'`{entry}{"/" if is_dir else ""}`', row)

  def test_final_params_read_back_as_the_readme_says(self):
    workdir, _ = self.runs['local_kd']
    with open(os.path.join(workdir, 'final_params.msgpack'), 'rb') as f:
      params = serialization.msgpack_restore(f.read())
    self.assertIn('params', params)  # the flax student's variables
    self.assertIn('`final_params.msgpack`', README)

  def test_every_metric_key_is_described(self):
    text = _section('Each evaluated round writes one JSON line', 'Bad input')
    described = set(re.findall(r'`([\w<>]+)`', text))
    for name, (_, rows) in self.runs.items():
      for key in rows[-1]:
        key = re.sub(r'accuracy_(seed_student|seed_teacher)$',
                     'accuracy_<model>', key)
        with self.subTest(f'{name}: {key}'):
          self.assertIn(key, described)


if __name__ == '__main__':
  absltest.main()
