"""Seconds per round of FedKD against FedAvg and local KD, side by side.

    python -m experiments.fedkd_cost [--setups=50:10:80,50:50:80,1000:1000:20]
        [--clients_per_chunk=N]

Each setup is clients:cohort:examples per client, on MNIST-sized random data
(28x28x1, 10 classes) with mnist_2nn (784-200-200-10) as the shared model and
as every client's private teacher (mentor), E=1, B=10, SGD. FedKD is local KD
plus mutual distillation plus the SVD compression of both directions, so
fedkd / local_kd is essentially the price of the compression. It prints the
median seconds of `--rounds` rounds after a first round that compiles (its
time is printed too). Timings are noisy; compare ratios from one run only.

Measured on the shared 2-core CPU (seconds; fedkd / fedavg, fedkd /
local_kd), default flags, one run:

    50:50:80      fedavg 0.176  local_kd 0.316  fedkd 0.607   3.4x  1.9x
    1000:1000:20  fedavg 1.874  local_kd 3.035  fedkd 9.845   5.3x  3.2x

and a later run, after the reconstruction went by blocks (below):

    50:10:80      fedavg 0.027  local_kd 0.072  fedkd 0.125   4.7x  1.7x
    50:50:80      fedavg 0.158  local_kd 0.270  fedkd 0.634   4.0x  2.3x
    1000:1000:20  fedavg 1.890  local_kd 3.258  fedkd 10.595  5.6x  3.3x

Alternating with the code from before `compression._orthonormalize` ran its
Gram-Schmidt on the small Gram matrix (it ran it on the [n, k] block), fedkd at
1000:1000:20 took 9.85, 8.49 and 8.15 s against 10.72, 9.65 and 11.25 s (3.2x,
2.5x, 2.2x local_kd against 3.3x, 3.0x, 4.1x). Training is as costly as local
KD's (fedkd with the compression replaced by the identity: 1.01x local_kd); the
rest is `svd_compress` on the clients. Per-line profile of it alone, vmapped
over 1000 uploads of the three 2NN kernels (low rank, ~10): about 5.8 s, of
which the Gram matrices 1.2 s, the Jacobi rotations of the Rayleigh-Ritz steps
0.8 s, the orthonormalisations 1.1 s, `A V_r V_r^T` and the subspace
iteration's products the rest: memory-bound batched small ops more than matmul
flops. `A V_r V_r^T` now goes by blocks of V, two thin matmuls each (4.6 s
against 5.1 s in one process); its cost grows linearly with the clients (one
upload of 8 local steps 4.6 ms, 10 uploads 4.6 ms each, 50 5.4-6.3 ms each), so
batching has no per-call overhead left to remove. Fewer Jacobi sweeps (2) or
one Gram-Schmidt pass in the early power steps cost accuracy that
tests/compression_test.py catches (reconstructions off by up to 6e-4 of the
largest entry). `--clients_per_chunk` helps FedAvg and local KD more than FedKD
(measured before: 1000 clients at 100 per chunk 7.8x and 4.7x, 50 at 10 6.3x
and 2.8x). A fedkd round cannot cost at most 1.5x fedavg's by construction, as
local KD (the same two models, no compression) is already 1.7-2x fedavg.

With blocks of 16 eigenvectors instead of 32 (`compression._BLOCK`), the
updates of two local steps (rank <= 20) mostly need one block, a quarter of
the work of one of 32. Two runs of the new code and one of the old, in turn:

    50:10:80      fedkd/local_kd 2.29, 1.99 (old 1.91)
    50:50:80      fedkd/local_kd 1.57, 2.59 (old 1.82)
    1000:1000:20  fedkd/local_kd 1.80, 1.67 (old 2.60); fedkd 5.71, 5.99 s
                  (old 7.52 s)

so the 1000-client round is 1.3x faster; at 50 clients (8 local steps, ranks
up to 80, several blocks either way) the change is within the noise.
"""

import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedkd import algorithm
from fedkd import algorithms
from fedkd import clients
from fedkd import models

_SETUPS = flags.DEFINE_list('setups', ['50:10:80', '50:50:80', '1000:1000:20'],
                            'clients:cohort:examples triples to time.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Timed rounds per algorithm.')
_CHUNK = flags.DEFINE_integer(
    'clients_per_chunk', 0, 'Clients per chunk of every round (0: the whole '
    'cohort at once); the cohorts must be multiples of it.')

INPUT_SHAPE, NUM_CLASSES, MODEL = (28, 28, 1), 10, 'mnist_2nn'


def _algorithms(num_clients: int) -> dict[str, algorithm.FederatedAlgorithm]:
  model = models.get_model(MODEL, NUM_CLASSES)
  common = dict(client_tx=optax.sgd(0.05), server_tx=optax.sgd(1.0),
                epochs=1, batch_size=10)
  private = dict(input_shape=INPUT_SHAPE, num_clients=num_clients, **common)
  return {
      'fedavg': algorithms.fedavg(model=model, **common),
      'local_kd': algorithms.local_kd(
          teacher=model, student=model, teacher_tx=optax.sgd(0.05),
          temperature=2.0, distill_weight=0.5, **private),
      'fedkd': algorithms.fedkd(
          mentor=model, mentee=model, mentor_tx=optax.sgd(0.05),
          energy_start=0.95, energy_end=0.98, num_rounds=10, **private),
  }


def _time(alg, data, cohort) -> tuple[float, float]:
  """(seconds of the first round, median seconds of the next rounds)."""
  params = models.get_model(MODEL, NUM_CLASSES).init(
      jax.random.PRNGKey(0), jnp.zeros((1, *INPUT_SHAPE)))
  state = alg.init(params, jax.random.PRNGKey(1))
  apply = jax.jit(algorithm.with_round(
      alg, clients_per_chunk=_CHUNK.value).apply)
  times = []
  for i in range(_ROUNDS.value + 1):
    start = time.perf_counter()
    state, _ = apply(state, data, cohort, jax.random.PRNGKey(i))
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  return times[0], statistics.median(times[1:])


def main(argv):
  del argv
  print('clients | cohort | examples | fedavg s | local_kd s | fedkd s | '
        'fedkd/fedavg | fedkd/local_kd | fedkd first round s')
  for setup in _SETUPS.value:
    num_clients, size, examples = map(int, setup.split(':'))
    rng = np.random.default_rng(0)
    n = num_clients * examples
    data = jax.tree.map(jnp.asarray, clients.stack_clients(
        rng.random((n, *INPUT_SHAPE), np.float32),
        rng.integers(0, NUM_CLASSES, n),
        np.arange(n).reshape(num_clients, examples)))
    cohort = clients.sample_cohort(rng, num_clients, size, size)
    first, seconds = {}, {}
    for name, alg in _algorithms(num_clients).items():
      first[name], seconds[name] = _time(alg, data, cohort)
    print(f'{num_clients} | {size} | {examples} | {seconds["fedavg"]:.3f} | '
          f'{seconds["local_kd"]:.3f} | {seconds["fedkd"]:.3f} | '
          f'{seconds["fedkd"] / seconds["fedavg"]:.2f} | '
          f'{seconds["fedkd"] / seconds["local_kd"]:.2f} | '
          f'{first["fedkd"]:.1f}', flush=True)


if __name__ == '__main__':
  app.run(main)
