"""Tests for fedkd.data."""

import errno
import io
import os
import socket
import sys
import tempfile
import time
import zipfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import requests
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking as tfds_mocking

from fedkd import data
from fedkd import errors
from fedkd import npzfile

_TINY_TRAIN = 12
_TINY_TEST = 5


class FedkdTinyImages(tfds.core.GeneratorBasedBuilder):
  """A real (not mocked) TFDS image dataset: image i is filled with 10 * i."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(4, 3, 2), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=3),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {
        'train': self._generate_examples(0, _TINY_TRAIN),
        'test': self._generate_examples(_TINY_TRAIN, _TINY_TEST),
    }

  def _generate_examples(self, start, count):
    for i in range(start, start + count):
      yield i, {'image': np.full((4, 3, 2), 10 * i, np.uint8), 'label': i % 3}


class FedkdOnlineImages(FedkdTinyImages):
  """Like FedkdTinyImages but downloads a file first, as real datasets do."""

  def _split_generators(self, dl_manager):
    dl_manager.download('https://fedkd.invalid/images.bin')
    return super()._split_generators(dl_manager)


def _import_tensorflow(dl_manager):
  """A builder step that imports TensorFlow, on a machine without it."""
  del dl_manager
  with mock.patch.dict(sys.modules, {'tensorflow': None}):
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import


class FedkdTinyImagesNoTest(FedkdTinyImages):
  """Like FedkdTinyImages but without a test split."""

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {'train': self._generate_examples(0, _TINY_TRAIN)}


def _getitems_without_self(record_keys, generator, serialized=False):
  """Stands in for tfds_mocking._getitems, which wants a `self` it never gets.

  tfds 4.9.10's mock_data stores `partial(_getitems, generator=...)` as a
  MagicMock's plain `__getitems__` attribute, so the data source's batched
  read calls it without `self` and fails with a TypeError.

  Args:
    record_keys: keys to read.
    generator: the mock's deterministic fake example generator.
    serialized: unused; tfds never sets it on this path.

  Returns:
    The fake examples.
  """
  del serialized
  return [generator[k] for k in record_keys]


class DigitsTest(absltest.TestCase):

  def test_shapes_dtypes_and_range(self):
    ds = data.load_dataset('digits')
    self.assertEqual(ds.name, 'digits')
    self.assertEqual(ds.num_classes, 10)
    self.assertEqual(ds.x_train.shape, (1437, 8, 8, 1))
    self.assertEqual(ds.x_test.shape, (360, 8, 8, 1))
    self.assertEqual(ds.x_train.dtype, np.float32)
    self.assertEqual(ds.y_train.dtype, np.int32)
    self.assertEqual(ds.y_test.dtype, np.int32)
    self.assertEqual(ds.x_train.min(), 0.0)
    self.assertEqual(ds.x_train.max(), 1.0)  # 16 / 16.
    np.testing.assert_array_equal(np.unique(ds.y_train), np.arange(10))

  def test_test_split_is_fixed_and_stratified(self):
    first = data.load_dataset('digits')
    again = data.load_dataset('digits')
    np.testing.assert_array_equal(first.x_test, again.x_test)
    np.testing.assert_array_equal(first.y_test, again.y_test)
    # Stratified: each class is ~20% in test.
    test_counts = np.bincount(first.y_test, minlength=10)
    all_counts = test_counts + np.bincount(first.y_train, minlength=10)
    np.testing.assert_allclose(test_counts, 0.2 * all_counts, atol=1)


class NpzTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = self.enter_context(tempfile.TemporaryDirectory())

  def _save(self, **arrays) -> str:
    path = os.path.join(self.dir, 'data.npz')
    np.savez(path, **arrays)
    return path

  def _valid(self) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return dict(
        x_train=rng.random((6, 3)),
        y_train=np.array([0, 1, 2, 0, 1, 2]),
        x_test=rng.random((4, 3)),
        y_test=np.array([0, 1, 1, 2]),
    )

  def test_vector_round_trip(self):
    arrays = self._valid()
    arrays['y_test'] = np.array([0, 1, 4, 2])  # Class 4 is only in test.
    path = self._save(**arrays)
    ds = data.load_dataset(f'npz:{path}')
    self.assertEqual(ds.name, f'npz:{path}')
    self.assertEqual(ds.num_classes, 5)
    self.assertEqual(ds.x_train.dtype, np.float32)
    self.assertEqual(ds.y_train.dtype, np.int32)
    np.testing.assert_allclose(ds.x_train, arrays['x_train'], rtol=1e-6)
    np.testing.assert_allclose(ds.x_test, arrays['x_test'], rtol=1e-6)
    np.testing.assert_array_equal(ds.y_train, arrays['y_train'])
    np.testing.assert_array_equal(ds.y_test, arrays['y_test'])

  def test_uint8_images_are_scaled_and_get_a_channel(self):
    x_train = np.array([[[0, 255], [51, 102]]] * 3, np.uint8)  # [3, 2, 2]
    path = self._save(
        x_train=x_train,
        y_train=np.array([0, 1, 1], np.uint8),
        x_test=x_train[:1],
        y_test=np.array([1]),
    )
    ds = data.load_dataset(f'npz:{path}')
    self.assertEqual(ds.x_train.shape, (3, 2, 2, 1))
    self.assertEqual(ds.x_test.shape, (1, 2, 2, 1))
    np.testing.assert_allclose(ds.x_train[0, ..., 0], [[0, 1], [0.2, 0.4]])
    self.assertEqual(ds.num_classes, 2)

  @parameterized.named_parameters(
      ('missing_keys', dict(x_test=None, y_test=None), 'x_test, y_test'),
      ('length_mismatch', dict(y_train=np.zeros(5, int)), '6 examples but'),
      ('labels_2d', dict(y_train=np.zeros((6, 1), int)), '1-D array of int'),
      ('labels_float', dict(y_train=np.zeros(6)), '1-D array of integer'),
      ('negative_label', dict(y_test=np.array([0, -1, 1, 2])), 'negative'),
      ('sparse_labels', dict(y_test=np.array([0, 1, 2, 10**6])),
       r'largest label is 1000000 but only 4 of the 1,000,001 classes '
       r'0..1000000 occur; relabel them to 0..3'),
      ('sparse_int32_labels', dict(y_test=np.array([0, 1, 2, 2**31 - 2])),
       'largest label is 2147483646 but only 4'),
      ('one_class', dict(y_train=np.ones(6, int), y_test=np.ones(4, int)),
       'every label is 1; classification needs at least two classes'),
      ('more_than_half_unused', dict(y_test=np.array([0, 1, 2, 2**16])),
       'only 4 of the 65,537 classes'),
      ('nan', dict(x_train=np.full((6, 3), np.nan)), 'NaN or infinite'),
      ('inf', dict(x_test=np.full((4, 3), np.inf)), 'NaN or infinite'),
      ('float32_overflow', dict(x_test=np.full((4, 3), 1e300)), 'infinite'),
      ('shape_mismatch', dict(x_test=np.zeros((4, 5))), r'\(3,\).*\(5,\)'),
      (
          'empty',
          dict(x_test=np.zeros((0, 3)), y_test=np.zeros(0, int)),
          'test split is empty',
      ),
      ('x_1d', dict(x_train=np.zeros(6)), 'x_train has shape'),
      ('int_not_pixels', dict(x_train=np.full((6, 3), 300)), r'\[0, 255\]'),
      ('strings', dict(x_train=np.full((6, 3), 'a')), 'integers or floats'),
      ('zero_width', dict(x_train=np.zeros((6, 0)), x_test=np.zeros((4, 0))),
       'without features'),
      ('zero_channels', dict(x_train=np.zeros((6, 2, 2, 0))),
       r'\(6, 2, 2, 0\): examples without features'),
  )
  def test_bad_arrays_raise(self, changes, message):
    arrays = self._valid() | changes
    path = self._save(**{k: v for k, v in arrays.items() if v is not None})
    with self.assertRaisesRegex(errors.FedkdError, message):
      data.load_dataset(f'npz:{path}')

  def test_missing_file_raises(self):
    with self.assertRaisesRegex(errors.FedkdError, 'cannot read'):
      data.load_dataset(f'npz:{self.dir}/absent.npz')

  def test_not_numpy_file_raises(self):
    path = os.path.join(self.dir, 'data.npz')
    with open(path, 'w') as f:
      f.write('x_train,y_train\n')
    with self.assertRaisesRegex(errors.FedkdError, 'cannot read'):
      data.load_dataset(f'npz:{path}')

  def test_npy_file_raises(self):
    path = os.path.join(self.dir, 'data.npy')
    np.save(path, np.zeros(3))
    with self.assertRaisesRegex(errors.FedkdError, 'not an .npz archive'):
      data.load_dataset(f'npz:{path}')

  @parameterized.parameters((7, 8), (8, 9), (2**16 - 1, 2**16))
  def test_sparse_labels_up_to_2_16_classes_are_accepted(self, label,
                                                          classes):
    # Half of 0..7 used; or a subset keeping its labels (0, 1, 2, 8 of 9).
    arrays = self._valid() | dict(y_test=np.array([0, 1, 2, label]))
    ds = data.load_dataset(f'npz:{self._save(**arrays)}')
    self.assertEqual(ds.num_classes, classes)

  def test_pickled_object_array_raises(self):
    arrays = self._valid() | dict(y_train=np.array([0, 1, 2, 0, 1, 2], object))
    path = self._save(**arrays)
    # Said once: `read` does not wrap its own errors again.
    with self.assertRaisesRegex(
        errors.FedkdError, f'^cannot read .npz file {path}: y_train holds '
        r'Python objects \(dtype object\); save numeric arrays$'):
      data.load_dataset(f'npz:{path}')

  def _claiming(self, shape) -> str:
    """A .npz whose x_train header claims `shape` over 24 bytes of data."""
    arrays = self._valid()
    del arrays['x_train']
    path = self._save(**arrays)
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        member, {'descr': '<f8', 'fortran_order': False, 'shape': shape})
    with zipfile.ZipFile(path, 'a') as archive:
      archive.writestr('x_train.npy', member.getvalue() + bytes(24))
    return path

  def test_header_claiming_more_than_the_file_raises_before_loading(self):
    path = self._claiming((10**12, 3))
    with mock.patch.object(np, 'load', side_effect=AssertionError('loaded')):
      with self.assertRaisesRegex(
          errors.FedkdError, r'x_train claims shape \(1000000000000, 3\) of '
          r'float64 \(24,000,000,000,000 bytes\) but the archive holds 24 '):
        data.load_dataset(f'npz:{path}')

  def test_arrays_larger_than_memory_raise_before_loading(self):
    path = self._save(**self._valid())
    # 6 * 3 + 4 * 3 float64 features and 10 int64 labels: 320 bytes.
    with mock.patch.object(npzfile, 'memory_bytes', return_value=319), \
        mock.patch.object(np, 'load', side_effect=AssertionError('loaded')):
      with self.assertRaisesRegex(errors.FedkdError, 'more than this machine'):
        data.load_dataset(f'npz:{path}')
    with mock.patch.object(npzfile, 'memory_bytes', return_value=320):
      data.load_dataset(f'npz:{path}')

  def test_device_and_directory_paths_raise(self):
    for path in ('/dev/zero', self.dir):
      with self.assertRaisesRegex(errors.FedkdError, 'not a regular file'):
        data.load_dataset(f'npz:{path}')

  def test_fifo_path_raises_without_reading_it(self):
    path = os.path.join(self.dir, 'fifo.npz')
    os.mkfifo(path)
    # Held open for writing with bytes waiting, so a reader never blocks.
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    self.addCleanup(os.close, fd)
    os.write(fd, b'not an npz' * 10)
    with self.assertRaisesRegex(errors.FedkdError, 'not a regular file'):
      data.load_dataset(f'npz:{path}')


class DatasetNameTest(parameterized.TestCase):

  @parameterized.parameters('', ' ', 'a b', '../x', 'mnist/', 'x-y')
  def test_names_tfds_cannot_parse_raise(self, name):
    with self.assertRaisesRegex(errors.FedkdError, r'^dataset .*digits, '
                                'synthetic, npz:PATH'):
      data.load_dataset(name)

  @parameterized.parameters(
      ('mnist:1.2.3', 'Dataset mnist cannot be loaded at version 1.2.3, only: 3.0.1'),
      ('mnist/foo', 'BuilderConfig foo not found with version 3.0.1; mnist '
       'has no configs, name it alone'),
      ('emnist/foo', 'BuilderConfig foo not found with version 3.1.0; its '
       'configs are byclass, bymerge, balanced, letters, digits, mnist '))
  def test_versions_and_configs_tfds_lacks_raise(self, name, why):
    with self.assertRaisesRegex(errors.FedkdError,
                                f'^dataset {name!r}: {why}'):
      data.load_dataset(name, self.create_tempdir().full_path)


class TfdsTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = self.enter_context(tempfile.TemporaryDirectory())
    # Download hosts take connections (data's probe), as on a machine with
    # internet; the tests that probe patch this again.
    self.enter_context(mock.patch.object(socket, 'create_connection'))

  def test_mocked_mnist(self):
    with (
        mock.patch.object(tfds_mocking, '_getitems', _getitems_without_self),
        tfds.testing.mock_data(
            num_examples=7, policy=tfds.testing.MockPolicy.USE_CODE
        ),
    ):
      ds = data.load_dataset('mnist', data_dir=self.dir)
    self.assertEqual(ds.name, 'mnist')
    self.assertEqual(ds.num_classes, 10)
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
      self.assertEqual(x.shape, (7, 28, 28, 1))
      self.assertEqual(x.dtype, np.float32)
      self.assertBetween(x.min(), 0.0, 1.0)
      self.assertBetween(x.max(), 0.0, 1.0)
      self.assertEqual(y.shape, (7,))
      self.assertEqual(y.dtype, np.int32)
      self.assertTrue(np.all((y >= 0) & (y < 10)), y)

  def test_prepared_array_record_dataset(self):
    FedkdTinyImages(
        data_dir=self.dir, file_format='array_record'
    ).download_and_prepare()
    with mock.patch.object(
        tfds.core.DatasetBuilder, 'download_and_prepare'
    ) as prepare:
      ds = data.load_dataset('fedkd_tiny_images', data_dir=self.dir)
    prepare.assert_not_called()
    self._check_tiny(ds)

  def test_unprepared_dataset_is_prepared_on_first_use(self):
    ds = data.load_dataset('fedkd_tiny_images', data_dir=self.dir)
    self._check_tiny(ds)
    builder = FedkdTinyImages(data_dir=self.dir, file_format='array_record')
    self.assertTrue(builder.is_prepared())
    self.assertEqual(builder.info.file_format.value, 'array_record')

  def _check_tiny(self, ds):
    self.assertEqual(ds.num_classes, 3)
    self.assertEqual(ds.x_train.shape, (_TINY_TRAIN, 4, 3, 2))
    self.assertEqual(ds.x_test.shape, (_TINY_TEST, 4, 3, 2))
    self.assertEqual(ds.x_train.dtype, np.float32)
    self.assertEqual(ds.y_test.dtype, np.int32)
    # Records come back shuffled; example i is the one filled with 10 * i.
    for x, y, first in (
        (ds.x_train, ds.y_train, 0),
        (ds.x_test, ds.y_test, _TINY_TRAIN),
    ):
      index = np.rint(x[:, 0, 0, 0] * 255 / 10).astype(int)
      np.testing.assert_array_equal(
          np.sort(index), np.arange(first, first + len(x))
      )
      pixel = (10 * index / 255)[:, np.newaxis, np.newaxis, np.newaxis]
      np.testing.assert_allclose(x, np.broadcast_to(pixel, x.shape), rtol=1e-6)
      np.testing.assert_array_equal(y, index % 3)

  def test_missing_test_split_raises(self):
    FedkdTinyImagesNoTest(
        data_dir=self.dir, file_format='array_record'
    ).download_and_prepare()
    with self.assertRaisesRegex(errors.FedkdError, "no 'test' split"):
      data.load_dataset('fedkd_tiny_images_no_test', data_dir=self.dir)

  def test_unknown_name_raises(self):
    with self.assertRaisesRegex(
        errors.FedkdError, 'unknown dataset .*digits, npz:PATH'
    ):
      data.load_dataset('no_such_dataset', data_dir=self.dir)

  def test_non_image_dataset_raises(self):
    with self.assertRaisesRegex(errors.FedkdError, 'not a fixed-size image'):
      data.load_dataset('imdb_reviews', data_dir=self.dir)

  def test_download_off_raises_without_downloading(self):
    start = time.monotonic()
    with (
        mock.patch.object(
            tfds.core.DatasetBuilder, 'download_and_prepare'
        ) as download,
        self.assertRaisesRegex(
            errors.FedkdError,
            f'not prepared under {self.dir} and downloading is off .*'
            f'`pip install tensorflow && tfds build mnist'
            f' --data_dir={self.dir} --file_format=array_record`',
        ),
    ):
      data.load_dataset('mnist', data_dir=self.dir, download=False)
    download.assert_not_called()
    self.assertLess(time.monotonic() - start, 5)
    self.assertEmpty(os.listdir(self.dir))

  def test_mocked_mnist_download(self):
    with (
        mock.patch.object(tfds_mocking, '_getitems', _getitems_without_self),
        tfds.testing.mock_data(
            num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE
        ),
    ):
      # mock_data's no-op preparation, patched again to see the call.
      with mock.patch.object(
          tfds.core.DatasetBuilder, 'download_and_prepare'
      ) as prepare:
        ds = data.load_dataset('mnist', data_dir=self.dir)
      prepare.assert_called_once()
      self.assertEqual(ds.x_train.shape, (3, 28, 28, 1))
      with self.assertRaisesRegex(errors.FedkdError, 'downloading is off'):
        data.load_dataset('mnist', data_dir=self.dir, download=False)

  def test_offline_download_names_the_command(self):
    offline = requests.exceptions.ConnectionError(
        'Failed to resolve fedkd.invalid')
    with (
        mock.patch.object(
            requests.Session, 'send', side_effect=offline
        ) as send,
        self.assertRaisesRegex(
            errors.FedkdError,
            "cannot download TFDS dataset 'fedkd_online_images' \\("
            'ConnectionError: Failed to resolve fedkd.invalid\\); without'
            ' internet here, run `pip install tensorflow && tfds build'
            f' fedkd_online_images --data_dir={self.dir}'
            ' --file_format=array_record` on a machine with internet and'
            f' copy {self.dir}/fedkd_online_images here$',
        ),
    ):
      data.load_dataset('fedkd_online_images', data_dir=self.dir)
    send.assert_called()
    self.assertFalse(FedkdOnlineImages(data_dir=self.dir).is_prepared())

  def test_unreachable_download_host_fails_before_downloading(self):
    # mnist's checksums list storage.googleapis.com; this machine is offline.
    unknown = socket.gaierror(-2, 'Name or service not known')
    with (
        mock.patch.dict(os.environ, {}, clear=True),  # no proxy
        mock.patch.object(socket, 'create_connection',
                          side_effect=unknown) as connect,
        mock.patch.object(
            tfds.core.DatasetBuilder, 'download_and_prepare'
        ) as prepare,
        self.assertRaisesRegex(
            errors.FedkdError,
            "^cannot download TFDS dataset 'mnist' \\(ConnectionError: "
            'cannot reach storage.googleapis.com:443 \\(\\[Errno -2\\] Name'
            ' or service not known\\)\\); without internet here, run',
        ),
    ):
      data.load_dataset('mnist', data_dir=self.dir)
    connect.assert_called_once_with(('storage.googleapis.com', 443), 10)
    prepare.assert_not_called()

  def test_no_probe_where_files_were_downloaded(self):
    # TFDS prepares from DATA_DIR/downloads (or its manual/) without network.
    os.makedirs(os.path.join(self.dir, 'downloads', 'manual'))
    with (
        mock.patch.dict(os.environ, {}, clear=True),
        mock.patch.object(socket, 'create_connection',
                          side_effect=OSError('offline')) as connect,
        mock.patch.object(
            tfds.core.DatasetBuilder, 'download_and_prepare',
            side_effect=RuntimeError('prepared from the downloads')),
        self.assertRaisesRegex(errors.FedkdError, 'from the downloads'),
    ):
      data.load_dataset('mnist', data_dir=self.dir)
    connect.assert_not_called()

  @parameterized.named_parameters(
      ('reachable', {}, 1),
      # A proxy may reach what this machine cannot: no probe.
      ('proxy', {'HTTPS_PROXY': 'http://proxy.invalid:3128'}, 0))
  def test_download_goes_ahead(self, env, probes):
    reached = RuntimeError('download started')
    with (
        mock.patch.dict(os.environ, env, clear=True),
        mock.patch.object(socket, 'create_connection') as connect,
        mock.patch.object(
            tfds.core.DatasetBuilder, 'download_and_prepare',
            side_effect=reached),
        self.assertRaisesRegex(errors.FedkdError, 'download started'),
    ):
      data.load_dataset('mnist', data_dir=self.dir)
    self.assertEqual(connect.call_count, probes)

  @parameterized.named_parameters(
      ('tensorflow', _import_tensorflow,
       "needs TensorFlow to be prepared \\(ModuleNotFoundError: import of"
       " tensorflow halted.*\\); run `pip install tensorflow && tfds build"),
      ('other_module', ModuleNotFoundError('no beam', name='apache_beam'),
       'needs the Python module apache_beam to be prepared .*; install it,'
       ' then run `pip install tensorflow && tfds build'),
      ('disk_full', OSError(errno.ENOSPC, 'No space left on device'),
       'no space left under .* to prepare .*; free space there'),
      ('other', RuntimeError('manual download needed\nsee the catalog'),
       "cannot prepare TFDS dataset 'fedkd_tiny_images' \\(RuntimeError:"
       ' manual download needed\\); run `pip install tensorflow'),
  )
  def test_failed_preparation_is_one_line(self, failure, message):
    with (
        mock.patch.object(
            FedkdTinyImages, '_split_generators', side_effect=failure
        ),
        self.assertRaisesRegex(errors.FedkdError, message) as raised,
    ):
      data.load_dataset('fedkd_tiny_images', data_dir=self.dir)
    self.assertNotIn('\n', str(raised.exception))
    self.assertFalse(FedkdTinyImages(data_dir=self.dir).is_prepared())


if __name__ == '__main__':
  absltest.main()
