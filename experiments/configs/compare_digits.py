"""Every algorithm on digits, 100 clients, Dirichlet alpha 0.1: one table.

    python experiments/main.py \
        --config=experiments/configs/compare_digits.py \
        --workdir=/tmp/fedkd_compare

Runs each algorithm of `compare` on the same partition, seed, held-out public
data (200 training examples, used only by feddf and fedmd) and round budget,
and writes WORKDIR/compare.md (final accuracy, rounds to 0.80, total bytes)
and accuracy-vs-round / accuracy-vs-bytes PNGs (experiments/compare.py).
The results committed under docs/compare/ came from this command.

Hardware: a laptop CPU (about a minute with 2 cores).
`:smoke` runs 2 rounds of two algorithms.
"""

from configs import default  # experiments/ is on sys.path under main.py


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
  if arg == 'smoke':
    c.compare = 'fedavg,fd'
  return default.variant(c, arg)
