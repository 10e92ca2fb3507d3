"""Every algorithm on digits, 100 clients, Dirichlet alpha 0.1: one table.

    python experiments/main.py \
        --config=experiments/configs/compare_digits.py \
        --workdir=/tmp/fedkd_compare

Runs each algorithm of `compare` with seeds 0, 1 and 2 (each its own
partition, held-out public data of 200 training examples, used only by feddf
and fedmd, cohorts and initial model, the same for every algorithm) and the
same round budget, and writes WORKDIR/compare.md (mean ± std over the seeds
of the final and best accuracy, test loss, rounds to 0.80, total bytes,
teacher/mentor accuracy) and accuracy-vs-round / accuracy-vs-bytes PNGs
(experiments/compare.py). The results committed under docs/compare/ came
from this command.

Hardware: a laptop CPU (about a minute a seed with 2 cores).
`:smoke` runs 2 rounds of two algorithms, one seed.
"""

from experiments.configs import default


def get_config(arg: str | None = None):
  c = default.get_config()
  c.partition = 'dirichlet'
  c.alpha = 0.1
  c.num_clients = 100
  c.clients_per_round = 100
  c.num_rounds = 100
  c.eval_every = 1
  c.public_examples = 200
  c.distill_epochs = 5  # feddf: 20 server Adam steps per round
  c.compare = 'fedavg,fedprox,fedntd,local_kd,fedkd,feddf,fd,fedmd'
  c.target_accuracy = 0.8
  c.num_seeds = 3
  if arg == 'smoke':
    c.compare, c.num_seeds = 'fedavg,fd', 1
  return default.variant(c, arg)
