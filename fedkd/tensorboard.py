"""TensorBoard event files of a run: each metrics row's scalars, the config.

    tensorboard --logdir WORKDIR/tensorboard

Written with tensorboardX, which needs no TensorFlow. Every (re)start of a run
opens a new event file; TensorBoard reads all files of the directory as one
run. A resumed run writes only the scalars that no earlier file holds, so no
(tag, round) appears twice, even for rounds an interrupted run had written
past its last checkpoint.
"""

import glob
import json
import logging
import os
import struct
import time

from google.protobuf import message
from tensorboardX import SummaryWriter
from tensorboardX.proto import event_pb2
from tensorboardX.proto import summary_pb2
from tensorboardX.proto import tensor_pb2
from tensorboardX.proto import types_pb2

CONFIG_TAG = 'config'
_PATTERN = 'events.out.tfevents.*'
# A TFRecord: little-endian uint64 length, its CRC, the data, the data's CRC.
_HEADER = struct.Struct('<QI')
_FOOTER_BYTES = 4
# Scalars go as float64 tensors of TensorBoard's scalars plugin: the
# `simple_value` of `add_scalar` is a float32, exact only to 2^24 (a byte
# count of 66,534,800,000 read back as 66,534,801,408).
_SCALARS = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name='scalars'))
# A NaN is a finding (the row shows it), not a warning to print on each write.
logging.getLogger('tensorboardX.x2num').setLevel(logging.ERROR)


def _events(path: str):
  """Yields the events of one file; stops at a torn or corrupt record."""
  with open(path, 'rb') as f:
    while True:
      header = f.read(_HEADER.size)
      if len(header) < _HEADER.size:
        return
      length, _ = _HEADER.unpack(header)
      record = f.read(length + _FOOTER_BYTES)
      if len(record) < length + _FOOTER_BYTES:
        return  # A writer killed mid-record.
      try:
        yield event_pb2.Event.FromString(record[:length])
      except message.DecodeError:
        return


def _scalar(tag: str, value: float) -> summary_pb2.Summary:
  return summary_pb2.Summary(value=[summary_pb2.Summary.Value(
      tag=tag, metadata=_SCALARS, tensor=tensor_pb2.TensorProto(
          dtype=types_pb2.DT_DOUBLE, double_val=[value]))])


def _config_text(config: dict) -> str:
  # Indented lines are a code block in TensorBoard's markdown text view.
  text = json.dumps(config, indent=2, sort_keys=True, default=str)
  return '\n'.join('    ' + line for line in text.splitlines())


class EventWriter:
  """Appends a run's metrics rows and config to the event files in `logdir`.

  Args:
    logdir: the directory of the event files; made if missing.
    fresh: the run starts from round 0, so event files of an earlier run
      there are removed (metrics.jsonl is likewise started anew).
  """

  def __init__(self, logdir: str, *, fresh: bool):
    self._written = set()  # (tag, step) of every scalar in the files
    self._config = None  # the newest config text in the files
    for path in sorted(glob.glob(os.path.join(logdir, _PATTERN))):
      if fresh:
        os.remove(path)
        continue
      for event in _events(path):
        for value in event.summary.value:
          if (value.HasField('simple_value')
              or value.metadata.plugin_data.plugin_name == 'scalars'):
            self._written.add((value.tag, event.step))
          elif value.tag.startswith(CONFIG_TAG) and value.tensor.string_val:
            self._config = value.tensor.string_val[0].decode()
    # tensorboardX names files by the second and truncates an existing one:
    # a unique suffix keeps a restart within the same second from erasing.
    self._writer = SummaryWriter(logdir, flush_secs=30,
                                 filename_suffix=f'.{time.time_ns()}')
    # Its `add_scalar` writes float32 only; summaries of our own go here.
    # pylint: disable-next=protected-access
    self._events = self._writer._get_file_writer()

  def write_config(self, config: dict, step: int) -> None:
    """Writes the config as text at `step`, unless the files hold it already."""
    text = _config_text(config)
    if text != self._config:
      self._writer.add_text(CONFIG_TAG, text, step)
      self._config = text

  def write_rows(self, rows) -> None:
    """Writes each row's numbers as scalars at step `row['round']`.

    None (not measured) and non-numbers are skipped; NaN and infinities are
    written as they are (TensorBoard shows them).
    """
    for row in rows:
      step = row['round']
      for tag, value in row.items():
        if (tag == 'round' or (tag, step) in self._written
            or not isinstance(value, (int, float))):
          continue
        self._events.add_summary(_scalar(tag, float(value)), step)
        self._written.add((tag, step))
    self._writer.flush()  # Rows are minutes apart; show each at once.

  def close(self) -> None:
    self._writer.close()
