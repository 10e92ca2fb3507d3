"""Type names shared across fedkd."""

from typing import Any

import jax

PyTree = Any
Params = PyTree
OptState = PyTree
PRNGKey = jax.Array
Array = jax.Array
# Per-round scalars, already reduced over the cohort.
Metrics = dict[str, jax.Array]
