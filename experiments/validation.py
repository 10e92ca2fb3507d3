"""All checks of a run's settings, in one place, before any work or output.

Each failed check raises `FedkdError` with one line naming the field, the bad
value and what to do instead.
"""

import os

import jax
import jax.numpy as jnp

from experiments import builder
from fedkd import algorithms
from fedkd import clients
from fedkd import communication
from fedkd import models
from fedkd import npzfile
from fedkd import optimizers
from fedkd import privacy
from fedkd import synthetic
from fedkd.algorithms import ALGORITHMS
from fedkd.algorithms import DP_ALGORITHMS
from fedkd.algorithms import NO_DP
from fedkd.algorithms import PUBLIC_DATA
from fedkd.algorithms.fedkd import LOSS_SCALES
from fedkd.algorithms.fedkd import WEIGHTINGS
from fedkd.errors import FedkdError
from fedkd.optimizers import OPTIMIZERS
from fedkd.partition import METHODS

_POSITIVE_INTS = ('num_clients', 'clients_per_round', 'num_rounds',
                  'local_epochs', 'batch_size', 'eval_every', 'eval_batch_size',
                  'public_batch_size', 'distill_epochs', 'digest_epochs',
                  'max_nonfinite_rounds', 'distill_eval_every',
                  'distill_patience')
_POSITIVE_FLOATS = ('client_lr', 'teacher_lr', 'server_lr', 'temperature',
                    'distill_lr', 'ntd_tau', 'distill_temperature')
_NON_NEGATIVE = ('num_devices', 'clients_per_chunk', 'eval_teachers',
                 'public_examples', 'prox_mu', 'ntd_beta', 'checkpoint_every',
                 'distill_clip_norm', 'fedmd_transfer_epochs',
                 'fedmd_private_epochs')
_FLOAT32_MAX = float(jnp.finfo(jnp.float32).max)
# Counts that JAX holds in int32 (or C ints: num_processes).
_INT32 = ('num_clients', 'num_rounds', 'batch_size', 'public_batch_size',
          'distill_eval_every', 'distill_patience')
# What 0 means, where it means something.
_ZERO_MEANS = {'num_devices': ' (0 = all devices)',
               'clients_per_chunk': ' (0 = the whole cohort at once; unset:'
                                     ' chosen from the model sizes)',
               'checkpoint_every': ' (0 = only after the last round)',
               'distill_clip_norm': ' (0 = no clipping)',
               'fedmd_transfer_epochs': ' (0 = none)',
               'fedmd_private_epochs': ' (0 = none)'}
# What a float too large for float32 was probably meant to say.
_TOO_LARGE = {'alpha': '; for an IID split use partition=iid'}
# Algorithms evaluated through the clients' own models.
_LOCAL_EVAL = ('fd', 'fedmd')


def _below_2_31(config, field):
  if getattr(config, field) >= 2**31:
    raise FedkdError(f'{field} must be < 2**31 (it is counted in int32), '
                     f'got {getattr(config, field)}')


def _one_of(config, field, choices):
  value = getattr(config, field)
  if value not in choices:
    raise FedkdError(f'unknown {field} {value!r}; choose one of '
                     f'{", ".join(sorted(choices))}')


def validate_config(config) -> None:
  """Checks every field of a run config that can be checked without data."""
  # Every float below is finite from here on, in float32 too, which the
  # run computes in (1e300 would be inf there).
  for field, value in sorted(config.items()):
    if isinstance(value, float) and not abs(value) <= _FLOAT32_MAX:
      raise FedkdError(f'{field} must be a finite number (float32: at most '
                       f'{_FLOAT32_MAX:.4g} in magnitude), got {value}'
                       f'{_TOO_LARGE.get(field, "")}')
  for field in _POSITIVE_INTS:
    if getattr(config, field) < 1:
      raise FedkdError(f'{field} must be >= 1, got {getattr(config, field)}')
  # PRNGKey keeps a seed's low 32 bits: 2**32 would silently rerun seed 0.
  if not 0 <= config.seed < 2**32:
    raise FedkdError(f'seed must be in [0, 2**32), got {config.seed}')
  for field in _INT32:
    _below_2_31(config, field)
  for field in _POSITIVE_FLOATS:
    value = getattr(config, field)
    if not value > 0:
      raise FedkdError(f'{field} must be a finite number > 0, got {value}')
  for field in _NON_NEGATIVE:
    if (getattr(config, field) or 0) < 0:  # None: unset (clients_per_chunk)
      raise FedkdError(f'{field} must be >= 0{_ZERO_MEANS.get(field, "")}, '
                       f'got {getattr(config, field)}')
  if config.num_devices > jax.device_count():
    raise FedkdError(
        f'num_devices must be in [0, {jax.device_count()}] (0 = all '
        f'{jax.device_count()} visible devices), got {config.num_devices}')
  for field in ('svd_energy_start', 'svd_energy_end'):
    if not 0.0 < getattr(config, field) <= 1.0:
      raise FedkdError(f'{field} must be in (0, 1], got '
                       f'{getattr(config, field)}')
  if not 0.0 <= config.dropout_rate < 1.0:
    raise FedkdError(f'dropout_rate must be in [0, 1), got '
                     f'{config.dropout_rate}')
  if not 0.0 <= config.distill_val_fraction < 1.0:
    raise FedkdError(f'distill_val_fraction must be in [0, 1) (0 = no '
                     f'validation), got {config.distill_val_fraction}')
  if not 0.0 <= config.straggler_rate <= 1.0:
    raise FedkdError(f'straggler_rate must be in [0, 1], got '
                     f'{config.straggler_rate}')
  privacy.validate(clip_norm=config.dp_clip_norm,
                   noise_multiplier=config.dp_noise_multiplier,
                   delta=config.dp_delta, accountant=config.dp_accountant)
  if config.clients_per_round > communication.MAX_CLIENTS:
    raise FedkdError(
        f'clients_per_round must be <= {communication.MAX_CLIENTS} (2**20, '
        'the most clients whose bytes a round counts exactly), got '
        f'{config.clients_per_round}; split the cohort over more rounds')
  if config.clients_per_round > config.num_clients:
    raise FedkdError(
        f'clients_per_round={config.clients_per_round} exceeds num_clients='
        f'{config.num_clients}; sample at most num_clients per round')
  if not 0.0 <= config.distill_weight <= 1.0:
    raise FedkdError(f'distill_weight must be in [0, 1], got '
                     f'{config.distill_weight}')
  _one_of(config, 'algorithm', ALGORITHMS)
  _one_of(config, 'partition', METHODS)
  models.check_name(config.teacher, 'teacher')
  models.check_name(config.student, 'student')
  _one_of(config, 'client_optimizer', OPTIMIZERS)
  if config.client_optimizer in optimizers.SERVER_ONLY:
    raise FedkdError(
        f'client_optimizer {config.client_optimizer!r} is a server optimizer '
        '(Reddi et al. 2021, for server_optimizer); choose one of '
        f'{", ".join(optimizers.CLIENT_OPTIMIZERS)}')
  _one_of(config, 'server_optimizer', OPTIMIZERS)
  if config.dataset == 'synthetic':
    if min(config.synthetic_alpha, config.synthetic_beta) < 0:
      raise FedkdError('synthetic_alpha and synthetic_beta must be finite and '
                       f'>= 0, got {config.synthetic_alpha}, '
                       f'{config.synthetic_beta}')
    _below_2_31(config, 'synthetic_max_examples')
    least = synthetic.MIN_EXAMPLES
    if config.synthetic_max_examples < least:
      raise FedkdError(f'synthetic_max_examples must be >= {least} (every '
                       f'client has at least {least}), got '
                       f'{config.synthetic_max_examples}')
    # Refused before generating examples that could never fit.
    npzfile.check_memory(
        synthetic.min_bytes(config.num_clients),
        f'num_clients={config.num_clients} of dataset=synthetic need at least',
        'lower num_clients', detail=f' ({least} examples each)')
    if config.public_examples:
      raise FedkdError('public_examples must be 0 with dataset=synthetic, '
                       'whose clients hold all of its training data')
  _one_of(config, 'distill_optimizer', OPTIMIZERS)
  _one_of(config, 'distill_schedule', ('constant', 'cosine'))
  _one_of(config, 'fedkd_loss_scale', LOSS_SCALES)
  _one_of(config, 'fedkd_weighting', WEIGHTINGS)
  _validate_client_models(config)
  if config.server_model:
    if config.algorithm != 'feddf':
      raise FedkdError(f'server_model is only used by feddf, not '
                       f'{config.algorithm}; leave it empty')
    models.check_name(config.server_model, 'server_model')
  if config.dp_clip_norm > 0 and config.algorithm in NO_DP:
    raise FedkdError(
        f'dp_clip_norm: DP is not supported by {config.algorithm} '
        f'({NO_DP[config.algorithm]}); use one of {", ".join(DP_ALGORITHMS)} '
        'or set dp_clip_norm=0')
  if config.algorithm in PUBLIC_DATA and config.dataset == 'synthetic':
    raise FedkdError(f'algorithm {config.algorithm} needs public data, which '
                     'dataset=synthetic has none of (its clients hold all '
                     'its examples); use another dataset')
  if config.algorithm in _LOCAL_EVAL and config.eval_teachers < 1:
    raise FedkdError(f'algorithm {config.algorithm} is evaluated through the '
                     'clients\' models; set eval_teachers >= 1')
  if config.partition == 'dirichlet' and not config.alpha > 0:
    raise FedkdError(f'alpha must be > 0 for the dirichlet partition, got '
                     f'{config.alpha}')


def validate_steps(config, max_examples: int, num_public: int) -> None:
  """Checks that every training stage runs fewer than 2**31 steps.

  A stage's steps, epochs x batches per epoch, are a `lax.scan`'s length,
  which JAX counts in int32.

  Args:
    config: a validated run config.
    max_examples: the largest client's number of examples.
    num_public: the public examples held out.
  """
  private = (max_examples, config.batch_size, 'the largest client\'s')
  # feddf distills on the public data less its validation split.
  proxy = num_public - builder.feddf_num_val(config, num_public)
  public = (proxy, config.public_batch_size, 'the public data\'s')
  stages = [('local_epochs', private)]
  if config.algorithm == 'feddf':
    stages.append(('distill_epochs', public))
  if config.algorithm == 'fedmd':
    stages += [('digest_epochs', public), ('fedmd_transfer_epochs', public),
               ('fedmd_private_epochs', private)]
  for field, (examples, batch_size, whose) in stages:
    epochs = getattr(config, field)
    steps = clients.num_steps(examples, epochs=epochs, batch_size=batch_size)
    if steps >= 2**31:
      raise FedkdError(
          f'{field}={epochs} makes {steps:,} steps (batches of {batch_size} '
          f'over {whose} {examples} examples); they must be < 2**31, JAX '
          f'counts them in int32: lower {field}')


def _validate_client_models(config) -> None:
  """Checks `client_models`: known, distinct names, for an algorithm whose
  messages do not depend on the architecture, each taking part every round.
  """
  if not config.client_models:
    return
  names = config.client_models.split(',')
  for name in names:
    models.check_name(name, 'client_models entry')
  if len(set(names)) != len(names):
    raise FedkdError(f'client_models lists a model twice: '
                     f'{config.client_models}; list each architecture once')
  if config.algorithm not in algorithms.HETEROGENEOUS:
    raise FedkdError(
        f'client_models: not supported by {config.algorithm}, which averages '
        'the clients\' models (one architecture); use '
        f'one of {", ".join(algorithms.HETEROGENEOUS)} or leave client_models '
        'empty')
  if config.server_model:
    raise FedkdError('server_model takes one client architecture; with '
                     'client_models each architecture has its own global '
                     'model, so leave server_model empty')
  if config.clients_per_round < len(names):
    raise FedkdError(
        f'clients_per_round={config.clients_per_round} is fewer than the '
        f'{len(names)} client_models; sample at least one client of each')


def validate_models(config, input_shape, num_classes: int,
                    num_public: int) -> None:
  """Checks that the run's models take examples of `input_shape`.

  Initialises them abstractly (`jax.eval_shape`, no compute), as the run
  will, so a CNN given vector data fails here with one line, not in set-up.
  """
  built = builder.build(config, input_shape, num_classes, num_public)
  key = jax.random.PRNGKey(0)
  try:
    params = built.init_params and jax.eval_shape(built.init_params, key)
    data = _abstract_data(config.num_clients, input_shape, num_public)
    jax.eval_shape(built.init, params, key, data)
  except FedkdError:
    raise
  except Exception as e:  # pylint: disable=broad-exception-caught
    # Whatever flax or lax raise for a shape a layer cannot take.
    failing = [f'{f} {name!r}' for f in _MODEL_FIELDS
               for name in filter(None, getattr(config, f).split(','))
               if _init_fails(name, input_shape, num_classes)]
    raise FedkdError(
        f'{(failing or ["a model"])[0]} cannot take examples of shape '
        f'{input_shape} '
        f'({type(e).__name__}: {str(e).splitlines()[0][:120]}); mnist_cnn and'
        ' the ResNets need [H, W, C] images, use an MLP (seed_student, '
        'mnist_2nn, logreg) for vector data') from e


def _batch_of_one(input_shape) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)


def _abstract_data(num_clients: int, input_shape,
                   num_public: int) -> clients.ClientData:
  """Shapes of client data with one example each and labelled public data."""
  ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  return clients.ClientData(
      x=_batch_of_one(input_shape), y=ints(1), offsets=ints(num_clients),
      num_examples=ints(num_clients), max_examples=1,
      public_x=jax.ShapeDtypeStruct((num_public, *input_shape), jnp.float32),
      public_y=ints(num_public))


# Config fields naming models, in the order a failure is reported.
_MODEL_FIELDS = ('student', 'client_models', 'teacher', 'server_model')


def _init_fails(name: str, input_shape, num_classes: int) -> bool:
  try:
    jax.eval_shape(models.get_model(name, num_classes).init,
                   jax.random.PRNGKey(0), _batch_of_one(input_shape))
  except Exception:  # pylint: disable=broad-exception-caught
    return True
  return False


def validate_processes(config) -> None:
  """Checks the multi-process fields, before JAX starts."""
  if config.num_processes < 1:
    raise FedkdError(f'num_processes must be >= 1, got {config.num_processes}')
  _below_2_31(config, 'num_processes')
  if not 0 <= config.process_id < config.num_processes:
    raise FedkdError(f'process_id must be in [0, {config.num_processes}), '
                     f'got {config.process_id}')
  # JAX takes it as whole seconds in a C int.
  if not 0 < config.coordinator_timeout < 2**30:
    raise FedkdError('coordinator_timeout must be a finite number of seconds '
                     f'> 0 and < 2**30, got {config.coordinator_timeout}')
  if config.num_processes == 1:
    return  # no coordinator
  # HOST:PORT; rpartition leaves an IPv6 host's colons ([::1]:1234).
  host, colon, port = config.coordinator_address.rpartition(':')
  if not (host and colon):
    raise FedkdError('a multi-process run needs coordinator_address=HOST:PORT '
                     f'(process 0 listens there), got '
                     f'{config.coordinator_address!r}')
  if not (port.isdigit() and 1 <= int(port) <= 65535):
    raise FedkdError(f'coordinator_address={config.coordinator_address!r}: '
                     f'the port must be an integer in 1..65535, got {port!r}')


def validate_comparison(config) -> None:
  """Checks a `compare` run: every listed algorithm's config, up front."""
  names = config.compare.split(',')
  if len(set(names)) != len(names):
    raise FedkdError(f'compare lists an algorithm twice: {config.compare}')
  for name in names:
    single = config.copy_and_resolve_references()
    single.algorithm = name
    validate_config(single)
  # The runs take seeds seed .. seed + num_seeds - 1, each one a valid seed.
  if config.seed + config.num_seeds - 1 >= 2**32:
    raise FedkdError(
        f'seed + num_seeds - 1 must be below 2**32 (the last run\'s seed), '
        f'got {config.seed} + {config.num_seeds} - 1 = '
        f'{config.seed + config.num_seeds - 1}; lower seed or num_seeds')
  if not 0.0 < config.target_accuracy <= 1.0:
    raise FedkdError(f'target_accuracy must be in (0, 1], got '
                     f'{config.target_accuracy}')


def validate_workdir(workdir: str, *, create: bool = True) -> None:
  """Checks that `workdir` exists or can be made (`fedkd.workdir.Workdir`
  checks that it can be written).

  Args:
    workdir: the path.
    create: make it if missing; False only checks that it could be made.
  """
  if not workdir:
    raise FedkdError('--workdir is required: a directory for metrics.jsonl '
                     'and config.json')
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise FedkdError(f'workdir {workdir} exists and is not a directory')
  if not create and not os.path.exists(workdir):
    parent = os.path.dirname(os.path.abspath(workdir))
    while not os.path.exists(parent):
      parent = os.path.dirname(parent)
    if not (os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)):
      raise FedkdError(f'cannot create workdir {workdir}: {parent} is not a '
                       'writable directory')
    return
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise FedkdError(f'cannot create workdir {workdir}: {e.strerror}') from e
