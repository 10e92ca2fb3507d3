"""FedAvg, FedDistill (fd) and FedDF on MNIST, Dirichlet alpha 0.1, the
baseline rows of FedGen's Table 1 (Zhu, Hong & Zhou 2021).

Zhu, Hong & Zhou, "Data-Free Knowledge Distillation for Heterogeneous
Federated Learning", ICML 2021, arXiv:2105.10056. Setup: 20 users, all
reporting, Dirichlet alpha 0.1, 200 rounds, 20 local steps of batch 32 (here
local epochs of batch 32), an MLP; FedDF's proxy data is a held-out part of
the training set. FedGen itself is not implemented in fedkd.

    python experiments/main.py \
        --config=experiments/configs/fedgen_mnist_table1.py \
        --workdir=/tmp/fedgen_t1

The paper's numbers are in its Table 1 (MNIST, alpha = 0.1 column, rows
FedAvg, FedProx, FedDistill, FedDF, FedEnsemble, FedGen); they are not
transcribed or reproduced here.

Hardware: MNIST prepared for TFDS under `data_dir`; a CPU suffices (MLP).
`:smoke` runs 2 rounds on digits with the seed models.
"""

from experiments.configs import default


def get_config(arg: str | None = None):
  c = default.get_config()
  c.dataset = 'mnist'
  c.alpha = 0.1
  c.num_clients = 20
  c.clients_per_round = 20
  c.student = 'mnist_2nn'
  c.local_epochs = 1
  c.batch_size = 32
  c.client_lr = 0.01
  c.num_rounds = 200
  c.eval_every = 5
  c.eval_teachers = 20
  c.public_examples = 5000
  c.compare = 'fedavg,fd,feddf'
  c.target_accuracy = 0.85
  return default.variant(c, arg)
