"""`--config.FIELD` overrides read before ml_collections parses them."""

from absl.testing import absltest
import ml_collections

from experiments import overrides
from fedkd.errors import FedkdError


def _config():
  c = ml_collections.ConfigDict()
  c.chunk = ml_collections.config_dict.placeholder(int)
  c.rounds = 2
  c.group = ml_collections.ConfigDict({'width': 1})
  return c


class SplitUnsetsTest(absltest.TestCase):

  def test_the_last_override_decides(self):
    cases = [
        (['--config.chunk=none'], [], ['chunk']),
        (['--config.chunk', 'None', '--workdir=w'], ['--workdir=w'],
         ['chunk']),
        (['--config.chunk=4', '--config.chunk=NONE'], [], ['chunk']),
        (['--config.chunk=none', '--config.chunk=4'], ['--config.chunk=4'],
         []),
        (['--config.chunk=4'], ['--config.chunk=4'], []),
    ]
    for argv, kept, unset in cases:
      with self.subTest(argv=argv):
        self.assertEqual(overrides.split_unsets(['main.py', *argv], _config()),
                         (['main.py', *kept], unset))

  def test_fields_that_cannot_be_unset_are_left_to_their_parser(self):
    argv = ['main.py', '--config.rounds=none', '--config.group=none']
    self.assertEqual(overrides.split_unsets(argv, _config()), (argv, []))


class CheckPathsTest(absltest.TestCase):

  def test_a_field_of_a_setting_is_refused(self):
    for arg in ('--config.rounds.x=1', '--config.chunk.x.y',
                '--config.rounds.x'):
      with self.subTest(arg=arg), self.assertRaisesRegex(
          FedkdError, r'^--config\.\w+\.[\w.]+: (rounds|chunk) is one '
          'setting'):
        overrides.check_paths(['main.py', arg, '1'], _config())

  def test_groups_and_unknown_fields_pass(self):
    # An unknown field is left to ml_collections, whose message names it.
    overrides.check_paths(['main.py', '--config.group.width=2',
                           '--config.nope.x=1', '--config.rounds=3'],
                          _config())


class TidyListsTest(absltest.TestCase):

  def test_spaces_around_names_go(self):
    c = ml_collections.ConfigDict(
        {'compare': 'fedavg, fedkd ,fd', 'client_models': '', 'seed': 0})
    overrides.tidy_lists(c)
    self.assertEqual(c.compare, 'fedavg,fedkd,fd')
    self.assertEqual((c.client_models, c.seed), ('', 0))

if __name__ == '__main__':
  absltest.main()
