"""The README's Python example runs as written, and what the README says of
the commands, flags, config fields, files and names is what the code has."""

import ast
import configparser
import contextlib
import glob
import io
import os
import re
import shutil
import tempfile

from absl.testing import absltest
from flax import serialization
import jax

from experiments import benchmark
from experiments import builder
from experiments import compare
from experiments import runner
from experiments.configs import default
from fedkd import algorithms
from fedkd import models
from fedkd import optimizers
from fedkd import partition
from fedkd.algorithms.fedkd import LOSS_SCALES
from fedkd.algorithms.fedkd import WEIGHTINGS
from fedkd.errors import FedkdError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

with open(os.path.join(ROOT, 'README.md')) as _f:
  README = _f.read()


def _section(start: str, end: str) -> str:
  """The README's text from `start` up to the next `end`."""
  head = README.index(start)
  return README[head:README.index(end, head + len(start))]


def _words(text: str) -> set[str]:
  """The single words the text sets in backticks."""
  return set(re.findall(r'`(\w+)`', text))


_FIELDS = _section('Fields of `experiments/configs/default.py`:',
                   'Each evaluated round writes')


def _field_rows() -> dict[str, str]:
  """The Usage section's field table: field name -> its meaning cell."""
  rows = {}
  for line in _FIELDS.splitlines():
    if line.startswith('| `'):
      names, _, meaning = line.strip('|').split(' | ', 2)
      for name in re.findall(r'`(\w+)`', names):
        rows[name] = meaning
  return rows


def _field_defaults() -> dict[str, str]:
  """The field table's defaults as written: field name -> value."""
  out = {}
  for line in _FIELDS.splitlines():
    if line.startswith('| `'):
      names, values, _ = line.strip('|').split(' | ', 2)
      names = re.findall(r'`(\w+)`', names)
      values = [v.strip().strip('`') for v in values.split(', ')]
      assert len(names) == len(values), line
      out.update(zip(names, values))
  return out


def _shell_commands() -> list[tuple[str, str]]:
  """(script, arguments) of every command of the README and of the config
  docstrings that runs a script of experiments/."""
  body = re.sub(r'```.*?```', '', README, flags=re.DOTALL)
  texts = re.findall(r'```bash\n(.*?)```', README, re.DOTALL)
  texts += re.findall(r'`([^`]+)`', body)
  for path in glob.glob(os.path.join(ROOT, 'experiments', 'configs', '*.py')):
    with open(path) as f:
      texts.append(ast.get_docstring(ast.parse(f.read())) or '')
  commands = []
  for text in texts:
    text = ' '.join(text.replace('\\\n', ' ').split())
    for m in re.finditer(r'python3? (?:-m experiments\.(\w+)|experiments/'
                         r'(\w+)\.py)((?: --\S+)*)', text):
      commands.append((m.group(1) or m.group(2), m.group(3)))
  return commands


def _script_flags(script: str) -> set[str]:
  """The flags `experiments/<script>.py` defines (or takes from the
  benchmark), read from its source: their modules cannot all be imported
  into one process (scaling's flags have the benchmark's names)."""
  def defined(name):
    with open(os.path.join(ROOT, 'experiments', f'{name}.py')) as f:
      source = f.read()
    return set(re.findall(r"DEFINE_\w+\(\s*'(\w+)'", source)), source
  names, source = defined(script)
  if script in ('profile_round', 'fedkd_cost'):
    names |= defined('benchmark')[0]
  if script == 'fedkd_cost':  # the benchmark's flags it refuses
    tree = ast.parse(source)
    refused = next(node.value for node in ast.walk(tree)
                   if isinstance(node, ast.Assign)
                   and getattr(node.targets[0], 'id', '') == '_NOT_HERE')
    names -= set(ast.literal_eval(refused))
  if script == 'main':
    names.add('config')
  return names


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


class FinalModelTest(absltest.TestCase):
  """The Final model paragraph's keys are those a run's params have."""

  def _restored_keys(self, **changes):
    config = default.get_config('smoke')
    config.update(algorithm='feddf', **changes)
    built = builder.build(config, (8, 8, 1), 10, 20)
    state = built.algorithm.init(
        built.init_params(jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
    restored = serialization.msgpack_restore(
        serialization.to_bytes(state.params))
    return set(restored)

  def test_feddf_keys(self):
    text = _section('**Final model.**', '**TensorBoard.**')
    self.assertEqual(self._restored_keys(server_model='mnist_2nn'),
                     {'client', 'server'})
    self.assertIn("`params['client']`", text)
    self.assertIn("`params['server']`", text)
    self.assertEqual(
        self._restored_keys(client_models='seed_student,mnist_2nn'),
        {'0', '1'})
    self.assertIn("`params['i']`", text)


class ConfigTableTest(absltest.TestCase):
  """The Usage section's table of config fields."""

  def test_every_field_is_documented_with_its_default(self):
    config = default.get_config()
    written = _field_defaults()
    self.assertEmpty(set(written) - set(config), 'not config fields')
    # The synthetic_* fields are described in the `dataset` row.
    dataset = _field_rows()['dataset']
    for field in config:
      if field not in written:
        self.assertIn(f'`{field}`', dataset)
        continue
      value, text = config[field], written[field]
      with self.subTest(field):
        if value is None:
          self.assertEqual(text, 'unset')
        elif isinstance(value, str):
          self.assertEqual(text, repr(value) if not value else value)
        else:
          self.assertEqual(ast.literal_eval(text), value)
          self.assertIs(type(ast.literal_eval(text)) is bool,
                        type(value) is bool)

  def test_choices_are_the_codes(self):
    rows = _field_rows()
    fields = set(default.get_config())
    choices = {
        'partition': partition.METHODS,
        'client_optimizer': optimizers.CLIENT_OPTIMIZERS,
        'server_optimizer': optimizers.OPTIMIZERS,
        'fedkd_loss_scale': LOSS_SCALES,
        'fedkd_weighting': WEIGHTINGS,
    }
    for field, expected in choices.items():
      with self.subTest(field):
        self.assertEqual(
            _words(rows[field]) - fields - set(algorithms.ALGORITHMS),
            set(expected))
    # Which algorithms take DP and several client architectures.
    for field, expected in (('dp_clip_norm', algorithms.DP_ALGORITHMS),
                            ('client_models', algorithms.HETEROGENEOUS)):
      with self.subTest(field):
        self.assertEqual(_words(rows[field]) & set(algorithms.ALGORITHMS),
                         set(expected))

  def test_models_are_the_registered_ones(self):
    named = _words(_field_rows()['teacher']) - set(default.get_config())
    refused = {'resnet8', 'resnet20'}
    self.assertEqual(named - refused, set(models.MODEL_NAMES))
    for name in refused & named:
      with self.assertRaisesRegex(FedkdError, 'BatchNorm'):
        models.check_name(name)

  def test_algorithm_table_lists_every_algorithm(self):
    table = _section('| `algorithm` | paper |', '\n\n').split('\n', 1)[1]
    names = re.findall(r'^\| `(\w+)` \|', table, re.MULTILINE)
    self.assertCountEqual(names, algorithms.ALGORITHMS)

  def test_resumable_fields_are_the_runners(self):
    text = _section('A resumed run may', 'Any other')
    named = _words(text) & set(default.get_config())
    self.assertEqual(named, runner.resumable({})['may_change'])


class CommandsTest(absltest.TestCase):
  """Every command shown names a script, flags and fields that exist."""

  def test_commands_name_existing_flags_fields_and_workloads(self):
    commands = _shell_commands()
    self.assertGreater(len(commands), 20)
    fields = set(default.get_config())
    workloads = set(benchmark.WORKLOADS) | set(benchmark.GROUPS)
    for script, args in commands:
      with self.subTest(f'{script}{args}'):
        self.assertTrue(os.path.exists(
            os.path.join(ROOT, 'experiments', f'{script}.py')))
        flags = _script_flags(script)
        for arg in args.split():
          name, _, value = arg[2:].partition('=')
          if name.startswith('config.'):
            self.assertIn(name.removeprefix('config.'), fields)
          else:
            self.assertIn(name, flags)
          if name == 'config':
            path, _, variant = value.partition(':')
            self.assertTrue(os.path.exists(os.path.join(ROOT, path)), path)
            self._loads(path, variant)
          if name == 'workload':
            self.assertContainsSubset(value.split(','), workloads)

  def test_flags_shown_alone_exist(self):
    # `--flag=...` spans in the prose, for main.py or another script.
    body = re.sub(r'```.*?```', '', README, flags=re.DOTALL)
    every = set().union(*(_script_flags(s) for s in (
        'main', 'benchmark', 'scaling', 'fedkd_cost', 'fedprox_fig1',
        'profile_round')))
    fields = set(default.get_config())
    workloads = set(benchmark.WORKLOADS) | set(benchmark.GROUPS)
    for span in re.findall(r'`(--[^`]+)`', body):
      for arg in span.split():
        name, _, value = arg[2:].partition('=')
        if name.startswith('xla_') or name in ('config.FIELD',):
          continue  # XLA's own flags; the placeholder
        with self.subTest(arg):
          if name.startswith('config.'):
            self.assertIn(name.removeprefix('config.'), fields)
          else:
            self.assertIn(name, every)
          if name == 'workload':
            self.assertContainsSubset(value.split(','), workloads)

  def _loads(self, path, variant):
    module = os.path.splitext(path)[0]  # relative to the root
    config = __import__(module.replace('/', '.'), fromlist=['get_config'])
    config.get_config(variant or None)


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


class CompareLayoutTest(absltest.TestCase):

  def test_sub_run_directories_are_the_readmes(self):
    text = ' '.join(_section('## Comparing algorithms', '## Speed').split())
    several, one = re.search(
        r'in `WORKDIR/(\S+)` \(`WORKDIR/(\S+)` with one seed\)',
        text).groups()
    for num_seeds, pattern in ((3, several), (1, one)):
      config = default.get_config()
      config.compare, config.num_seeds = 'fedavg,fd', num_seeds
      for name, seed, _, path in compare.sub_runs(config, 'W'):
        self.assertEqual(path, 'W/' + pattern.replace(
            'NAME', name).replace('S', str(seed)))


class RequirementsTest(absltest.TestCase):

  def test_requirements_txt_mirrors_setup_cfg(self):
    parser = configparser.ConfigParser()
    parser.read(os.path.join(ROOT, 'setup.cfg'))
    declared = parser['options']['install_requires'].split()
    with open(os.path.join(ROOT, 'requirements.txt')) as f:
      listed = [l.strip() for l in f if l.strip() and not l.startswith('#')]
    self.assertEqual(listed, declared)


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
