"""Where a round's time goes: the slowest XLA ops of a benchmark workload.

    python -m experiments.profile_round --workload=cnn_fedavg
        [--clients=N] [--clients_per_chunk=N] [--rounds=N] [--top=20]
        [--epochs=E] [--population=N] [--shard_data=false]

Takes `experiments.benchmark`'s flags that shape arm (a)'s round (those of
the other arms, `--loop`, `--torch`, `--torch_threads`, do not apply). For
each workload and cohort size it
compiles the round as the benchmark times it (arm (a)), runs it once, then
`--rounds` rounds (default 2) under `jax.profiler.trace`, reads the trace back
(`jax.profiler.ProfileData`) and prints the ops that took longest on XLA's
CPU threads: milliseconds per round (summed over threads), executions per
round, the JAX operation each came from (the HLO op's metadata, e.g.
`transpose(jvp(MnistCNN))/Conv_1/cond/branch_0_fun/conv_general_dilated` for
the second conv's gradients) and the line of fedkd's code that emitted it
(the innermost frame in fedkd/ or experiments/ of the op's stack trace, e.g.
`conv_cpu.py:79 conv`). A fusion that holds a matmul or convolution is named
after it, since that is where its time goes (XLA names a fusion after its
root: a dot fused with the division of a max-pool's gradient reads as the
pool's `reduce_sum`). Times are summed over threads, so with a device per
core the total can reach the cores times the wall time; a plain `dot` (not
a `ynn_fusion`) is handed to Eigen's pool and shows little more than its
dispatch. Loops and calls (`while`, `conditional`, `call`) are left out: the
ops of their bodies are listed themselves. Collectives are listed too, and
a collective lasts until every device reaches it: its time includes the
wait. A second table splits each device's milliseconds per round into ops
and collectives, so a device that finished its clients early shows its wait
there (on a CPU split into a device per core, a slower core shows as the
other device's wait). CPU only: on an accelerator, open the trace in
TensorBoard's profile plugin instead.

This is how fedkd's CPU kernels (`fedkd/layers.py`) were chosen.
"""

import collections
from collections.abc import Collection
import glob
import os
import re
import sys
import tempfile
from typing import NamedTuple

from absl import flags
import jax

# pylint: disable=g-import-not-at-top,wrong-import-position
# The repository root, however the script is started.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import benchmark  # defines the flags used here too
from experiments import cli
from fedkd.errors import FedkdError
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
_TOP = flags.DEFINE_integer('top', 20, 'Ops to print per round.',
                            lower_bound=1)

# Control flow, whose events span the ops of their bodies: not ops themselves.
CONTROL_FLOW = ('while', 'conditional', 'call')
# Collectives, whose events last until every device has reached them.
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
               'ragged-all-to-all', 'collective-permute',
               'collective-broadcast')


class Trace(NamedTuple):
  """What XLA's CPU threads ran, from a `jax.profiler` trace."""
  nanoseconds: collections.Counter  # per HLO op
  executions: collections.Counter  # per HLO op
  busy: collections.Counter  # nanoseconds per device, collectives left out
  collectives: collections.Counter  # nanoseconds per device in collectives


def ops_by_opcode(hlo_text: str, opcodes: Collection[str]) -> set[str]:
  """The names of the HLO module's ops with one of `opcodes` (async forms
  included). XLA names ops after the JAX operation they came from (a psum's
  all-reduce is `psum_invariant.7`), so only the opcode tells."""
  either = '|'.join(re.escape(opcode) for opcode in opcodes)
  # The result type, however nested its tuples, holds no '=' once the
  # comments that number long tuples' elements (/*index=5*/) are gone.
  return set(re.findall(
      rf'%([\w.-]+) = [^=]*? (?:{either})(?:-start|-done)?\(',
      re.sub(r'/\*index=\d+\*/', '', hlo_text)))


def read_trace(trace_dir: str, hlo_text: str) -> Trace:
  """The HLO ops of `hlo_text` (the compiled module) on XLA's CPU threads of
  the trace: its events that name an op, control flow left out."""
  control_flow = ops_by_opcode(hlo_text, CONTROL_FLOW)
  collectives = ops_by_opcode(hlo_text, COLLECTIVES)
  trace = Trace(*(collections.Counter() for _ in Trace._fields))
  for path in glob.glob(f'{trace_dir}/**/*.xplane.pb', recursive=True):
    for plane in jax.profiler.ProfileData.from_file(path).planes:
      for line in plane.lines:
        if not line.name.startswith('tf_XLA'):
          continue
        for event in line.events:
          stats = dict(event.stats)
          if 'hlo_op' not in stats or event.name in control_flow:
            continue
          trace.nanoseconds[event.name] += event.duration_ns
          trace.executions[event.name] += 1
          by_kind = (trace.collectives if event.name in collectives
                     else trace.busy)
          by_kind[stats.get('device_ordinal', '?')] += event.duration_ns
  return trace


def op_sources(hlo_text: str) -> dict[str, str]:
  """HLO op name -> the JAX operation it came from (`op_name` metadata)."""
  return {name: source.split(')/', 1)[-1] for name, source in re.findall(
      r'%([\w.-]+) = .*?metadata=\{op_name="([^"]*)"', hlo_text)}


def principal_ops(hlo_text: str) -> dict[str, str]:
  """Fusion name -> the dot or convolution inside it, where it holds one."""
  inner = {name: re.search(r'%([\w.-]+) = \S+ (?:dot|convolution)\(', body)
           for name, body in re.findall(
               r'^%?([\w.-]+) \(.*?\{\n(.*?)\n\}', hlo_text, re.S | re.M)}
  return {fusion: inner[called][1]
          for fusion, called in re.findall(
              r'%([\w.-]+) = .*? fusion\(.*?calls=%([\w.-]+)', hlo_text)
          if inner.get(called)}


def _table(hlo_text: str, heading: str) -> str:
  """The lines of one of the tables that head the HLO module's text."""
  match = re.search(rf'^{heading}\n(.*?)\n(?=[A-Z%])', hlo_text, re.S | re.M)
  return match[1] if match else ''


def op_lines(hlo_text: str) -> dict[str, str]:
  """HLO op name -> `file.py:line function` of the innermost fedkd or
  experiments frame of the Python stack that emitted it."""
  files = dict(re.findall(r'^(\d+) "(.*)"$', _table(hlo_text, 'FileNames'),
                          re.M))
  functions = dict(re.findall(r'^(\d+) "(.*)"$',
                              _table(hlo_text, 'FunctionNames'), re.M))
  locations = {
      i: (files[f], functions[fn], line) for i, f, fn, line in re.findall(
          r'^(\d+) \{file_name_id=(\d+) function_name_id=(\d+) line=(\d+)',
          _table(hlo_text, 'FileLocations'), re.M)}
  frames = {i: (location, parent) for i, location, parent in re.findall(
      r'^(\d+) \{file_location_id=(\d+)(?: parent_frame_id=(\d+))?',
      _table(hlo_text, 'StackFrames'), re.M)}

  def innermost_ours(frame):
    for _ in range(len(frames)):  # parent links end at the outermost frame
      if frame not in frames:
        return ''
      location, parent = frames[frame]
      path, function, line = locations[location]
      if re.search(r'/(fedkd|experiments)/', path):
        return f'{path.rsplit("/", 1)[-1]}:{line} {function}'
      frame = parent
    return ''

  return {op: innermost_ours(frame) for op, frame in re.findall(
      r'%([\w.-]+) = .*?stack_frame_id=(\d+)', hlo_text)}


def profile(name: str, workload: benchmark.Workload, num_clients: int,
            rounds: int) -> None:
  """Prints the `--top` ops of `rounds` rounds of `workload`, named `name`."""
  alg, state, data = benchmark.build(workload,
                                     max(FLAGS.population, num_clients))
  run, compiled, _, chunk = benchmark.compiled_round(
      alg, state, data, FLAGS.shard_data, FLAGS.clients_per_chunk, num_clients,
      step_bytes=benchmark.client_step_bytes(workload))
  run()  # the first execution's one-off costs stay out of the trace
  hlo_text = compiled.as_text()
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(rounds):
        run()
    trace = read_trace(trace_dir, hlo_text)
  nanoseconds, executions = trace.nanoseconds, trace.executions
  if not nanoseconds:
    raise FedkdError('the trace holds no XLA CPU ops; this jaxlib names its '
                     'threads differently')
  sources, lines = op_sources(hlo_text), op_lines(hlo_text)
  named = principal_ops(hlo_text)
  ms = lambda ns: ns / rounds / 1e6
  print(f'\n{name}, {num_clients} clients, {chunk or "all"} per chunk: '
        f'{ms(sum(nanoseconds.values())):.1f} ms of ops per round on XLA '
        'threads\n\n| ms/round | runs/round | HLO op | from | code |\n'
        '| ---: | ---: | --- | --- | --- |')
  for op, ns in nanoseconds.most_common(_TOP.value):
    by = named.get(op, op)
    print(f'| {ms(ns):.2f} | {executions[op] // rounds} | {op} | '
          f'{sources.get(by, "")} | {lines.get(by, "")} |')
  print('\n| device | ms/round in ops | ms/round in collectives |\n'
        '| ---: | ---: | ---: |')
  for device in sorted(trace.busy.keys() | trace.collectives.keys(),
                       key=str):
    print(f'| {device} | {ms(trace.busy[device]):.2f} | '
          f'{ms(trace.collectives[device]):.2f} |')


def main(argv):
  del argv
  if jax.default_backend() != 'cpu':
    raise FedkdError('profile_round reads CPU traces only; on '
                     f'{jax.default_backend()}, open a jax.profiler trace in '
                     "TensorBoard's profile plugin")
  for name, workload, sizes in benchmark.planned_runs(FLAGS.workload):
    for num_clients in sizes:
      profile(name, workload, num_clients, FLAGS.rounds or 2)


if __name__ == '__main__':
  cli.run(main)
