"""Datasets as numpy arrays: scikit-learn digits, a user's .npz, or TFDS.

TFDS datasets are read as ArrayRecord files (`as_data_source`), which needs no
TensorFlow. A dataset not prepared in `data_dir` is downloaded and prepared on
first use, as `tfds.load` does; where that cannot happen (offline, or a
builder that needs TensorFlow), the error gives the command that prepares it.
"""

import dataclasses
import hashlib
import os
import socket
import urllib.parse
import urllib.request

import numpy as np
from sklearn import datasets as sk_datasets
from sklearn import model_selection
import tensorflow_datasets as tfds

from fedkd import errors
from fedkd import npzfile

NPZ_PREFIX = 'npz:'
_NPZ_KEYS = ('x_train', 'y_train', 'x_test', 'y_test')
# The digits test set is fixed across runs: its own seed, not the run seed.
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0
# Records fetched per batched TFDS read.
_TFDS_READ_CHUNK = 8192


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A classification dataset held in memory.

  Attributes:
    name: the name it was loaded by.
    x_train: float32 [N, H, W, C] images or [N, D] vectors, about in [0, 1].
    y_train: int32 [N] labels in [0, num_classes).
    x_test: float32, the same per-example shape as `x_train`.
    y_test: int32 labels in [0, num_classes).
    num_classes: number of classes.
  """

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int


def fingerprint(dataset: Dataset, *more: np.ndarray) -> str:
  """sha256 (hex) of the dataset's arrays and `more`: dtypes, shapes, bytes.

  A checkpoint keeps it, so a run never resumes on data that changed.
  """
  h = hashlib.sha256(f'{dataset.num_classes};'.encode())
  for a in (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test,
            *more):
    a = np.ascontiguousarray(a)
    h.update(f'{a.dtype.str}{a.shape};'.encode())
    h.update(a.data)
  return h.hexdigest()


def load_dataset(name: str, data_dir: str | None = None, *,
                 download: bool = True) -> Dataset:
  """Loads a dataset by name.

  Args:
    name: `digits` (scikit-learn's 8x8 digits), `npz:PATH` (a .npz file with
      arrays x_train, y_train, x_test, y_test) or the name of a TFDS image
      classification dataset such as `mnist` or `cifar10`.
    data_dir: TFDS data directory; None means TFDS's default
      ($TFDS_DATA_DIR or ~/tensorflow_datasets). Only used for TFDS.
    download: download and prepare a TFDS dataset that `data_dir` lacks.

  Returns:
    The dataset.

  Raises:
    FedkdError: the name is unknown, the .npz file is missing or malformed, or
      the TFDS dataset is not prepared under `data_dir` and cannot be (or
      `download` is False).
  """
  if name == 'digits':
    return _load_digits()
  if name.startswith(NPZ_PREFIX):
    return _load_npz(name, name[len(NPZ_PREFIX):])
  _check_tfds_name(name)
  if data_dir:
    _check_data_dir(data_dir)
  return _load_tfds(name, data_dir, download)


def _check_data_dir(data_dir: str) -> None:
  """Refuses a `data_dir` that is, or lies under, something not a directory
  (TFDS would report a failed download)."""
  path = os.path.abspath(data_dir)
  while not os.path.exists(path):  # a missing directory is made
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise errors.FedkdError(
        f'data_dir {data_dir} is not a directory ({path} is a file); set'
        ' data_dir to a directory, or to \'\' for the TFDS default'
    )


def _check_tfds_name(name: str) -> None:
  """Refuses a dataset name that TFDS cannot parse, before TFDS sees it."""
  if not name.strip():
    raise errors.FedkdError(
        'dataset is empty; use digits, synthetic, npz:PATH or a TFDS image'
        ' classification dataset such as mnist'
    )
  try:
    tfds.core.naming.parse_builder_name_kwargs(name)
  except ValueError as e:
    raise errors.FedkdError(
        f'dataset {name!r} is neither digits, synthetic, npz:PATH nor a TFDS'
        ' name (NAME[/CONFIG][:VERSION], e.g. mnist or cifar10)'
    ) from e


def _load_digits() -> Dataset:
  """Loads digits as [N, 8, 8, 1] images in [0, 1].

  The train/test split is stratified with test fraction 0.2 and a fixed seed
  (0) that does not depend on the run seed, so every run sees the same test
  set.

  Returns:
    The dataset.
  """
  digits = sk_datasets.load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., np.newaxis]
  y = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      x,
      y,
      test_size=_DIGITS_TEST_FRACTION,
      random_state=_DIGITS_SPLIT_SEED,
      stratify=y,
  )
  return Dataset('digits', x_train, y_train, x_test, y_test, num_classes=10)


# Labels may leave most of 0..max unused up to this many classes.
_MAX_SPARSE_CLASSES = 1 << 16


def _load_npz(name: str, path: str) -> Dataset:
  """Loads and validates a user's .npz file."""
  arrays = _read_npz(path)
  missing = [k for k in _NPZ_KEYS if k not in arrays]
  if missing:
    raise errors.FedkdError(
        f'{path}: missing arrays {", ".join(missing)}; a dataset .npz needs'
        f' {", ".join(_NPZ_KEYS)}'
    )
  x_train, y_train = _check_npz_split(path, 'train', arrays)
  x_test, y_test = _check_npz_split(path, 'test', arrays)
  if x_train.shape[1:] != x_test.shape[1:]:
    raise errors.FedkdError(
        f'{path}: x_train examples have shape {x_train.shape[1:]} but x_test'
        f' examples have shape {x_test.shape[1:]}; they must match'
    )
  num_classes = int(max(y_train.max(), y_test.max())) + 1
  # The models get a logit, the partition a row, for each of 0..max: labels
  # such as 0..3 and 10**6 would mean a million classes, nearly all unused.
  # Subsets that keep their labels (3 and 8 of digits: 9 logits) run.
  used = len(np.union1d(y_train, y_test))
  if used < 2:
    raise errors.FedkdError(
        f'{path}: every label is {num_classes - 1}; classification needs at'
        ' least two classes, labelled 0..K-1'
    )
  if 2 * used < num_classes > _MAX_SPARSE_CLASSES:
    raise errors.FedkdError(
        f'{path}: the largest label is {num_classes - 1} but only {used} of'
        f' the {num_classes:,} classes 0..{num_classes - 1} occur; relabel'
        f' them to 0..{used - 1}, e.g. labels, y = np.unique(y,'
        ' return_inverse=True) over y_train and y_test together'
    )
  return Dataset(name, x_train, y_train, x_test, y_test, num_classes)


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """Returns those of the dataset arrays that the .npz file holds."""
  return npzfile.read(path, _NPZ_KEYS)


def _check_npz_split(
    path: str, split: str, arrays: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
  """Validates one split of a .npz and converts it to float32 x, int32 y."""
  x_key, y_key = f'x_{split}', f'y_{split}'
  x, y = arrays[x_key], arrays[y_key]
  if x.ndim not in (2, 3, 4):
    raise errors.FedkdError(
        f'{path}: {x_key} has shape {x.shape}; use [N, D] vectors or'
        ' [N, H, W] / [N, H, W, C] images'
    )
  if 0 in x.shape[1:]:
    raise errors.FedkdError(
        f'{path}: {x_key} has shape {x.shape}: examples without features;'
        ' every example needs at least one value'
    )
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise errors.FedkdError(
        f'{path}: {y_key} must be a 1-D array of integer labels, got shape'
        f' {y.shape} and dtype {y.dtype}'
    )
  if len(x) != len(y):
    raise errors.FedkdError(
        f'{path}: {x_key} has {len(x)} examples but {y_key} has {len(y)};'
        ' they must match'
    )
  if not len(x):
    raise errors.FedkdError(f'{path}: the {split} split is empty')
  # Checked before the int32 cast, which would wrap (uint64 2**32 + 1 -> 1).
  if y.min() < 0 or y.max() >= np.iinfo(np.int32).max:
    raise errors.FedkdError(
        f'{path}: {y_key} has labels in [{y.min()}, {y.max()}]; labels must be'
        ' 0, 1, ..., num_classes - 1: not negative, below 2**31 - 1'
    )
  if np.issubdtype(x.dtype, np.integer):
    # Integer features are 8-bit pixels; anything else would be mis-scaled.
    if x.min() < 0 or x.max() > 255:
      raise errors.FedkdError(
          f'{path}: integer {x_key} must hold pixel values in [0, 255], got'
          f' [{x.min()}, {x.max()}]; save float features scaled to about'
          ' [0, 1] instead'
      )
    x = x.astype(np.float32) / 255
  elif np.issubdtype(x.dtype, np.floating):
    with np.errstate(over='ignore'):  # Overflow becomes inf, caught below.
      x = x.astype(np.float32)
    if not np.isfinite(x).all():
      raise errors.FedkdError(
          f'{path}: {x_key} has NaN or infinite values (as float32); remove'
          ' or replace them'
      )
  else:
    raise errors.FedkdError(
        f'{path}: {x_key} must hold integers or floats, got dtype {x.dtype}'
    )
  if x.ndim == 3:
    x = x[..., np.newaxis]  # [N, H, W] grayscale -> one channel.
  return x, y.astype(np.int32)


def _configs_of(dataset: str, shown: int = 10) -> str:
  """'; its configs are ...', for an error about a config it lacks."""
  names = [c.name for c in tfds.builder_cls(dataset).BUILDER_CONFIGS]
  if not names:
    return f'; {dataset} has no configs, name it alone'
  more = f' and {len(names) - shown} more' if len(names) > shown else ''
  return f'; its configs are {", ".join(names[:shown])}{more}'


def _load_tfds(name: str, data_dir: str | None, download: bool) -> Dataset:
  """Reads a TFDS image classification dataset into memory.

  Prepares it first (array_record files) if `data_dir` lacks it.
  """
  try:
    builder = tfds.builder(name, data_dir=data_dir,
                           file_format='array_record')
  except tfds.core.DatasetNotFoundError as e:
    raise errors.FedkdError(
        f'unknown dataset {name!r}; use digits, npz:PATH or any TFDS image'
        ' classification dataset (e.g. mnist, fashion_mnist, cifar10)'
    ) from e
  except (AssertionError, ValueError) as e:  # a version or config it lacks
    # 'Failed to construct dataset "mnist", builder_kwargs "{...}": WHY\n...'
    why = str(e).partition('}": ')[2].split('\n')[0] or str(e)
    if 'BuilderConfig' in why:  # TFDS's list of near names can be empty
      why = why.partition('. Here')[0] + _configs_of(name.split('/')[0])
    raise errors.FedkdError(
        f'dataset {name!r}: {why} (NAME[/CONFIG][:VERSION])') from e
  features = builder.info.features
  image = features['image'] if 'image' in features else None
  label = features['label'] if 'label' in features else None
  if (
      not isinstance(label, tfds.features.ClassLabel)
      or image is None
      or image.np_dtype != np.uint8
      or len(image.shape) != 3
      or None in image.shape
  ):
    raise errors.FedkdError(
        f'TFDS dataset {name!r} is not a fixed-size image classification'
        ' dataset (needs a uint8 [H, W, C] "image" and a class "label");'
        ' use e.g. mnist, fashion_mnist or cifar10'
    )
  # is_prepared() logs a warning for a version directory that is missing.
  if not (builder.data_path.exists() and builder.is_prepared()):
    _prepare(builder, name, download)
  x_train, y_train = _read_tfds_split(builder, name, 'train')
  x_test, y_test = _read_tfds_split(builder, name, 'test')
  return Dataset(
      name, x_train, y_train, x_test, y_test, int(label.num_classes)
  )


def _build_command(name: str, root: str, *flags: str) -> str:
  """The shell command that prepares TFDS dataset `name` under `root`.

  The `tfds` command line tool imports TensorFlow, as do many builders.
  """
  return (f'`pip install tensorflow && tfds build {name} --data_dir={root}'
          f' --file_format=array_record{"".join(" " + f for f in flags)}`')


def _prepare(builder: tfds.core.DatasetBuilder, name: str,
             download: bool) -> None:
  """Downloads and prepares `builder`'s dataset, as `tfds.load` would."""
  root = builder.data_dir_root
  command = _build_command(name, root)
  if not download:
    raise errors.FedkdError(
        f'TFDS dataset {name!r} is not prepared under {root} and downloading'
        f' is off (tfds_download=False); run {command}, or turn downloading'
        ' on'
    )
  try:
    _probe_download_hosts(builder)
  except OSError as e:
    raise errors.FedkdError(
        _preparation_failure(e, builder, name, command)) from e
  print(f'downloading and preparing TFDS dataset {name!r} under {root} '
        '(tfds_download=False turns this off)', flush=True)
  try:
    builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
    # Any dataset's own download and generation code runs here; what it
    # raises is reported as one line, with the way to prepare it elsewhere.
    raise errors.FedkdError(
        _preparation_failure(e, builder, name, command)) from e


# Seconds a download host has to take a TCP connection before preparing.
_PROBE_TIMEOUT_S = 10


def _probe_download_hosts(builder: tfds.core.DatasetBuilder) -> None:
  """Connects to each host that `builder` downloads from (its checksums'
  URLs), so that a machine without internet fails in seconds, not after
  TFDS's retries (minutes). Skipped through a proxy, which may reach what
  this machine cannot, and where `DATA_DIR/downloads` holds files.

  Raises:
    ConnectionError: a host cannot be reached.
  """
  if urllib.request.getproxies():
    return
  downloads = os.path.join(builder.data_dir_root, 'downloads')
  if os.path.isdir(downloads) and os.listdir(downloads):
    return  # TFDS may prepare offline from files fetched or placed there
  try:
    urls = list(builder.url_infos or ())  # None without a checksums file
  except Exception:  # pylint: disable=broad-except
    return  # a builder whose checksums TFDS cannot read: not probed
  hosts = set()
  for url in urls:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ('http', 'https') and parts.hostname:
      default_port = 443 if parts.scheme == 'https' else 80
      hosts.add((parts.hostname, parts.port or default_port))
  for host, port in sorted(hosts):
    try:
      socket.create_connection((host, port), _PROBE_TIMEOUT_S).close()
    except OSError as e:
      raise ConnectionError(f'cannot reach {host}:{port} ({e})') from e


def _preparation_failure(e: Exception, builder: tfds.core.DatasetBuilder,
                         name: str, command: str) -> str:
  """One line: why `builder` could not be prepared here, and what to run."""
  root = builder.data_dir_root
  lines = str(e).strip().splitlines()
  cause = f'{type(e).__name__}: {lines[0][:160] if lines else ""}'
  if isinstance(e, ImportError):
    if (e.name or '').partition('.')[0] == 'tensorflow':
      return (f'TFDS dataset {name!r} needs TensorFlow to be prepared'
              f' ({cause}); run {command}')
    return (f'TFDS dataset {name!r} needs the Python module {e.name} to be'
            f' prepared ({cause}); install it, then run {command}')
  if isinstance(e, OSError) and e.errno in errors.NO_SPACE_ERRNOS:
    return (f'no space left under {root} to prepare TFDS dataset {name!r}'
            f' ({cause}); free space there or set data_dir to a disk with'
            ' room')
  if isinstance(e, OSError):  # requests' and urllib's errors are OSErrors.
    return (f'cannot download TFDS dataset {name!r} ({cause}); without'
            f' internet here, run {command} on a machine with internet and'
            f' copy {root}/{builder.name} here')
  return f'cannot prepare TFDS dataset {name!r} ({cause}); run {command}'


def _read_tfds_split(
    builder: tfds.core.DatasetBuilder,
    name: str,
    split: str,
) -> tuple[np.ndarray, np.ndarray]:
  """Returns float32 [N, H, W, C] images in [0, 1] and int32 [N] labels."""
  # Split names are only known once the dataset is prepared.
  known_splits = list(builder.info.splits)
  if known_splits and split not in known_splits:
    raise errors.FedkdError(
        f'TFDS dataset {name!r} has no {split!r} split (only'
        f' {", ".join(known_splits)}); fedkd needs train and test splits'
    )
  root = builder.data_dir_root
  try:
    source = builder.as_data_source(split=split)
  except KeyError as e:  # No splits: a preparation that wrote nothing.
    raise errors.FedkdError(
        f'TFDS dataset {name!r} is not prepared under {root}; run'
        f' {_build_command(name, root)}'
    ) from e
  except NotImplementedError as e:
    # Prepared in another file format (tfrecord), which needs TensorFlow.
    raise errors.FedkdError(
        f'TFDS dataset {name!r} is prepared under {root} without array_record'
        ' files, which fedkd reads without TensorFlow; run'
        f' {_build_command(name, root, "--overwrite")}'
    ) from e
  if not len(source):
    raise errors.FedkdError(f'TFDS dataset {name!r}: split {split!r} is empty')
  images, labels = [], []
  # Batched reads: ArrayRecord fetches a list of keys far faster than one
  # key at a time.
  for start in range(0, len(source), _TFDS_READ_CHUNK):
    keys = range(start, min(start + _TFDS_READ_CHUNK, len(source)))
    records = source.__getitems__(keys)
    images.append(np.stack([r['image'] for r in records]))
    labels.append(np.array([r['label'] for r in records]))
  x = np.concatenate(images).astype(np.float32)
  x /= 255
  return x, np.concatenate(labels).astype(np.int32)


def hold_out_public(dataset: Dataset, num_public: int, seed: int):
  """Splits `num_public` random training examples off as public data.

  Returns:
    (dataset without them, public features, public labels).
  """
  if num_public >= len(dataset.y_train):
    raise errors.FedkdError(
        f'public_examples={num_public} leaves no training data: '
        f'{dataset.name} has {len(dataset.y_train)} training examples')
  order = np.random.default_rng([seed, 1]).permutation(len(dataset.y_train))
  public, train = order[:num_public], np.sort(order[num_public:])
  return (dataclasses.replace(dataset, x_train=dataset.x_train[train],
                              y_train=dataset.y_train[train]),
          dataset.x_train[public], dataset.y_train[public].astype(np.int32))
