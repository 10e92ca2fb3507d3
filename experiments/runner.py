"""Runs a config: validates it, loads its data, trains into a workdir.

`run(config, workdir)` is everything `experiments/main.py` does after parsing
flags: every check of `experiments/validation.py`, the data and its
partition, then `fedkd.train.train` with what `experiments/builder.py` makes
of the config, in a worker thread so that SIGINT/SIGTERM are handled at once
(`fedkd.stopping`).
"""

import os

from experiments import builder
from experiments import validation
from fedkd import algorithms
from fedkd import clients
from fedkd import data
from fedkd import partition
from fedkd import sharding
from fedkd import stopping
from fedkd import synthetic
from fedkd import train
from fedkd import workdir as workdir_lib
from fedkd.errors import FedkdError

# feddf and fedmd with public_examples 0 hold out this share of the training
# examples as public data.
DEFAULT_PUBLIC_FRACTION = 0.1
# Fields a resumed run may change: the rounds compute the same (evaluation,
# checkpoint cadence, layout: up to float rounding), or are checked otherwise
# (`data_dir`, `tfds_download`: where the data comes from; the dataset's
# fingerprint). `num_rounds` too, but for fedkd's energy schedule.
_RESUMABLE = frozenset({
    'overwrite', 'checkpoint_every', 'eval_every', 'eval_batch_size',
    'eval_teachers', 'num_devices', 'shard_data', 'clients_per_chunk',
    'process_id', 'coordinator_address', 'data_dir', 'target_accuracy',
    'tfds_download'})


def resumable(config) -> dict:
  """`fedkd.workdir.Workdir`'s `may_change` and `why_fixed` for `config`
  (a ConfigDict or a dict)."""
  if (config.get('algorithm') == 'fedkd' and
      config.get('svd_energy_start') != config.get('svd_energy_end')):
    return dict(may_change=_RESUMABLE, why_fixed={
        'num_rounds': 'fedkd\'s SVD energy schedule spans num_rounds, so '
                      'only a run with svd_energy_start == svd_energy_end may '
                      'change it'})
  return dict(may_change=_RESUMABLE | {'num_rounds'})


def _workdir(config, workdir: str, fingerprint: str) -> workdir_lib.Workdir:
  """Locks `workdir` and checks it against this run (`Workdir`)."""
  return workdir_lib.Workdir(workdir, config.to_dict(), data=fingerprint,
                             overwrite=config.overwrite,
                             num_rounds=config.num_rounds, **resumable(config))


def num_public(config, num_train: int) -> int:
  """Training examples to hold out as public data.

  `public_examples`, or where it is 0 for an algorithm that needs public data
  (feddf, fedmd), `DEFAULT_PUBLIC_FRACTION` of the `num_train` examples.
  """
  if config.public_examples or config.algorithm not in algorithms.PUBLIC_DATA:
    return config.public_examples
  return max(1, int(DEFAULT_PUBLIC_FRACTION * num_train))


def load_data(config):
  """The dataset, its partition into clients and the public data.

  Returns:
    (dataset, parts, public_x, public_y); `public_y` is empty unless the
    algorithm reads the public labels (`builder.public_labels`).
  """
  if config.dataset == 'synthetic':
    dataset, parts = synthetic.synthetic(
        config.num_clients, alpha=config.synthetic_alpha,
        beta=config.synthetic_beta,
        max_examples=config.synthetic_max_examples, seed=config.seed)
    return dataset, parts, dataset.x_train[:0], dataset.y_train[:0]
  dataset = data.load_dataset(config.dataset, config.data_dir or None,
                              download=config.tfds_download)
  held_out = num_public(config, len(dataset.y_train))
  dataset, public_x, public_y = data.hold_out_public(
      dataset, held_out, config.seed)
  try:
    parts = partition.partition(
        dataset.y_train, config.num_clients, config.partition,
        alpha=config.alpha, shards_per_client=config.shards_per_client,
        seed=config.seed)
  except FedkdError as e:
    if not held_out:
      raise
    # The partition counts only what the hold-out left; say where the rest
    # went, or the advice (fewer clients) misses the setting that took it.
    raise FedkdError(
        f'{e} ({held_out} of the {held_out + len(dataset.y_train)} '
        'training examples are held out as public data; set '
        'public_examples lower)') from e
  if not builder.public_labels(config):
    public_y = public_y[:0]  # e.g. fd's and fedkd's runs have none
  return dataset, parts, public_x, public_y


def _partition_name(config) -> str:
  return 'natural' if config.dataset == 'synthetic' else config.partition


def run(config, workdir: str, *, progress: bool = True) -> list[dict]:
  """Trains as configured, writing results to `workdir` (see fedkd.workdir).

  Validates all input before writing anything to `workdir`.

  The work runs in a worker thread, so SIGINT/SIGTERM are handled at once
  from any point, compilation included (see `fedkd.stopping`).

  Returns:
    The rows of metrics.jsonl, one per evaluated round.

  Raises:
    FedkdError: bad input (`OutOfMemory`: a setting too large for memory).
    Diverged: the global model became NaN/inf, or (`NoFiniteClients`)
      every client update did for `max_nonfinite_rounds` rounds in a row.
    Interrupted: SIGINT/SIGTERM once the workdir was in use.
  """
  with stopping.handling_signals() as stop, train.out_of_space_is(workdir), \
      train.out_of_memory_is('during the run', train.RUN_ADVICE):
    rows = stopping.run_in_worker(_run, config, workdir, stop, progress)
  # Checked once the handlers are restored, so no signal falls in between.
  if stop.signum:
    # It came after the run's last check (final_params.msgpack written):
    # stop as at any other point, so that `compare` runs no further.
    raise train.Interrupted(stop.signum, config.num_rounds,
                            config.num_rounds)
  return rows


def _checked_data(config):
  """Validates `config` and its data.

  Returns:
    (dataset, parts, public_x, public_y, the fingerprint a checkpoint keeps).
  """
  validation.validate_config(config)
  dataset, parts, public_x, public_y = load_data(config)
  validation.validate_steps(config, max(map(len, parts)), len(public_x))
  validation.validate_models(config, dataset.x_train.shape[1:],
                             dataset.num_classes, len(public_x))
  # Only runs that read the public labels hash them: other checkpoints keep
  # their fingerprints.
  labels = (public_y,) if len(public_y) else ()
  return (dataset, parts, public_x, public_y,
          data.fingerprint(dataset, public_x, *labels))


def check(config, workdir: str) -> None:
  """Refuses what `run` would refuse before training; trains nothing.

  The config, its data and the models are checked; an existing `workdir` is
  locked, checked against the run and released, a missing one is not made.
  `experiments/compare.py` checks every sub-run so before the first starts.

  Raises:
    FedkdError: as `run` would before its first round.
  """
  with train.out_of_space_is(workdir), train.out_of_memory_is(
      'checking the data', train.RUN_ADVICE):
    *_, fingerprint = _checked_data(config)
    validation.validate_workdir(workdir, create=False)
    if os.path.isdir(workdir):
      _workdir(config, workdir, fingerprint).close()


def _run(config, workdir: str, stop: stopping.Stopper, progress: bool):
  validation.validate_processes(config)
  sharding.initialize_distributed(config.coordinator_address,
                                  config.num_processes, config.process_id,
                                  config.coordinator_timeout)
  stop.phase('data loading')
  dataset, parts, public_x, public_y, fingerprint = _checked_data(config)
  validation.validate_workdir(workdir)
  # Locks the workdir and refuses another run's files before the set-up;
  # nothing in it changes before the loop starts.
  work = _workdir(config, workdir, fingerprint)
  try:
    if config.algorithm in algorithms.PUBLIC_DATA and not (
        config.public_examples):
      print(f'public data: {len(public_x)} training examples held out '
            f'({DEFAULT_PUBLIC_FRACTION:.0%}, as public_examples is 0)')
    if num_val := builder.feddf_num_val(config, len(public_x)):
      print(f'feddf validates its distillation on {num_val} of the '
            f'{len(public_x)} public examples (distill_val_fraction)')
    print(f'{_partition_name(config)} partition of {dataset.name}:')
    print(partition.describe(dataset.y_train, parts, dataset.num_classes))
    built = builder.build(config, dataset.x_train.shape[1:],
                          dataset.num_classes, len(public_x))
    client_data = clients.stack_clients(
        dataset.x_train, dataset.y_train, parts).replace(
            public_x=public_x, public_y=public_y)
    rows = train.train(builder.settings(config), built, client_data,
                       (dataset.x_test, dataset.y_test), work, stop,
                       progress=progress)
  finally:
    work.close()
  print(train.format_table(rows))
  return rows
