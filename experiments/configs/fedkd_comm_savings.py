"""FedKD's communication savings against FedAvg of the same shared model.

Wu, Wu, Lyu, Huang & Xie, "Communication-efficient federated learning via
knowledge distillation", Nature Communications 13, 2032 (2022),
arXiv:2108.13323. The paper's tasks (MIND/Adressa news recommendation and
medical text with UniLM/BERT mentors and small mentees) are not available
here; this config measures the same quantity, the bytes FedKD sends (SVD
factors, energy 0.95 -> 0.98, both directions) against FedAvg sending the
mentee's parameters, on MNIST with an MLP mentee (mnist_2nn) and a CNN
mentor (mnist_cnn), 100 clients, Dirichlet alpha 0.5, 10 per round.

    python experiments/main.py \
        --config=experiments/configs/fedkd_comm_savings.py \
        --workdir=/tmp/fedkd_savings

The paper reports (abstract) communication cost reductions of up to 94.89%
with accuracy comparable to centralised training, on its text tasks; that
number is the paper's, not a result of this code. Compare the `total MB`
column of WORKDIR/compare.md between fedavg and fedkd.

Hardware: MNIST prepared for TFDS under `data_dir`; one GPU recommended.
`:smoke` runs 2 rounds on digits with the seed models.
"""

from experiments.configs import default


def get_config(arg: str | None = None):
  c = default.get_config()
  c.dataset = 'mnist'
  c.alpha = 0.5
  c.num_clients = 100
  c.clients_per_round = 10
  c.student = 'mnist_2nn'
  c.teacher = 'mnist_cnn'
  c.svd_energy_start, c.svd_energy_end = 0.95, 0.98
  c.num_rounds = 100
  c.eval_every = 1
  c.compare = 'fedavg,fedkd'
  c.target_accuracy = 0.95
  return default.variant(c, arg)
