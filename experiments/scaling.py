"""Scaling table: clients per round x devices, one process per cell.

    python -m experiments.scaling [--clients=10,100,1000,10000] \\
        [--devices=1,2,8] [--shard_data=true,false] [--population=N] \\
        [--out=docs/scaling]

Each cell runs `experiments/benchmark.py` (its `mlp` workload, arms (a) and
(b), no torch) in a fresh process, on CPU with
`--xla_force_host_platform_device_count=D` (on a GPU/TPU host pass the real
device counts, e.g. `--devices=1,8`, and `--cpu=false`), with the client
examples split over the devices, copied to each, or both (`--shard_data`;
split and copied are the same on one device, so it runs once), every client
training every round, or a random cohort of `--clients` of `--population`
clients (the benchmark's flag), in chunks as a run chunks them
(`clients_per_chunk` unset; each cell's JSON has its chunk). Writes
OUT.json, OUT.md (seconds per round, compile seconds, clients/s, GFLOP/s
against the measured matmul peak, the examples' MiB per device, peak host
memory, the per-client-loop ratio) and OUT.png (seconds per round against
clients).
"""

import json
import os
import subprocess
import sys

from absl import flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=g-import-not-at-top,wrong-import-position
# The repository root, however the script is started.
sys.path.insert(0, _ROOT)
from experiments import cli
from fedkd.errors import FedkdError
# pylint: enable=g-import-not-at-top,wrong-import-position

_CLIENTS = flags.DEFINE_list('clients', ['10', '100', '1000', '10000'],
                             'Clients per round.')
_DEVICES = flags.DEFINE_list('devices', ['1', '2', '8'], 'Device counts.')
_SHARD_DATA = flags.DEFINE_list(
    'shard_data', ['true'], 'Client examples split over the devices (true), '
    'copied to each (false), or both (true,false).')
_POPULATION = flags.DEFINE_integer(
    'population', 0, 'Clients in the federation, of which each round trains '
    '--clients (0: every client every round).', lower_bound=0)
_CPU = flags.DEFINE_bool('cpu', True, 'Split the CPU into fake devices.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Timed rounds per cell.',
                               lower_bound=1)
_OUT = flags.DEFINE_string('out', 'docs/scaling', 'Output path prefix.')


def _cell(clients: int, devices: int, shard_data: bool) -> dict:
  env = dict(os.environ)
  if _CPU.value:
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  else:
    env['CUDA_VISIBLE_DEVICES'] = ','.join(map(str, range(devices)))
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.benchmark', '--workload=mlp',
       f'--clients={clients}', '--torch=false', '--json_only',
       f'--shard_data={shard_data}', f'--population={_POPULATION.value}',
       f'--rounds={_ROUNDS.value}'],
      cwd=_ROOT, env=env, capture_output=True, text=True)
  if proc.returncode:
    why = (proc.stderr.strip().splitlines() or
           [f'exit code {proc.returncode}'])[-1].removeprefix('error: ')
    raise FedkdError(f'the benchmark of {clients} clients on {devices} '
                     f'device(s) failed: {why}')
  cell = json.loads(proc.stdout.strip().splitlines()[-1])[0]
  if cell['devices'] != devices:
    raise FedkdError(f'--devices={devices}: the benchmark saw '
                     f'{cell["devices"]} device(s); lower --devices')
  return cell


def _placement(cell) -> str:
  """How a cell held the client examples; one device has one way."""
  if cell['devices'] == 1:
    return '-'
  return 'split' if cell['shard_data'] else 'copied'


def _markdown(cells) -> str:
  lines = ['| clients | devices | examples | s/round | compile s | clients/s '
           '| GFLOP/s | % of matmul peak | examples MiB/device '
           '| peak host MiB | loop/vmapped |',
           '|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  for c in cells:
    # Cells from before --population trained every client.
    sampled = c.get('population', 0) > c['clients']
    clients = f'{c["clients"]} of {c["population"]}' if sampled else (
        c['clients'])
    lines.append(
        f'| {clients} | {c["devices"]} | {_placement(c)} | '
        f'{c["vmapped_s"]:.4f} | {c["compile_s"]:.2f} | '
        f'{c["clients_per_s"]:.0f} | {c["vmapped_gflop_s"]:.1f} | '
        f'{100 * c["vmapped_gflop_s"] / c["matmul_peak_gflop_s"]:.0f}% | '
        f'{c["examples_mib_per_device"]:.1f} | '
        f'{c["peak_host_mib"]:.0f} | {c["loop_over_vmapped"]:.1f}x |')
  return '\n'.join(lines) + '\n'


def _plot(cells, path):
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  for d, split in sorted({(c['devices'], c['shard_data']) for c in cells}):
    row = sorted((c for c in cells
                  if (c['devices'], c['shard_data']) == (d, split)),
                 key=lambda c: c['clients'])
    ax.plot([c['clients'] for c in row], [c['vmapped_s'] for c in row],
            'o-', label=f'fedkd, {d} device(s)' + (
                '' if d == 1 else f', examples {_placement(row[0])}'))
  loop = sorted((c for c in cells if c['devices'] == cells[0]['devices']),
                key=lambda c: c['clients'])
  ax.plot([c['clients'] for c in loop], [c['loop_s'] for c in loop], 's--',
          label='per-client loop (b)')
  ax.set(xscale='log', yscale='log', xlabel='clients per round',
         ylabel='seconds per round', title='local-KD round, seed models')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  cells = []
  clients_list = cli.positive_ints('clients', _CLIENTS.value)
  devices_list = cli.positive_ints('devices', _DEVICES.value)
  if not (_SHARD_DATA.value and set(m.lower() for m in _SHARD_DATA.value)
          <= {'true', 'false'}):
    raise FedkdError('--shard_data takes true, false or true,false, got '
                     f'{",".join(_SHARD_DATA.value)!r}')
  modes = [m.lower() == 'true' for m in _SHARD_DATA.value]
  directory, prefix = os.path.split(_OUT.value)
  if not prefix:
    raise FedkdError(f'--out={_OUT.value!r} names no file prefix; give one, '
                     'e.g. --out=docs/scaling for docs/scaling.{json,md,png}')
  # Before the cells, which take long: a path that cannot be written fails
  # now, not after them.
  cli.output_dir(directory or '.', 'out')
  for devices in devices_list:
    for split in modes[:1] if devices == 1 else modes:
      for clients in clients_list:
        cells.append(_cell(clients, devices, split))
        print(json.dumps(cells[-1]), flush=True)
  with open(_OUT.value + '.json', 'w') as f:
    json.dump(cells, f, indent=1)
  with open(_OUT.value + '.md', 'w') as f:
    f.write(_markdown(cells))
  _plot(cells, _OUT.value + '.png')
  print(_markdown(cells))


if __name__ == '__main__':
  cli.run(main)
