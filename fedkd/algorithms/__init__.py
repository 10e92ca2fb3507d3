"""Federated algorithms, one module each, and what sets them apart.

`experiments/builder.py` turns a run config into a factory call.
"""

from fedkd.algorithms.fd import fd
from fedkd.algorithms.fedavg import fedavg
from fedkd.algorithms.feddf import feddf
from fedkd.algorithms.fedkd import fedkd
from fedkd.algorithms.fedmd import fedmd
from fedkd.algorithms.fedntd import fedntd
from fedkd.algorithms.fedprox import fedprox
from fedkd.algorithms.local_kd import local_kd

ALGORITHMS = ('fd', 'fedavg', 'feddf', 'fedkd', 'fedmd', 'fedntd', 'fedprox',
              'local_kd')
# Algorithms that read the public (proxy) data.
PUBLIC_DATA = ('feddf', 'fedmd')
# Algorithms whose `init` trains on the client data, public labels included
# (fedmd's transfer learning). feddf reads the public labels too, but only
# on the server.
INIT_TRAINS = ('fedmd',)
# Algorithms whose upload is not a model update that DP-FedAvg can clip and
# noise as a whole (`fedkd.privacy`), and why.
NO_DP = {
    'feddf': 'clipping its upload scales the ensemble logits with the delta',
    'fd': 'its clients take their own logits out of per-label sums and '
          'client counts, which clipping and noise would falsify',
    'fedmd': 'its upload is logits on the public data, not an update',
}
DP_ALGORITHMS = tuple(name for name in ALGORITHMS if name not in NO_DP)
# Algorithms whose clients may differ in architecture: their messages do
# not depend on it. local_kd's and fedkd's clients differ in their private
# teacher (mentor), the others' in their (only or global) model.
HETEROGENEOUS = ('fd', 'feddf', 'fedkd', 'fedmd', 'local_kd')
# Algorithms whose per-client model is a private teacher (fedkd: mentor).
PRIVATE_TEACHERS = ('fedkd', 'local_kd')

__all__ = ['ALGORITHMS', 'DP_ALGORITHMS', 'HETEROGENEOUS', 'INIT_TRAINS',
           'NO_DP', 'PRIVATE_TEACHERS', 'PUBLIC_DATA', 'fd', 'fedavg', 'feddf',
           'fedkd', 'fedmd', 'fedntd', 'fedprox', 'local_kd']
