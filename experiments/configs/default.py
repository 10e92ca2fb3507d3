"""Default run: local KD on scikit-learn digits, 100 clients, Dirichlet 0.5.

Every client trains a private `seed_teacher` MLP on its labels and distills it
into the shared `seed_student` MLP; the server averages the students.

    python experiments/main.py \
        --config=experiments/configs/default.py \
        --workdir=/tmp/fedkd_default

Hardware: a laptop CPU (about 20 seconds with 2 cores, compile included;
14 s on the 2-core CPU of development, 2026-11-29).
Expected: global student test accuracy >= 0.90 after 30 rounds.
`--config=experiments/configs/default.py:smoke` runs 2 rounds.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Data and partition.
  c.dataset = 'digits'  # digits | synthetic | npz:PATH | TFDS dataset name
  c.data_dir = ''  # TFDS data_dir; '' = the TFDS default
  c.tfds_download = True  # TFDS: download and prepare what data_dir lacks
  # dataset='synthetic': Synthetic(alpha, beta) of Li et al. 2020, generated
  # per client (its own natural partition; `partition` is not used).
  c.synthetic_alpha = 1.0
  c.synthetic_beta = 1.0
  c.synthetic_max_examples = 500  # truncates the lognormal client sizes
  c.partition = 'dirichlet'  # iid | dirichlet | shards
  c.alpha = 0.5  # Dirichlet concentration (dirichlet only)
  c.shards_per_client = 2  # shards only
  c.num_clients = 100
  c.clients_per_round = 100
  # Algorithm and models.
  # fedavg | fedprox | fedntd | local_kd | fedkd | feddf | fd | fedmd
  c.algorithm = 'local_kd'
  c.teacher = 'seed_teacher'
  c.student = 'seed_student'
  # Clients of different architectures, 'NAME,NAME,...': client i trains
  # NAME[i % k] (feddf, fedmd, fd: as its model, '' = `student`; local_kd,
  # fedkd: as its private teacher, '' = `teacher`).
  c.client_models = ''
  c.num_rounds = 30
  c.local_epochs = 5
  c.batch_size = 10
  c.client_optimizer = 'sgd'  # sgd | momentum | adam | yogi
  c.client_lr = 0.1  # the student's local learning rate
  c.teacher_lr = 0.1  # the private teachers' learning rate
  # sgd with lr 1.0 = FedAvg's weighted mean; momentum | fedadam | fedyogi
  # (Reddi et al. 2021) | adam | yogi for FedOpt.
  c.server_optimizer = 'sgd'
  c.server_lr = 1.0
  c.temperature = 2.0
  c.distill_weight = 0.5  # local_kd, fd: (1 - w) CE + w KD
  c.prox_mu = 1.0  # fedprox: proximal coefficient (paper's best, MNIST)
  c.ntd_beta = 1.0  # fedntd: weight of the not-true distillation
  c.ntd_tau = 1.0  # fedntd: its temperature (paper and official code)
  # fedkd: SVD energy start + (r + 1) / R (end - start) in round r of R.
  c.svd_energy_start = 0.95
  c.svd_energy_end = 0.98
  c.fedkd_loss_scale = 'batch'  # batch (official code) | example
  c.fedkd_weighting = 'uniform'  # uniform (official mean) | examples
  # Public (proxy) data: held out of the training set (feddf, fedmd).
  c.public_examples = 0
  c.public_batch_size = 50
  c.distill_optimizer = 'adam'  # feddf: server distillation optimizer
  c.distill_lr = 1e-3
  c.distill_epochs = 1  # feddf: server passes over the public data
  c.distill_temperature = 1.0  # feddf: T of KL(ensemble_T || global_T)
  c.distill_schedule = 'cosine'  # feddf: cosine | constant learning rate
  c.distill_clip_norm = 5.0  # feddf: gradient norm clip (0 = none)
  # feddf: share of the public data kept labelled to validate the server's
  # distillation (keeps the best model; 0 = none), and every how many steps;
  # it stops this many steps after the best (official: 0.1, 100, 1000).
  c.distill_val_fraction = 0.1
  c.distill_eval_every = 100
  c.distill_patience = 1000
  c.server_model = ''  # feddf: a separate (larger) server model; '' = none
  c.digest_epochs = 1  # fedmd: client passes over the public data
  # fedmd's transfer learning before round 1 (official code: 20, then 25).
  c.fedmd_transfer_epochs = 20  # passes over the labelled public data
  c.fedmd_private_epochs = 25  # then over each client's private data
  # Run.
  c.seed = 0
  c.eval_every = 5
  c.eval_batch_size = 1000
  c.eval_teachers = 100  # evaluate the private teachers of the first N clients
  c.num_devices = 0  # 0 = all visible devices
  c.shard_data = True  # split client examples over devices (False: copy)
  # Multi-process (multi-host): start one process per host with its id.
  c.num_processes = 1
  c.process_id = 0
  c.coordinator_address = ''  # HOST:PORT of process 0
  c.coordinator_timeout = 300.0  # seconds for every process to join
  # Clients trained at once: the cohort runs in chunks of this many (bounds
  # memory); 0 = the whole cohort; unset = from the model sizes on CPU (a
  # few MiB of parameters a device stay in cache), the whole cohort on
  # accelerators.
  c.clients_per_chunk = ml_collections.config_dict.placeholder(int)
  c.checkpoint_every = 10  # rounds between checkpoints (0 = only the last)
  c.overwrite = False  # replace a run of another config in --workdir
  # Faults, simulated inside the compiled round.
  c.dropout_rate = 0.0  # probability a sampled client never reports
  c.straggler_rate = 0.0  # probability it does only part of its local steps
  # Client-level DP (DP-FedAvg, McMahan et al. 2018); off while clip is 0.
  c.dp_clip_norm = 0.0  # S: each client's update clipped to this L2 norm
  c.dp_noise_multiplier = 0.0  # z: noise std z*S on the summed updates
  c.dp_delta = 1e-5
  c.dp_accountant = 'rdp'  # rdp | pld
  # Rounds in a row whose client updates are all NaN/inf before the run stops.
  c.max_nonfinite_rounds = 3
  # Comparison (experiments/compare.py): comma-separated algorithms run on the
  # same partition and seed, each into WORKDIR/NAME; '' = one run.
  c.compare = ''
  c.target_accuracy = 0.8  # compare: report the first round reaching it
  c.num_seeds = 1  # compare: runs per algorithm, seeds seed .. seed + n - 1
  return variant(c, arg)


def variant(c: ml_collections.ConfigDict,
            arg: str | None) -> ml_collections.ConfigDict:
  """Applies a config file's variant: none, or `smoke` (2 rounds).

  A paper config's smoke run swaps in offline digits, 10 clients and the
  small seed models, so every config runs in seconds in the tests.
  """
  if arg == 'smoke':
    c.num_rounds = 2
    c.eval_every = 1
    if c.dataset != 'digits':
      c.dataset, c.num_clients, c.clients_per_round = 'digits', 10, 10
      c.student, c.teacher = 'seed_student', 'seed_teacher'
      if c.client_models:
        c.client_models = 'seed_student,seed_teacher'
      c.public_examples = min(c.public_examples, 100)
  elif arg:
    raise ValueError(f'unknown config variant {arg!r}; use :smoke or none')
  return c
