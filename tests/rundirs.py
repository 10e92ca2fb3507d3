"""Test helpers for run directories: exact snapshots and checkpoint edits."""

import json
import os


def snapshot(path: str) -> dict:
  """Every entry under `path`: file bytes, 'dir', or ('link', target)."""
  entries = {}
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      full = os.path.join(root, name)
      rel = os.path.relpath(full, path)
      if os.path.islink(full):
        entries[rel] = ('link', os.readlink(full))
      elif os.path.isdir(full):
        entries[rel] = 'dir'
      else:
        with open(full, 'rb') as f:
          entries[rel] = f.read()
  return entries


def edit_json(path: str, edit) -> None:
  """Replaces the JSON document in `path` by `edit(document)`."""
  with open(path) as f:
    value = json.load(f)
  with open(path, 'w') as f:
    json.dump(edit(value), f)


def edit_checkpoint_metas(workdir: str, edit) -> None:
  """Applies `edit` to the metadata of every checkpoint in `workdir`."""
  root = os.path.join(workdir, 'checkpoints')
  for step in os.listdir(root):
    edit_json(os.path.join(root, step, 'meta', 'metadata'), edit)
