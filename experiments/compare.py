"""Runs several algorithms on the same partitions and seeds; compares them.

Driven by `experiments/main.py` when the config's `compare` field lists
algorithms (comma-separated): each runs as `runner.run` with only
`config.algorithm` (and the seed) changed, so the data split, partition,
cohorts and initial global model of a seed are the same for all. With
`num_seeds` = 1 an algorithm runs into WORKDIR/NAME/; with S > 1 it runs S
times, with seeds `seed`, ..., `seed + S - 1`, into WORKDIR/NAME/seed_K/.
Then WORKDIR gets

* `compare.md`: per algorithm, mean +- std over the seeds (sample std,
  ddof 1; the value alone for one seed) of the final and the best evaluated
  test accuracy, the final test loss, the first evaluated round reaching
  `config.target_accuracy` (over the seeds that reach it), the total bytes
  sent (upload plus download, all rounds) and the private teachers' (local_kd)
  or mentors' (fedkd) final accuracy. fd and fedmd have no global model:
  their accuracy is the mean of the clients' own models, labelled so. With
  several client architectures (`client_models`), a second table gives each
  architecture's final accuracy: its global model (feddf), its clients' own
  models (fd, fedmd) or its private teachers (local_kd) or mentors (fedkd);
* `compare.json`: the same figures, unrounded, and the per-seed values;
* `accuracy_vs_round.png` and `accuracy_vs_bytes.png`: the mean over seeds,
  a band of +- one std, a distinct line style per algorithm.
"""

import glob
import json
import os
import re

import numpy as np

from experiments import runner
from fedkd import stopping
from fedkd import train
from fedkd import workdir as workdir_lib
from fedkd.errors import FedkdError

# Algorithms without a global model: their headline accuracy is the mean
# test accuracy of the clients' own models.
_LOCAL_MODELS = ('fd', 'fedmd')
# Algorithms whose `teacher_accuracy` is a private model beside the global
# one, and what their papers call it.
_PRIVATE = {'local_kd': 'teacher', 'fedkd': 'mentor'}

# Per-architecture metrics (`client_models`): `accuracy_<model>` of global
# or clients' own models, `teacher_accuracy_<model>` of private teachers.
_BY_MODEL = re.compile(r'(?:teacher_)?accuracy_(.+)')

# What a comparison writes in its workdir besides the sub-runs.
TABLE, SUMMARY = 'compare.md', 'compare.json'

# Colour, dash and marker all change from one algorithm to the next, so lines
# that coincide (fedavg and fedprox with a small mu) stay distinguishable.
_STYLES = (('-', 'o'), ('--', 's'), (':', '^'), ('-.', 'v'), ('-', 'D'),
           ('--', 'x'), (':', '+'), ('-.', '*'))


def line_style(index: int) -> dict:
  """matplotlib keyword arguments for the `index`-th line of a plot."""
  slot = index % len(_STYLES)
  dash, marker = _STYLES[slot]
  # Earlier lines are wider, so a later one drawn on top leaves them visible.
  return dict(linestyle=dash, marker=marker, markevery=0.1, markersize=4,
              color=f'C{index % 10}',
              linewidth=2.4 - 1.6 * slot / (len(_STYLES) - 1))


def accuracy_label(name: str) -> str:
  """What an algorithm's headline accuracy measures."""
  return ('mean of local models' if name in _LOCAL_MODELS else
          'global model')


def sub_runs(config, workdir: str) -> list[tuple[str, int, object, str]]:
  """Every run of a comparison: (algorithm, seed, config, workdir)."""
  if config.num_seeds < 1:
    raise FedkdError(f'num_seeds must be >= 1, got {config.num_seeds}')
  runs = []
  for name in config.compare.split(','):
    for k in range(config.num_seeds):
      single = config.copy_and_resolve_references()
      single.algorithm, single.compare = name, ''
      single.seed = config.seed + k
      path = os.path.join(workdir, name)
      if config.num_seeds > 1:
        path = os.path.join(path, f'seed_{single.seed}')
      runs.append((name, single.seed, single, path))
  return runs


def check_single_run_workdir(workdir: str) -> None:
  """Refuses a single run into a comparison's workdir (finished or not),
  among whose files and sub-runs it would write its own."""
  if not workdir:  # the run refuses it
    return
  found = [name for name in (TABLE, SUMMARY)
           if os.path.lexists(os.path.join(workdir, name))]
  root = glob.escape(workdir)
  for pattern in ('*', os.path.join('*', 'seed_*')):
    found += sorted(
        os.path.relpath(os.path.dirname(path), workdir) for path in
        glob.glob(os.path.join(root, pattern, workdir_lib.CONFIG)))
  if found:
    more = f' and {len(found) - 3} more' if len(found) > 3 else ''
    raise FedkdError(
        f'workdir {workdir} holds a comparison ({", ".join(found[:3])}{more});'
        ' a single run would write among its files: use another workdir')


def _rounds_to_target(rows, target: float) -> int | None:
  for row in rows:
    if row['accuracy'] is not None and row['accuracy'] >= target:
      return row['round']
  return None


def seed_figures(name: str, rows: list[dict], target: float) -> dict:
  """One run's figures for the table (None where it has none)."""
  accuracies = [r['accuracy'] for r in rows]
  last = rows[-1]
  return {
      'final_accuracy': accuracies[-1],
      'best_accuracy': max(accuracies),
      'final_test_loss': last['student_loss'],
      'rounds_to_target': _rounds_to_target(rows, target),
      'total_bytes': last['cumulative_bytes'],
      'private_accuracy': (last['teacher_accuracy'] if name in _PRIVATE
                           else None),
      **{key: value for key, value in last.items()
         if _BY_MODEL.fullmatch(key)},
  }


def summarize(per_seed: list[dict]) -> dict:
  """Mean, std (ddof 1; 0 for one seed) and count of each figure's values."""
  out = {}
  for key in per_seed[0]:
    values = np.array([s[key] for s in per_seed if s[key] is not None],
                      dtype=np.float64)
    out[key] = {
        'mean': float(values.mean()) if values.size else None,
        'std': float(values.std(ddof=1)) if values.size > 1 else 0.0,
        'count': int(values.size)}
  return out


def _cell(stat: dict, fmt: str, num_seeds: int, scale: float = 1.0) -> str:
  if stat['mean'] is None:
    return '-'
  text = fmt.format(stat['mean'] * scale)
  if num_seeds > 1:
    text += ' ± ' + fmt.format(stat['std'] * scale)
  return text


def markdown_table(summaries: dict[str, dict], target: float,
                   num_seeds: int) -> str:
  """The comparison table: one row per algorithm, in the given order."""
  seeds = f' (mean ± std, {num_seeds} seeds)' if num_seeds > 1 else ''
  lines = [
      f'| algorithm | accuracy of | final accuracy{seeds} | best accuracy | '
      f'final test loss | rounds to {target:.2f} | total MB (up + down) | '
      'teacher/mentor accuracy |',
      '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |']
  for name, stats in summaries.items():
    reached = stats['rounds_to_target']
    rounds = _cell(reached, '{:.1f}' if num_seeds > 1 else '{:.0f}',
                   num_seeds)
    if not reached['count']:
      rounds = 'not reached'
    elif reached['count'] < num_seeds:
      rounds += f' ({reached["count"]}/{num_seeds} seeds)'
    private = _cell(stats['private_accuracy'], '{:.4f}', num_seeds)
    if name in _PRIVATE and private != '-':
      private += f' ({_PRIVATE[name]}s)'
    lines.append(
        f'| {name} | {accuracy_label(name)} | '
        f'{_cell(stats["final_accuracy"], "{:.4f}", num_seeds)} | '
        f'{_cell(stats["best_accuracy"], "{:.4f}", num_seeds)} | '
        f'{_cell(stats["final_test_loss"], "{:.4f}", num_seeds)} | '
        f'{rounds} | '
        f'{_cell(stats["total_bytes"], "{:.3f}", num_seeds, 1e-6)} | '
        f'{private} |')
  return '\n'.join(lines) + '\n' + _by_model_table(summaries, num_seeds)


def _by_model_table(summaries: dict[str, dict], num_seeds: int) -> str:
  """Each architecture's final accuracy per algorithm; '' for one."""
  keys = {key: match[1] for stats in summaries.values() for key in stats
          if (match := _BY_MODEL.fullmatch(key))}
  names = list(dict.fromkeys(keys.values()))
  if not names:
    return ''
  lines = ['', '| algorithm (accuracy of) | ' + ' | '.join(names) + ' |',
           '| --- |' + ' ---: |' * len(names)]
  for name, stats in summaries.items():
    of = (f'{_PRIVATE[name]}s' if name in _PRIVATE else
          'clients\' models' if name in _LOCAL_MODELS else 'global models')
    found = [stats.get(f'accuracy_{model}')
             or stats.get(f'teacher_accuracy_{model}') for model in names]
    cells = [_cell(stat, '{:.4f}', num_seeds) if stat else '-'
             for stat in found]
    lines.append(f'| {name} ({of}) | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def title(config) -> str:
  """A short plot title: the data, its split and the seeds."""
  if config.dataset == 'synthetic':
    text = (f'synthetic({config.synthetic_alpha:g},'
            f'{config.synthetic_beta:g})')
  elif config.partition == 'dirichlet':
    text = f'{config.dataset}, Dirichlet alpha {config.alpha:g}'
  elif config.partition == 'shards':
    text = f'{config.dataset}, {config.shards_per_client} shards/client'
  else:
    text = f'{config.dataset}, {config.partition}'
  seeds = config.num_seeds
  return text + (f', {seeds} seeds' if seeds > 1 else f', seed {config.seed}')


def _plot(runs: dict[str, list[list[dict]]], x_key: str, x_label: str,
          path: str, plot_title: str) -> None:
  # Imported here: a second of start-up that runs without plots skip.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  for i, (name, seeds) in enumerate(runs.items()):
    scale = 1e-6 if x_key == 'cumulative_bytes' else 1
    x = np.mean([[r[x_key] for r in rows] for rows in seeds], axis=0) * scale
    y = np.array([[r['accuracy'] for r in rows] for rows in seeds])
    label = name if name not in _LOCAL_MODELS else (
        f'{name} ({accuracy_label(name)})')
    ax.plot(x, y.mean(axis=0), label=label, **line_style(i))
    if len(seeds) > 1:
      ax.fill_between(x, y.mean(axis=0) - y.std(axis=0, ddof=1),
                      y.mean(axis=0) + y.std(axis=0, ddof=1),
                      color=f'C{i % 10}', alpha=0.15, linewidth=0)
  if x_key == 'cumulative_bytes':
    ax.set_xscale('log')
  ax.set(xlabel=x_label, ylabel='test accuracy', title=plot_title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def run(config, workdir: str) -> dict[str, dict]:
  """Runs every algorithm and seed; writes the table and plots.

  Returns:
    Per algorithm, `summarize`'s mean/std/count of each figure.

  Raises:
    Interrupted: SIGINT/SIGTERM during a run (`runner.run`), or while the
      results were written (they are complete).
  """
  held = [name for name in (workdir_lib.CONFIG, workdir_lib.METRICS,
                             workdir_lib.CHECKPOINTS)
          if os.path.lexists(os.path.join(workdir, name))]
  if held:
    raise FedkdError(
        f'workdir {workdir} holds a single run ({", ".join(held)}); a '
        'comparison writes a directory per algorithm beside compare.md: use '
        'another workdir')
  planned = sub_runs(config, workdir)
  # A bad sub-run (its data, models or workdir) is refused before any runs.
  for _, _, single, path in planned:
    runner.check(single, path)
  runs: dict[str, list[list[dict]]] = {}
  for name, seed, single, path in planned:
    print(f'== {name}, seed {seed}')
    runs.setdefault(name, []).append(
        runner.run(single, path, progress=False))
  # Writing the results takes a second (plots): a signal meanwhile lets them
  # finish, then stops as one after a run's last round does.
  with stopping.handling_signals() as stop:
    stop.defer()
    summaries = _write_results(config, workdir, runs)
  if stop.signum:
    raise train.Interrupted(stop.signum, config.num_rounds,
                            config.num_rounds)
  return summaries


def _write_results(config, workdir: str,
                   runs: dict[str, list[list[dict]]]) -> dict[str, dict]:
  """Writes and prints the table, writes the summary and the plots.

  Returns:
    Per algorithm, `summarize`'s mean/std/count of each figure.
  """
  per_seed = {name: [seed_figures(name, rows, config.target_accuracy)
                     for rows in seeds] for name, seeds in runs.items()}
  summaries = {name: summarize(figures) for name, figures in per_seed.items()}
  table = markdown_table(summaries, config.target_accuracy, config.num_seeds)
  with open(os.path.join(workdir, TABLE), 'w') as f:
    f.write(table)
  with open(os.path.join(workdir, SUMMARY), 'w') as f:
    json.dump({name: {'accuracy_of': accuracy_label(name),
                      'summary': summaries[name], 'per_seed': per_seed[name]}
               for name in runs}, f, indent=1)
  plot_title = title(config)
  _plot(runs, 'round', 'round',
        os.path.join(workdir, 'accuracy_vs_round.png'), plot_title)
  _plot(runs, 'cumulative_bytes', 'cumulative MB sent (up + down)',
        os.path.join(workdir, 'accuracy_vs_bytes.png'), plot_title)
  print(table)
  return summaries
