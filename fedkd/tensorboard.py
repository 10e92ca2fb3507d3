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
from tensorboardX import record_writer
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
_log = logging.getLogger(__name__)
# A NaN is a finding (the row shows it), not a warning to print on each write.
logging.getLogger('tensorboardX.x2num').setLevel(logging.ERROR)


def _events(path: str):
  """Yields the events of one file, up to a torn or corrupt record.

  A record cut short (a writer killed mid-record) ends the file quietly; a
  length that fails its CRC or data that does not parse end it with a
  warning. No length is trusted beyond the bytes the file holds.
  """
  with open(path, 'rb') as f:
    size = os.fstat(f.fileno()).st_size
    while True:
      header = f.read(_HEADER.size)
      if len(header) < _HEADER.size:
        return
      length, crc = _HEADER.unpack(header)
      if record_writer.masked_crc32c(header[:8]) != crc:
        _log.warning('%s is corrupt from byte %d (a record length fails its '
                     'CRC); reading no further', path, f.tell() - len(header))
        return
      if f.tell() + length + _FOOTER_BYTES > size:
        return  # A writer killed mid-record.
      record = f.read(length + _FOOTER_BYTES)
      try:
        yield event_pb2.Event.FromString(record[:length])
      except message.DecodeError:
        _log.warning('%s is corrupt (a record does not parse); reading no '
                     'further', path)
        return


def _event_files(logdir: str) -> list[str]:
  """The event files in `logdir`, skipping (with a warning) non-files."""
  paths = []
  for path in sorted(glob.glob(os.path.join(logdir, _PATTERN))):
    if os.path.isfile(path) and not os.path.islink(path):
      paths.append(path)
    else:
      _log.warning('%s is not an event file (not a regular file); ignoring it',
                   path)
  return paths


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
    for path in _event_files(logdir):
      if fresh:
        os.remove(path)
        continue
      try:
        events = list(_events(path))
      except OSError as e:
        _log.warning('cannot read %s (%s); ignoring it', path, e.strerror)
        continue
      for event in events:
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
    """Flushes and closes the event file.

    Where the flush fails (a full disk), tensorboardX leaves its writer open
    and fails again at exit, with tracebacks from its atexit hook and its
    thread: that writer is then stopped and marked closed before the error
    goes on.
    """
    try:
      self._writer.close()
    except OSError:
      # pylint: disable=protected-access
      events = self._events.event_writer
      if not events._closed:
        events._closed = True
        events._worker.stop()
      raise
