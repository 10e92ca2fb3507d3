"""Seconds per round of FedKD against FedAvg and local KD, side by side.

    python -m experiments.fedkd_cost [--setups=50:10:80,50:50:80,1000:1000:20]
        [--mentor=mnist_2nn] [--rounds=3] [--epochs=1] [--clients_per_chunk=N]

Each setup is clients:cohort:examples per client, on MNIST-sized random data
(28x28x1, 10 classes), E=1 (or `--epochs`), B=10, SGD at 0.05, every
algorithm built from the default run config as `experiments/main.py` builds
it and compiled as a run compiles it (`benchmark.compiled_round`: every
visible device, chunks as a run chooses them unless `--clients_per_chunk`
says otherwise). The shared
model (FedKD's mentee, local KD's student) is mnist_2nn (784-200-200-10);
every client's private model (mentor, teacher) is `--mentor`. Timed in turn,
round by round (`benchmark.median_seconds`):

  fedavg         FedAvg of the mentee;
  fedavg_mentor  FedAvg of the mentor, when it is another model: what FedKD
                 stands in for, federating the large model itself;
  local_kd       the same two models as FedKD, no exchange but the student's
                 average and no compression;
  fedkd          local KD plus mutual distillation plus the SVD compression
                 of both directions.

so fedkd / local_kd is essentially the price of the compression. It prints
the median seconds of `--rounds` rounds and the ratios. The benchmark's
other flags (`--workload`, `--clients`, `--torch`, ...) are refused.

With mentor = mentee, a FedKD round trains two models a client and FedAvg
one, so it cannot cost less than about twice FedAvg's (local KD alone costs
1.6-2.1x below). FedKD's setting is a large mentor and a small mentee: it
federates the mentee instead of the large model, so the round to compare
with is FedAvg of the mentor. There, training the mentor dominates, and the
compression works on the small model's update only. Measured on the shared
2-core CPU, 2026-11-29, `--rounds=5` (seconds a round;
`docs/benchmarks/cpu_fedkd_cost_2026-11-29.log`):

    XLA_FLAGS=--xla_force_host_platform_device_count=2 \
    python -m experiments.fedkd_cost --mentor=mnist_cnn \
        --setups=50:50:80,50:10:80 --rounds=5

    setup      fedavg  fedavg_mentor  local_kd  fedkd  fedkd/ fedavg_mentor
    50:50:80   0.044   1.984          2.104     2.263         1.14x
    50:10:80   0.009   0.421          0.444     0.528         1.26x

and fedkd/local_kd 1.08x and 1.19x. With the 2NN as mentor too (one
device, `python -m experiments.fedkd_cost --rounds=5`):

    setup         fedavg  local_kd  fedkd  fedkd/fedavg  fedkd/local_kd
    50:10:80      0.009   0.019     0.062  6.8x          3.3x
    50:50:80      0.046   0.078     0.237  5.1x          3.0x
    1000:1000:20  0.326   0.520     1.959  6.0x          3.8x

The compression is then most of the round: each client's SVD of its
[784, 200] update costs about 1.5 ms at rank 20 (two local steps of 10
examples; 15 singular values kept) and 3.8 ms at rank 80 (eight; 53 kept),
vmapped or not (an upload's Gram matrix alone is 63 MFLOP, about what both
models' training on 20 examples costs). Of its time
(1000 uploads of rank 10, per-op profile), the Gram matrices take about a
third, `A V_r V_r^T` a quarter (a write of every client's [784, 200]
reconstruction, memory-bound), the subspace iteration and Rayleigh-Ritz
steps the rest. Taking the first block of eigenvectors out of the loop and
no longer zeroing or tracing over every Gram matrix took it from 2.2-2.4 to
1.7-1.8 ms an upload; fedkd at 1000:1000:20, alternating with the code
before: 2.09 and 1.83 s against 2.23 and 2.16 s.
"""

import os
import sys

from absl import flags

# pylint: disable=g-import-not-at-top,wrong-import-position
# The repository root, however the script is started.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import benchmark
from experiments import cli
from fedkd import models
from fedkd.errors import FedkdError
# pylint: enable=g-import-not-at-top,wrong-import-position

_SETUPS = flags.DEFINE_list('setups', ['50:10:80', '50:50:80', '1000:1000:20'],
                            'clients:cohort:examples triples to time.')
_MENTOR = flags.DEFINE_string(
    'mentor', 'mnist_2nn', "Every client's private model (FedKD's mentor, "
    "local KD's teacher); the shared one is mnist_2nn.")
FLAGS = flags.FLAGS  # also `experiments.benchmark`'s --rounds (default 3),
# --epochs (default 1) and --clients_per_chunk.
# The benchmark's flags that have no say here: --setups chooses the clients,
# and only arm (a) is timed, placed as a run places it.
_NOT_HERE = ('workload', 'clients', 'population', 'loop', 'torch',
             'torch_threads', 'json_only', 'shard_data')

INPUT_SHAPE, MENTEE = (28, 28, 1), 'mnist_2nn'


def workloads(mentor: str, examples: int,
              epochs: int = 1) -> dict[str, benchmark.Workload]:
  """The compared rounds, as benchmark workloads built from the run config."""
  def workload(algorithm, student, teacher=None):
    return benchmark.Workload(algorithm, student, teacher, INPUT_SHAPE, (),
                              examples, 1, algorithm, epochs)
  out = {'fedavg': workload('fedavg', MENTEE)}
  if mentor != MENTEE:
    out['fedavg_mentor'] = workload('fedavg', mentor)
  out.update(local_kd=workload('local_kd', MENTEE, mentor),
             fedkd=workload('fedkd', MENTEE, mentor))
  return out


def time_setup(mentor: str, num_clients: int, cohort: int, examples: int,
               rounds: int, clients_per_chunk: int | None = None,
               epochs: int = 1) -> dict[str, float]:
  """Median seconds of a round of each of `workloads`, timed in turn."""
  arms = {}
  for name, workload in workloads(mentor, examples, epochs).items():
    alg, state, data = benchmark.build(workload, num_clients)
    run, _, _, _ = benchmark.compiled_round(
        alg, state, data, clients_per_chunk=clients_per_chunk,
        clients_per_round=cohort,
        step_bytes=benchmark.client_step_bytes(workload))
    arms[name] = (run, None)
  return benchmark.median_seconds(arms, rounds)


def ratios(seconds: dict[str, float]) -> dict[str, float]:
  """fedkd's round over each other one's, as `fedkd/NAME`."""
  return {f'fedkd/{name}': seconds['fedkd'] / s
          for name, s in seconds.items() if name != 'fedkd'}


def parse_setup(text: str) -> tuple[int, int, int]:
  """(clients, cohort, examples) of a `--setups` entry."""
  try:
    num_clients, cohort, examples = map(int, text.split(':'))
  except ValueError:
    num_clients = cohort = examples = 0
  if not 0 < cohort <= num_clients or examples < 1:
    raise FedkdError(
        f'--setups: {text!r} is not clients:cohort:examples with '
        '0 < cohort <= clients and examples >= 1, e.g. 50:10:80')
  return num_clients, cohort, examples


def main(argv):
  del argv
  given = [f'--{name}' for name in _NOT_HERE if FLAGS[name].present]
  if given:
    raise FedkdError(f'fedkd_cost takes no {", ".join(given)}: it times '
                     'arm (a) of each --setups entry; leave them out')
  models.get_model(_MENTOR.value, benchmark.NUM_CLASSES)
  if not _SETUPS.value:
    raise FedkdError('--setups is empty; give clients:cohort:examples '
                     'triples, e.g. 50:10:80')
  setups = [parse_setup(s) for s in _SETUPS.value]
  rounds, epochs = FLAGS.rounds or 3, FLAGS.epochs or 1
  for num_clients, _, examples in setups:
    for workload in workloads(_MENTOR.value, examples, epochs).values():
      benchmark.check_size(workload, num_clients)
  names = list(workloads(_MENTOR.value, 1))
  columns = (['clients', 'cohort', 'examples'] + [f'{n} s' for n in names]
             + [f'fedkd/{n}' for n in names if n != 'fedkd'])
  print(f'mentor {_MENTOR.value}, mentee {MENTEE}, E={epochs}; median '
        f'seconds of {rounds} rounds\n')
  print('| ' + ' | '.join(columns) + ' |\n|' + ' ---: |' * len(columns))
  for setup in setups:
    seconds = time_setup(_MENTOR.value, *setup, rounds,
                         FLAGS.clients_per_chunk, epochs)
    cells = ([*map(str, setup)] + [f'{seconds[n]:.3f}' for n in names]
             + [f'{r:.2f}x' for r in ratios(seconds).values()])
    print('| ' + ' | '.join(cells) + ' |', flush=True)


if __name__ == '__main__':
  cli.run(main)
