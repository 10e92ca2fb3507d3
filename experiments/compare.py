"""Runs several algorithms on the same partition and seed, and compares them.

Driven by `experiments/main.py` when the config's `compare` field lists
algorithms (comma-separated): each runs as `train.run` with only
`config.algorithm` changed, into WORKDIR/NAME/, so the data split, partition,
cohorts and initial global model are the same for all. Then WORKDIR gets

* `compare.md`: per algorithm, the final accuracy (the global model's, or
  the mean of the clients' own models for fd and fedmd), the first evaluated
  round reaching `config.target_accuracy`, and the total bytes sent (upload
  plus download, all rounds);
* `accuracy_vs_round.png` and `accuracy_vs_bytes.png`.
"""

import os

import matplotlib
matplotlib.use('Agg')  # Files only; no display.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from fedkd import train


def _rounds_to_target(rows, target: float) -> str:
  for row in rows:
    if row['accuracy'] is not None and row['accuracy'] >= target:
      return str(row['round'])
  return 'not reached'


def markdown_table(results: dict[str, list[dict]], target: float) -> str:
  """The comparison table: one row per algorithm, in the given order."""
  lines = [f'| algorithm | final accuracy | rounds to {target:.2f} | '
           'total MB (up + down) |', '| --- | ---: | ---: | ---: |']
  for name, rows in results.items():
    last = rows[-1]
    lines.append(f'| {name} | {last["accuracy"]:.4f} | '
                 f'{_rounds_to_target(rows, target)} | '
                 f'{last["cumulative_bytes"] / 1e6:.3f} |')
  return '\n'.join(lines) + '\n'


def _plot(results, x_key: str, x_label: str, path: str, title: str) -> None:
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, rows in results.items():
    scale = 1e6 if x_key == 'cumulative_bytes' else 1
    ax.plot([r[x_key] / scale for r in rows], [r['accuracy'] for r in rows],
            label=name, marker='.')
  if x_key == 'cumulative_bytes':
    ax.set_xscale('log')
  ax.set(xlabel=x_label, ylabel='test accuracy', title=title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(config, workdir: str) -> dict[str, list[dict]]:
  """Runs every algorithm of `config.compare`; writes the table and plots."""
  names = config.compare.split(',')
  results = {}
  for name in names:
    single = config.copy_and_resolve_references()
    single.algorithm, single.compare = name, ''
    print(f'== {name}')
    results[name] = train.run(single, os.path.join(workdir, name),
                              progress=False)
  table = markdown_table(results, config.target_accuracy)
  with open(os.path.join(workdir, 'compare.md'), 'w') as f:
    f.write(table)
  subtitle = (f'{config.dataset}, {config.num_clients} clients, '
              f'{config.partition} alpha {config.alpha}, seed {config.seed}')
  _plot(results, 'round', 'round',
        os.path.join(workdir, 'accuracy_vs_round.png'), subtitle)
  _plot(results, 'cumulative_bytes', 'cumulative MB sent (up + down)',
        os.path.join(workdir, 'accuracy_vs_bytes.png'), subtitle)
  print(table)
  return results
