"""Federated algorithms, one module each, chosen by name from the config."""

from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedkd import algorithm
from fedkd import clients
from fedkd import models
from fedkd import optimizers
from fedkd.algorithm import FederatedAlgorithm
from fedkd.algorithm import ServerState
from fedkd.clients import ClientData
from fedkd.errors import FedkdError
from fedkd.algorithms.fd import fd
from fedkd.algorithms.fedavg import fedavg
from fedkd.algorithms.feddf import feddf
from fedkd.algorithms.fedkd import fedkd
from fedkd.algorithms.fedmd import fedmd
from fedkd.algorithms.fedntd import fedntd
from fedkd.algorithms.fedprox import fedprox
from fedkd.algorithms.local_kd import local_kd
from fedkd.typing import Params, PRNGKey

ALGORITHMS = ('fd', 'fedavg', 'feddf', 'fedkd', 'fedmd', 'fedntd', 'fedprox',
              'local_kd')
# Algorithms that read the public (proxy) data, `config.public_examples`.
PUBLIC_DATA = ('feddf', 'fedmd')
# Algorithms whose `init` trains on the client data, public labels included
# (fedmd's transfer learning; `initializer`). feddf reads the public labels
# too, but only on the server (`public_labels`).
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


# Algorithms whose clients may differ in architecture (`client_models`):
# their messages do not depend on it. local_kd's clients differ in their
# private teacher, the others' in their (only or global) model.
HETEROGENEOUS = ('fd', 'feddf', 'fedmd', 'local_kd')
# Algorithms whose per-client model is a private teacher (fedkd: mentor).
PRIVATE_TEACHERS = ('fedkd', 'local_kd')


class Evaluated(NamedTuple):
  """Models of one architecture that evaluation tests.

  Attributes:
    name: the model's name (`accuracy_<name>` with several architectures).
    model: the module.
    params: reads their stacked parameters ([count, ...]) from a state.
    count: how many there are: 1 global model, or the clients of a group.
  """
  name: str
  model: nn.Module
  params: Callable[[ServerState], Params]
  count: int


class Built(NamedTuple):
  """A configured algorithm and what evaluation needs to know of it.

  Attributes:
    algorithm: the `FederatedAlgorithm`.
    init_params: rng -> the global model's parameters for `init` (a tuple,
      one per architecture, with several); None without a global model (fd,
      fedmd).
    global_models: the global model(s), evaluated every `eval_every` rounds
      (for feddf with `server_model`, that model).
    private_models: the clients' private models (teachers, mentors, or for
      fd and fedmd the clients' only models), one entry per architecture.
  """
  algorithm: FederatedAlgorithm
  init_params: Callable[[PRNGKey], Params] | None
  global_models: tuple[Evaluated, ...] = ()
  private_models: tuple[Evaluated, ...] = ()


def architectures(config) -> tuple[str, ...]:
  """The architectures that differ per client (client i's is [i % k]):
  `client_models`, else the one `student` (fedkd, local_kd: `teacher`)."""
  if config.client_models:
    return tuple(config.client_models.split(','))
  return (config.teacher if config.algorithm in PRIVATE_TEACHERS
          else config.student,)


def _global(names, modules, input_shape,
            read=lambda state: state.params) -> dict:
  """`Built` fields of global models, one per architecture."""
  def init_params(rng):
    x = jnp.zeros((1, *input_shape))
    if len(modules) == 1:
      return modules[0].init(rng, x)
    return tuple(m.init(jax.random.fold_in(rng, g), x)
                 for g, m in enumerate(modules))
  one = lambda g: lambda state: jax.tree.map(
      lambda p: p[None], read(state)[g] if len(modules) > 1 else read(state))
  return dict(init_params=init_params, global_models=tuple(
      Evaluated(n, m, one(g), 1) for g, (n, m) in enumerate(zip(names,
                                                              modules))))


def _private(names, modules, num_clients: int) -> tuple[Evaluated, ...]:
  """Evaluated private models, the clients' state `(params, ...)` per group
  (`algorithm.make_round`)."""
  sizes = clients.group_sizes(num_clients, len(modules))
  read = lambda g: lambda state: (
      state.clients[g] if len(modules) > 1 else state.clients)[0]
  return tuple(Evaluated(n, m, read(g), sizes[g])
               for g, (n, m) in enumerate(zip(names, modules)))


def feddf_num_val(config, num_public: int) -> int:
  """FedDF's validation split: `distill_val_fraction` of the public data
  (at least one example while the fraction is above 0)."""
  if config.algorithm != 'feddf' or not config.distill_val_fraction:
    return 0
  num_val = max(1, int(config.distill_val_fraction * num_public))
  if num_val >= num_public:
    raise FedkdError(
        f'distill_val_fraction={config.distill_val_fraction} of {num_public}'
        ' public examples leaves no proxy data to distill on; raise '
        'public_examples or set distill_val_fraction=0')
  return num_val


def public_labels(config) -> bool:
  """Whether the public data keeps its labels: fedmd trains on them, feddf
  validates on a split of them."""
  return config.algorithm in INIT_TRAINS or (
      config.algorithm == 'feddf' and config.distill_val_fraction > 0)


def feddf_distill_tx(config, num_proxy: int) -> optax.GradientTransformation:
  """FedDF's server optimizer, fresh every round (official: Adam, cosine
  decay over the round's distillation steps, gradient norm clipped to 5)."""
  lr = config.distill_lr
  if config.distill_schedule == 'cosine':
    steps = clients.num_steps(num_proxy, epochs=config.distill_epochs,
                              batch_size=config.public_batch_size)
    lr = optax.cosine_decay_schedule(lr, max(steps, 1))
  tx = optimizers.get_optimizer(config.distill_optimizer, lr)
  if config.distill_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.distill_clip_norm), tx)
  return tx


def initializer(config, alg: FederatedAlgorithm
                ) -> Callable[[Params, PRNGKey, ClientData], ServerState]:
  """`(params, rng, data) -> state`: `alg.init`, which reads the client data
  (a jit argument, never a closed-over constant) where it trains on it."""
  if config.algorithm in INIT_TRAINS:
    return alg.init
  return lambda params, rng, data: alg.init(params, rng)


def build(config, input_shape, num_classes: int, num_public: int) -> Built:
  """The algorithm named by `config.algorithm`, configured from `config`.

  Args:
    config: a validated run config.
    input_shape: shape of one example.
    num_classes: number of labels.
    num_public: number of public examples held out (`ClientData.public_x`).
  """
  name = config.algorithm
  names = (config.student,) if name in PRIVATE_TEACHERS else (
      architectures(config))
  modules = tuple(models.get_model(n, num_classes) for n in names)
  student = algorithm.per_group(modules)
  optimizer = optimizers.get_optimizer
  train = dict(client_tx=optimizer(config.client_optimizer, config.client_lr),
               epochs=config.local_epochs, batch_size=config.batch_size)
  averaging = dict(train, server_tx=optimizer(config.server_optimizer,
                                              config.server_lr))
  private = dict(input_shape=input_shape, num_clients=config.num_clients)
  global_model = _global(names, modules, input_shape)
  if name == 'fedavg':
    return Built(fedavg(model=student, **averaging), **global_model)
  if name == 'fedprox':
    return Built(fedprox(model=student, mu=config.prox_mu, **averaging),
                 **global_model)
  if name == 'fedntd':
    return Built(fedntd(model=student, beta=config.ntd_beta,
                        temperature=config.ntd_tau, **averaging),
                 **global_model)
  if name == 'feddf':
    server_model = config.server_model and models.get_model(
        config.server_model, num_classes)
    num_val = feddf_num_val(config, num_public)
    alg = feddf(
        model=student,
        distill_tx=feddf_distill_tx(config, num_public - num_val),
        num_val=num_val, eval_every=config.distill_eval_every,
        patience=config.distill_patience,
        distill_epochs=config.distill_epochs,
        public_batch_size=config.public_batch_size,
        temperature=config.distill_temperature,
        server_model=server_model or None, input_shape=input_shape,
        **averaging)
    if server_model:
      return Built(alg, **_global(
          (config.server_model,), (server_model,), input_shape,
          read=lambda state: state.params['server']))
    return Built(alg, **global_model)
  # fd and fedmd have no global model: `student` or `client_models` names
  # the clients' models.
  own_models = _private(names, modules, config.num_clients)
  if name == 'fd':
    return Built(fd(model=student, num_classes=num_classes,
                    temperature=config.temperature,
                    distill_weight=config.distill_weight, **private, **train),
                 None, private_models=own_models)
  if name == 'fedmd':
    return Built(fedmd(model=student, num_public=num_public,
                       num_classes=num_classes,
                       digest_epochs=config.digest_epochs,
                       public_batch_size=config.public_batch_size,
                       transfer_epochs=config.fedmd_transfer_epochs,
                       private_epochs=config.fedmd_private_epochs,
                       **private, **train), None, private_models=own_models)
  teacher_tx = optimizer(config.client_optimizer, config.teacher_lr)
  # The private teachers (fedkd's mentors), one per architecture.
  names = architectures(config)
  teachers = tuple(models.get_model(n, num_classes) for n in names)
  private_models = _private(names, teachers, config.num_clients)
  if name == 'fedkd':
    alg = fedkd(mentor=teachers[0], mentee=student, mentor_tx=teacher_tx,
                energy_start=config.svd_energy_start,
                energy_end=config.svd_energy_end,
                num_rounds=config.num_rounds,
                loss_scale=config.fedkd_loss_scale,
                weighting=config.fedkd_weighting, **private, **averaging)
    return Built(alg, **global_model, private_models=private_models)
  alg = local_kd(teacher=algorithm.per_group(teachers), student=student,
                 teacher_tx=teacher_tx, temperature=config.temperature,
                 distill_weight=config.distill_weight, **private, **averaging)
  return Built(alg, **global_model, private_models=private_models)
