"""Tests for fedkd.partition."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from fedkd import errors
from fedkd import partition as partition_lib

_NUM_CLASSES = 10
_PER_CLASS = 100


def _labels(seed: int = 0) -> np.ndarray:
  """Returns 10 classes x 100 examples in shuffled order."""
  labels = np.repeat(np.arange(_NUM_CLASSES), _PER_CLASS)
  return np.random.default_rng(seed).permutation(labels)


def _mean_classes_per_client(labels, parts) -> float:
  return float(np.mean([len(np.unique(labels[p])) for p in parts]))


class PartitionTest(parameterized.TestCase):

  @parameterized.parameters('iid', 'dirichlet', 'shards')
  def test_parts_cover_every_index_once(self, method):
    labels = _labels()
    parts = partition_lib.partition(labels, 10, method, seed=3)
    self.assertLen(parts, 10)
    for part in parts:
      self.assertEqual(part.dtype, np.int64)
      np.testing.assert_array_equal(part, np.sort(part))
    np.testing.assert_array_equal(
        np.sort(np.concatenate(parts)), np.arange(len(labels))
    )

  @parameterized.parameters('iid', 'dirichlet', 'shards')
  def test_seed_decides_the_split(self, method):
    labels = _labels()
    first = partition_lib.partition(labels, 10, method, seed=1)
    again = partition_lib.partition(labels, 10, method, seed=1)
    other = partition_lib.partition(labels, 10, method, seed=2)
    for a, b in zip(first, again, strict=True):
      np.testing.assert_array_equal(a, b)
    self.assertFalse(
        all(
            len(a) == len(b) and np.array_equal(a, b)
            for a, b in zip(first, other, strict=True)
        )
    )

  def test_iid_sizes_differ_by_at_most_one(self):
    labels = np.zeros(1003, np.int64)
    sizes = [len(p) for p in partition_lib.partition(labels, 10, 'iid')]
    self.assertLessEqual(max(sizes) - min(sizes), 1)
    self.assertEqual(sum(sizes), 1003)

  def test_iid_mixes_labels(self):
    # A random split of 1000 examples gives every client of 100 all 10
    # classes (a client missing one has probability < 1e-3).
    labels = _labels()
    parts = partition_lib.partition(labels, 10, 'iid', seed=0)
    self.assertEqual(_mean_classes_per_client(labels, parts), 10)

  def test_dirichlet_smaller_alpha_is_more_skewed(self):
    labels = _labels()
    skewed = partition_lib.partition(labels, 10, 'dirichlet', alpha=0.05)
    even = partition_lib.partition(labels, 10, 'dirichlet', alpha=100.0)
    self.assertLess(_mean_classes_per_client(labels, skewed), 5)
    self.assertGreater(_mean_classes_per_client(labels, even), 9.5)

  def test_dirichlet_respects_min_examples(self):
    labels = _labels()
    parts = partition_lib.partition(
        labels, 20, 'dirichlet', alpha=0.1, min_examples=10, seed=4
    )
    self.assertGreaterEqual(min(len(p) for p in parts), 10)

  def test_dirichlet_accepts_exactly_min_examples(self):
    # 4 examples for 4 clients: min_examples=1 leaves one each, no fewer.
    parts = partition_lib.partition(
        np.zeros(4, np.int64), 4, 'dirichlet', alpha=1e6, min_examples=1
    )
    self.assertEqual(sorted(int(i) for p in parts for i in p), [0, 1, 2, 3])
    self.assertEqual([len(p) for p in parts], [1, 1, 1, 1])

  def test_shards_of_one_example_each(self):
    # As many shards as examples: 2 clients x 2 shards of 4 examples.
    parts = partition_lib.partition(
        np.array([1, 0, 1, 0]), 2, 'shards', shards_per_client=2
    )
    self.assertEqual([len(p) for p in parts], [2, 2])
    self.assertEqual(sorted(np.concatenate(parts).tolist()), [0, 1, 2, 3])

  def test_shards_give_whole_single_label_shards(self):
    # 20 shards of 50 examples; each class of 100 fills exactly two shards,
    # so every shard holds one label and a client at most two.
    labels = _labels()
    parts = partition_lib.partition(
        labels, 10, 'shards', shards_per_client=2, seed=5
    )
    for part in parts:
      self.assertLen(part, 100)
      self.assertLessEqual(len(np.unique(labels[part])), 2)
      counts = np.unique(labels[part], return_counts=True)[1]
      self.assertTrue(np.all(counts % 50 == 0), counts)

  @parameterized.named_parameters(
      ('unknown_method', dict(method='random'), 'unknown partition method'),
      ('zero_alpha', dict(method='dirichlet', alpha=0.0), 'alpha'),
      ('negative_alpha', dict(method='dirichlet', alpha=-1.0), 'alpha'),
      ('no_clients', dict(num_clients=0), 'num_clients'),
      ('too_many_clients', dict(num_clients=1001), 'more clients than'),
      ('no_shards', dict(method='shards', shards_per_client=0), 'shards_per'),
      (
          'too_many_shards',
          dict(method='shards', num_clients=500, shards_per_client=3),
          '1500 shards',
      ),
      (
          'min_examples_unreachable',
          dict(method='dirichlet', num_clients=10, min_examples=101),
          'larger alpha or fewer clients',
      ),
  )
  def test_bad_arguments_raise(self, overrides, message):
    kwargs = dict(num_clients=10, method='iid') | overrides
    with self.assertRaisesRegex(errors.FedkdError, message):
      partition_lib.partition(_labels(), **kwargs)


class SummaryTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.labels = np.array([0, 0, 1, 2, 2, 2])
    self.parts = [np.array([0, 1]), np.array([2, 3, 4]), np.array([5])]

  def test_label_histograms(self):
    np.testing.assert_array_equal(
        partition_lib.label_histograms(self.labels, self.parts, 4),
        [[2, 0, 0, 0], [0, 1, 2, 0], [0, 0, 1, 0]],
    )

  def test_describe(self):
    text = partition_lib.describe(self.labels, self.parts, 4)
    self.assertIn('3 clients', text)
    self.assertIn('1/2/2.0/3', text)  # Sizes 2, 3, 1.
    self.assertIn('mean 1.33 of 4', text)  # 1, 2 and 1 classes.
    self.assertIn('client 1: 0 1 2 0', text)


if __name__ == '__main__':
  absltest.main()
