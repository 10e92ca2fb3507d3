"""Turns a run config into fedkd calls: the algorithm, its models, settings.

The library takes typed arguments; this module (with `experiments/runner.py`)
is where a `ml_collections.ConfigDict` ends. Call `validation.validate_config`
first: nothing here checks its input again.
"""

import jax
import jax.numpy as jnp
import optax

from fedkd import algorithm
from fedkd import algorithms
from fedkd import clients
from fedkd import models
from fedkd import optimizers
from fedkd import privacy
from fedkd import train
from fedkd.algorithms import fd
from fedkd.algorithms import fedavg
from fedkd.algorithms import feddf
from fedkd.algorithms import fedkd
from fedkd.algorithms import fedmd
from fedkd.algorithms import fedntd
from fedkd.algorithms import fedprox
from fedkd.algorithms import local_kd
from fedkd.errors import FedkdError


def architectures(config) -> tuple[str, ...]:
  """The architectures that differ per client (client i's is [i % k]):
  `client_models`, else the one `student` (fedkd, local_kd: `teacher`)."""
  if config.client_models:
    return tuple(config.client_models.split(','))
  return (config.teacher if config.algorithm in algorithms.PRIVATE_TEACHERS
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
      train.Evaluated(n, m, one(g), 1) for g, (n, m) in enumerate(zip(names,
                                                              modules))))


def _private(names, modules,
             num_clients: int) -> tuple[train.Evaluated, ...]:
  """Evaluated private models, the clients' state `(params, ...)` per group
  (`algorithm.make_round`)."""
  sizes = clients.group_sizes(num_clients, len(modules))
  read = lambda g: lambda state: (
      state.clients[g] if len(modules) > 1 else state.clients)[0]
  return tuple(train.Evaluated(n, m, read(g), sizes[g])
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
  return config.algorithm in algorithms.INIT_TRAINS or (
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


def _built(config, alg: algorithm.FederatedAlgorithm, init_params=None,
           **models_evaluated) -> train.Built:
  """`train.Built` for `alg`; its `init` reads the client data only where it
  trains on it (fedmd's transfer learning)."""
  init = alg.init if config.algorithm in algorithms.INIT_TRAINS else (
      lambda params, rng, data: alg.init(params, rng))
  return train.Built(alg, init, init_params, **models_evaluated)


def build(config, input_shape, num_classes: int,
          num_public: int) -> train.Built:
  """The algorithm named by `config.algorithm`, configured from `config`.

  Args:
    config: a validated run config.
    input_shape: shape of one example.
    num_classes: number of labels.
    num_public: number of public examples held out (`ClientData.public_x`).
  """
  name = config.algorithm
  names = (config.student,) if name in algorithms.PRIVATE_TEACHERS else (
      architectures(config))
  modules = tuple(models.get_model(n, num_classes) for n in names)
  student = algorithm.per_group(modules)
  optimizer = optimizers.get_optimizer
  local = dict(client_tx=optimizer(config.client_optimizer, config.client_lr),
               epochs=config.local_epochs, batch_size=config.batch_size)
  averaging = dict(local, server_tx=optimizer(config.server_optimizer,
                                              config.server_lr))
  private = dict(input_shape=input_shape, num_clients=config.num_clients)
  global_model = _global(names, modules, input_shape)
  if name == 'fedavg':
    return _built(config, fedavg(model=student, **averaging), **global_model)
  if name == 'fedprox':
    return _built(config, fedprox(model=student, mu=config.prox_mu,
                                  **averaging), **global_model)
  if name == 'fedntd':
    return _built(config, fedntd(model=student, beta=config.ntd_beta,
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
      return _built(config, alg, **_global(
          (config.server_model,), (server_model,), input_shape,
          read=lambda state: state.params['server']))
    return _built(config, alg, **global_model)
  # fd and fedmd have no global model: `student` or `client_models` names
  # the clients' models.
  own_models = _private(names, modules, config.num_clients)
  if name == 'fd':
    return _built(config, fd(
        model=student, num_classes=num_classes,
        temperature=config.temperature, distill_weight=config.distill_weight,
        **private, **local), private_models=own_models)
  if name == 'fedmd':
    return _built(config, fedmd(
        model=student, num_public=num_public, num_classes=num_classes,
        digest_epochs=config.digest_epochs,
        public_batch_size=config.public_batch_size,
        transfer_epochs=config.fedmd_transfer_epochs,
        private_epochs=config.fedmd_private_epochs, **private, **local),
                  private_models=own_models)
  teacher_tx = optimizer(config.client_optimizer, config.teacher_lr)
  # The private teachers (fedkd's mentors), one per architecture.
  names = architectures(config)
  teachers = tuple(models.get_model(n, num_classes) for n in names)
  private_models = _private(names, teachers, config.num_clients)
  if name == 'fedkd':
    alg = fedkd(mentor=algorithm.per_group(teachers), mentee=student,
                mentor_tx=teacher_tx,
                energy_start=config.svd_energy_start,
                energy_end=config.svd_energy_end,
                num_rounds=config.num_rounds,
                loss_scale=config.fedkd_loss_scale,
                weighting=config.fedkd_weighting, **private, **averaging)
    return _built(config, alg, **global_model, private_models=private_models)
  alg = local_kd(teacher=algorithm.per_group(teachers), student=student,
                 teacher_tx=teacher_tx, temperature=config.temperature,
                 distill_weight=config.distill_weight, **private, **averaging)
  return _built(config, alg, **global_model, private_models=private_models)


def settings(config) -> train.Settings:
  """`train.Settings` of a run config."""
  dp = None
  if config.dp_clip_norm > 0:
    dp = privacy.DpSettings(config.dp_clip_norm, config.dp_noise_multiplier,
                            expected_clients=config.clients_per_round)
  return train.Settings(
      num_clients=config.num_clients,
      clients_per_round=config.clients_per_round,
      num_rounds=config.num_rounds, seed=config.seed,
      batch_size=config.batch_size, local_epochs=config.local_epochs,
      groups=len(architectures(config)),
      public_batch_size=(config.public_batch_size
                         if config.algorithm in algorithms.PUBLIC_DATA else 0),
      eval_every=config.eval_every, checkpoint_every=config.checkpoint_every,
      eval_batch_size=config.eval_batch_size,
      eval_teachers=config.eval_teachers,
      clients_per_chunk=config.clients_per_chunk,
      num_devices=config.num_devices, shard_data=config.shard_data,
      faults=algorithm.Faults(dropout_rate=config.dropout_rate,
                              straggler_rate=config.straggler_rate),
      dp=dp, dp_delta=config.dp_delta, dp_accountant=config.dp_accountant,
      max_nonfinite_rounds=config.max_nonfinite_rounds)
