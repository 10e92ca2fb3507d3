"""Test setup: 8 fake CPU devices, so sharding tests run on any machine.

Also one persistent compilation cache for the session, shared with the
subprocesses tests start: many tests compile the very same round (each
builds its own algorithm, so jit's in-memory cache cannot serve them).
The XLA flags are `toys.XLA_TEST_FLAGS`. The slowest test files are
collected first, so the two workers finish together.
"""

import atexit
import os
import shutil
import tempfile

import toys  # Imports JAX without starting a backend.

# Must happen before JAX initialises its backends.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' +
                           toys.subprocess_env(devices=8)['XLA_FLAGS'])
_CACHE = tempfile.mkdtemp(prefix='fedkd_tests_jax_cache_')
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE,
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1')

from absl import flags  # pylint: disable=g-import-not-at-top

# absltest helpers (create_tempdir, ...) read flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()

# xdist hands out test classes in collection order: a long class collected
# late runs alone at the end while the other worker idles. The slowest files
# (seconds of their classes, measured) go first.
_SLOWEST_FIRST = ('algorithm_test.py', 'configs_test.py', 'groups_test.py',
                  'resume_test.py', 'golden_test.py', 'multihost_test.py',
                  'main_test.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
