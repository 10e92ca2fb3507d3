"""Federated algorithms, one module each, chosen by name from the config."""

from fedkd.algorithms.fedavg import fedavg
from fedkd.algorithms.local_kd import local_kd

ALGORITHMS = {'fedavg': fedavg, 'local_kd': local_kd}
