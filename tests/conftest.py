"""Test setup: 8 fake CPU devices, so sharding tests run on any machine."""

import os

# Must happen before JAX initialises its backends.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')

from absl import flags  # pylint: disable=g-import-not-at-top

# absltest helpers (create_tempdir, ...) read flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()
