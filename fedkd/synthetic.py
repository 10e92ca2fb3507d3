"""Synthetic(alpha, beta): federated data generated per client, at any scale.

Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith, "Federated Optimization in
Heterogeneous Networks" (FedProx), MLSys 2020, arXiv:1812.06127, Section 5.1
(after Shamir et al. 2014). Client k draws u_k ~ N(0, alpha^2) and
B_k ~ N(0, beta^2) (alpha and beta are standard deviations, as in the paper's
code); its softmax-regression model W_k ~ N(u_k, 1) [60 x 10],
b_k ~ N(u_k, 1); its inputs x ~ N(v_k, diag(j^-1.2)) with v_k ~ N(B_k, 1);
labels y = argmax(W_k^T x + b_k). alpha controls how much the clients' models
differ, beta how much their inputs do.

Client sizes follow the paper's code, lognormal(4, 2) + 50, truncated at
`max_examples` so that the padded local schedule stays bounded at 10,000+
clients (the untruncated tail reaches ~10^5 examples). As in the paper's
code, each client keeps 90% of its examples for training; the other 10% of
every client form the test set.
"""

import numpy as np

from fedkd.data import Dataset

DIMENSION = 60
NUM_CLASSES = 10
_TRAIN_FRACTION = 0.9
# Every client has at least this many examples (lognormal + 50).
MIN_EXAMPLES = 50


def min_bytes(num_clients: int) -> int:
  """A lower bound on the bytes of `num_clients` clients' examples: each
  has at least MIN_EXAMPLES float32 inputs and int32 labels."""
  return num_clients * MIN_EXAMPLES * (DIMENSION + 1) * 4


def synthetic(num_clients: int, *, alpha: float, beta: float,
              max_examples: int, seed: int) -> tuple[Dataset, list]:
  """Generates Synthetic(alpha, beta) for `num_clients` clients.

  Returns:
    (dataset, parts): the pooled train/test arrays, and each client's train
    example indices (the natural partition: one client, one generator).
  """
  rng = np.random.default_rng(seed)
  sizes = np.minimum(
      rng.lognormal(4, 2, num_clients).astype(np.int64) + MIN_EXAMPLES,
      max_examples)
  model_means = rng.normal(0, alpha, num_clients)
  input_means = rng.normal(0, beta, num_clients)
  std = np.power(np.arange(1, DIMENSION + 1), -1.2 / 2)  # sqrt of diag cov
  xs_train, ys_train, xs_test, ys_test, parts = [], [], [], [], []
  start = 0
  for k in range(num_clients):
    w = rng.normal(model_means[k], 1, (DIMENSION, NUM_CLASSES))
    b = rng.normal(model_means[k], 1, NUM_CLASSES)
    v = rng.normal(input_means[k], 1, DIMENSION)
    x = (v + std * rng.standard_normal((sizes[k], DIMENSION))).astype(
        np.float32)
    y = np.argmax(x @ w + b, axis=1).astype(np.int32)
    n_train = int(_TRAIN_FRACTION * sizes[k])
    xs_train.append(x[:n_train])
    ys_train.append(y[:n_train])
    xs_test.append(x[n_train:])
    ys_test.append(y[n_train:])
    parts.append(np.arange(start, start + n_train))
    start += n_train
  dataset = Dataset(
      name=f'synthetic({alpha:g},{beta:g})',
      x_train=np.concatenate(xs_train), y_train=np.concatenate(ys_train),
      x_test=np.concatenate(xs_test), y_test=np.concatenate(ys_test),
      num_classes=NUM_CLASSES)
  return dataset, parts
