"""fedkd: federated learning with knowledge distillation, vmapped over clients."""

from fedkd.algorithm import FederatedAlgorithm
from fedkd.algorithm import ServerState
from fedkd.algorithms import fedavg
from fedkd.algorithms import local_kd
from fedkd.clients import ClientData
from fedkd.clients import Cohort
from fedkd.errors import FedkdError

__all__ = [
    'ClientData', 'Cohort', 'FederatedAlgorithm', 'FedkdError', 'ServerState',
    'fedavg', 'local_kd',
]
