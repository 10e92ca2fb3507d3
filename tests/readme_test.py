"""The README's Python example runs as written."""

import contextlib
import io
import os
import re

from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ReadmeTest(absltest.TestCase):

  def test_custom_algorithm_example_trains(self):
    with open(os.path.join(ROOT, 'README.md')) as f:
      blocks = re.findall(r'```python\n(.*?)```', f.read(), re.DOTALL)
    self.assertLen(blocks, 1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      exec(compile(blocks[0], 'README.md', 'exec'), {})  # pylint: disable=exec-used
    accuracy = float(re.search(r'accuracy after 5 rounds: ([\d.]+)',
                               out.getvalue()).group(1))
    # Ten balanced classes: chance is 0.1; 5 rounds of FedAvg reach ~0.4.
    self.assertGreater(accuracy, 0.25)


if __name__ == '__main__':
  absltest.main()
