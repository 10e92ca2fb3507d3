"""fedkd: federated learning with knowledge distillation, vmapped over clients."""

from fedkd.algorithm import FederatedAlgorithm
from fedkd.algorithm import ServerState
from fedkd.algorithms import fd
from fedkd.algorithms import fedavg
from fedkd.algorithms import feddf
from fedkd.algorithms import fedkd
from fedkd.algorithms import fedmd
from fedkd.algorithms import fedntd
from fedkd.algorithms import fedprox
from fedkd.algorithms import local_kd
from fedkd.clients import ClientData
from fedkd.clients import Cohort
from fedkd.errors import FedkdError

__all__ = [
    'ClientData', 'Cohort', 'FederatedAlgorithm', 'FedkdError', 'ServerState',
    'fd', 'fedavg', 'feddf', 'fedkd', 'fedmd', 'fedntd', 'fedprox', 'local_kd',
]
