"""FedProx's Figure 1 setting, all panels: see configs/fedprox_synthetic_fig1.

    python experiments/fedprox_fig1.py --workdir=/tmp/fedprox_fig1 \
        --out=docs/fedprox_fig1

Runs the three arms of every (Synthetic(a, a), stragglers) panel into
WORKDIR/A_PERCENT/ARM/ (an arm whose metrics.jsonl already reaches the last
round is not rerun), then writes OUT/fedprox_fig1_loss.png and
OUT/fedprox_fig1_accuracy.png (test loss and accuracy against rounds, a grid
of panels) and OUT/fedprox_fig1.md (each arm's final and extreme figures).
"""

import json
import os
import re
import sys

from absl import flags
from matplotlib.figure import Figure

# pylint: disable=g-import-not-at-top,wrong-import-position
# The repository root, however the script is started.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import cli
from experiments import compare
from experiments import runner
from experiments import validation
from experiments.configs import fedprox_synthetic_fig1 as fig1
from fedkd.errors import FedkdError
# pylint: enable=g-import-not-at-top,wrong-import-position

_WORKDIR = flags.DEFINE_string('workdir', '/tmp/fedprox_fig1',
                               'Directory for every arm of every panel.')
_OUT = flags.DEFINE_string('out', 'docs/fedprox_fig1',
                           'Directory for the figure and its table.')
_ALPHAS = flags.DEFINE_list('alphas', [f'{a:g}' for a in fig1.ALPHAS],
                            'Synthetic(a, a) panels.')
_PERCENTS = flags.DEFINE_list(
    'percents', [str(p) for p in fig1.STRAGGLER_PERCENTS],
    'Straggler percentages.')
_ROUNDS = flags.DEFINE_integer('num_rounds', 0,
                               'Rounds per run; 0 = the config\'s.',
                               lower_bound=0)


def _read_rows(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _arms(alpha: str, percent: str) -> dict:
  """The three arms of one panel, each checked: label -> run config."""
  where = f'--alphas={alpha} with --percents={percent}'
  try:
    config = fig1.get_config(f'{alpha},{percent}')
  except ValueError:
    raise FedkdError(f'{where}: both take numbers, e.g. --alphas=0,0.5 '
                     '--percents=0,50') from None
  if _ROUNDS.value:
    config.num_rounds = _ROUNDS.value
  arms = fig1.arms(config)
  try:
    for arm in arms.values():
      validation.validate_config(arm)
  except FedkdError as e:
    raise FedkdError(f'{where}: {e}') from None
  return arms


def _panel(alpha: str, percent: str, arms: dict) -> dict[str, list[dict]]:
  """Runs (or reads) the three `arms` of one panel: label -> metrics rows."""
  results = {}
  for label, arm in arms.items():
    workdir = os.path.join(_WORKDIR.value, f'{alpha}_{percent}',
                           re.sub(r'\W+', '_', label).strip('_'))
    rows = _read_rows(workdir)
    if not rows or rows[-1]['round'] < arm.num_rounds:
      print(f'== Synthetic({alpha},{alpha}), {percent}% stragglers: {label}',
            flush=True)
      rows = runner.run(arm, workdir, progress=False)
    results[label] = rows
  return results


def _figure(panels: dict, key: str, ylabel: str, path: str) -> None:
  """A grid: stragglers down, Synthetic(a, a) across; one line per arm."""
  alphas = sorted({a for a, _ in panels}, key=float)
  percents = sorted({p for _, p in panels}, key=float)
  fig = Figure(figsize=(3.3 * len(alphas), 2.6 * len(percents)))
  axes = fig.subplots(len(percents), len(alphas), squeeze=False)
  for (alpha, percent), results in panels.items():
    ax = axes[percents.index(percent), alphas.index(alpha)]
    for i, (name, rows) in enumerate(results.items()):
      ax.plot([r['round'] for r in rows], [r[key] for r in rows],
              label=name, **compare.line_style(i))
    ax.set_title(f'Synthetic({alpha},{alpha}), {percent}% stragglers',
                 fontsize=8)
    ax.set(xlabel='round', ylabel=ylabel)
    ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def _table(panels: dict) -> str:
  lines = ['| data | stragglers | arm | final test loss | max test loss | '
           'final accuracy | best accuracy |',
           '| --- | ---: | --- | ---: | ---: | ---: | ---: |']
  for (alpha, percent), results in panels.items():
    for name, rows in results.items():
      losses = [r['student_loss'] for r in rows]
      accs = [r['accuracy'] for r in rows]
      lines.append(f'| Synthetic({alpha},{alpha}) | {percent}% | {name} | '
                   f'{losses[-1]:.3f} | {max(losses):.3f} | {accs[-1]:.4f} | '
                   f'{max(accs):.4f} |')
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  for flag, values in (('alphas', _ALPHAS.value),
                       ('percents', _PERCENTS.value)):
    if not values:
      raise FedkdError(f'--{flag} is empty; give at least one panel')
  # Every panel and --workdir checked, --out made, before the runs, which
  # take long.
  arms = {(a, p): _arms(a, p) for p in _PERCENTS.value for a in _ALPHAS.value}
  validation.validate_workdir(_WORKDIR.value, create=False)
  cli.output_dir(_OUT.value, 'out')
  panels = {panel: _panel(*panel, panel_arms)
            for panel, panel_arms in arms.items()}
  for key, ylabel, name in (('student_loss', 'test loss', 'loss'),
                            ('accuracy', 'test accuracy', 'accuracy')):
    _figure(panels, key, ylabel,
            os.path.join(_OUT.value, f'fedprox_fig1_{name}.png'))
  table = _table(panels)
  with open(os.path.join(_OUT.value, 'fedprox_fig1.md'), 'w') as f:
    f.write(table)
  print(table)


if __name__ == '__main__':
  cli.run(main)
