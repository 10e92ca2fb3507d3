"""Every config under experiments/configs runs its `:smoke` variant."""

import glob
import os
import subprocess
import sys

from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# default.py's smoke run is tested, with its output, in main_test.
CONFIGS = sorted(
    p for p in glob.glob(os.path.join(ROOT, 'experiments', 'configs', '*.py'))
    if os.path.basename(p) not in ('__init__.py', 'default.py'))


class SmokeConfigsTest(absltest.TestCase):

  def test_every_config_runs_two_rounds(self):
    self.assertLen(CONFIGS, 6)
    env = dict(os.environ, XLA_FLAGS='')
    runs = {}
    # Concurrently: most of each run is compilation, on its own process.
    for path in CONFIGS:
      workdir = self.create_tempdir().full_path
      runs[path] = workdir, subprocess.Popen(
          [sys.executable, 'experiments/main.py', f'--config={path}:smoke',
           f'--workdir={workdir}'], cwd=ROOT, env=env, text=True,
          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for path, (workdir, proc) in runs.items():
      out, err = proc.communicate(timeout=600)
      with self.subTest(os.path.basename(path)):
        self.assertEqual(proc.returncode, 0, err[-2000:])
        # Every paper config compares algorithms: a table per run.
        self.assertIn('| algorithm | final accuracy', out)
        self.assertTrue(os.path.exists(os.path.join(workdir, 'compare.md')))
        self.assertTrue(os.path.exists(
            os.path.join(workdir, 'accuracy_vs_bytes.png')))


if __name__ == '__main__':
  absltest.main()
