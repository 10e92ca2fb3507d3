"""Two processes on localhost (jax.distributed, gloo) == one process."""

import os
import socket
import subprocess
import sys

from absl.testing import absltest

import toys  # tests/ is on sys.path under pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ('--config=experiments/configs/default.py:smoke',
        '--config.num_clients=20', '--config.clients_per_round=10',
        '--config.checkpoint_every=1')


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(workdir, devices, *extra):
  env = toys.subprocess_env(devices)
  return subprocess.Popen(
      [sys.executable, 'experiments/main.py', *ARGS, f'--workdir={workdir}',
       *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


def _final_params(workdir):
  with open(os.path.join(workdir, 'final_params.msgpack'), 'rb') as f:
    return f.read()


class MultiHostTest(absltest.TestCase):

  def test_two_processes_match_one_process_with_as_many_devices(self):
    single = self.create_tempdir().full_path
    multi = self.create_tempdir().full_path
    address = f'127.0.0.1:{_free_port()}'
    procs = [_start(single, 2)] + [
        _start(multi, 1, '--config.num_processes=2',
               f'--config.process_id={i}',
               f'--config.coordinator_address={address}') for i in (0, 1)]
    for proc in procs:
      _, err = proc.communicate(timeout=600)
      self.assertEqual(proc.returncode, 0, err[-3000:])
    # Same mesh size, same cohorts, same client keys: the same bits.
    self.assertEqual(_final_params(multi), _final_params(single))
    self.assertTrue(os.path.isdir(os.path.join(multi, 'checkpoints', '2')))


if __name__ == '__main__':
  absltest.main()
