"""What a long run needs to survive faults: preemption, non-finite steps, and
a per-step record that a resumed run continues exactly.

* `Preemption`: SIGTERM (a preemptible pod being reclaimed) sets a flag; the
  training loop then writes a final checkpoint and raises `Preempted`.
* `NonFiniteError`: a step whose loss or gradient norm is NaN/Inf, with
  `locate` naming where the non-finite values first appear (the probes of
  the same step: norm inputs in the model's forward order, per-layer
  gradient norms, non-finite parameters).
* `StepLog`: <workdir>/losses.csv, one row per step (loss, nll, tokens,
  gradient norm, a CRC of the batch): after a resume it holds exactly the
  rows an uninterrupted run writes, so the two can be compared bit for bit.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import threading
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

import normjax


class Preempted(Exception):
  """SIGTERM arrived; a final checkpoint was written at `step`."""

  def __init__(self, step: int, directory: str):
    super().__init__(
        f'stopped by SIGTERM after step {step}; checkpoint {directory}/{step} '
        'is complete: rerun the same command to resume.')
    self.step = step


class NonFiniteError(FloatingPointError):
  """A step produced a NaN or Inf loss or gradient."""


class Preemption:
  """`with Preemption() as p:` ... `p.requested` is True after a SIGTERM.

  Only the main thread may install signal handlers; elsewhere (a test
  thread) this is a no-op. The previous handler comes back on exit.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __enter__(self) -> Preemption:
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# ------------------------------------------------------- the step record --

LOSS_COLUMNS = ('step', 'loss', 'nll', 'ntokens', 'grad_norm', 'batch_crc')


def batch_crc(batch: Mapping[str, np.ndarray]) -> int:
  """CRC32 of a batch's arrays (sorted keys): the data order, cheaply."""
  crc = 0
  for key in sorted(batch):
    crc = zlib.crc32(np.ascontiguousarray(batch[key]).tobytes(), crc)
  return crc


class StepLog:
  """<workdir>/losses.csv: per-step values, exact (`repr` of the floats).

  `StepLog(workdir, resume_step=s)` drops the rows after step `s` (written
  by a killed run after its last checkpoint). Rows are flushed at once, so
  a SIGKILL loses none of the finished steps.
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    self.path = os.path.join(workdir, 'losses.csv')
    rows = []
    if os.path.exists(self.path):
      rows = [r for r in read_losses(self.path)
              if int(r['step']) <= resume_step]
    tmp = self.path + '.tmp'
    with open(tmp, 'w', newline='') as f:
      writer = csv.DictWriter(f, LOSS_COLUMNS)
      writer.writeheader()
      writer.writerows(rows)
    os.replace(tmp, self.path)  # a kill here leaves the old or the new file
    self._file = open(self.path, 'a', newline='')
    self._writer = csv.writer(self._file)

  def write(self, step: int, metrics: Mapping[str, Any], crc: int) -> None:
    self._writer.writerow(
        [step] + [repr(float(metrics[k])) for k in LOSS_COLUMNS[1:-1]] + [crc])
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def read_losses(path: str) -> list[dict[str, str]]:
  """The rows of losses.csv (or of <path>/losses.csv); a torn last line
  (a kill mid-write) is dropped."""
  if os.path.isdir(path):
    path = os.path.join(path, 'losses.csv')
  with open(path, newline='') as f:
    reader = csv.DictReader(f)
    if tuple(reader.fieldnames or ()) != LOSS_COLUMNS:
      raise ValueError(f'{path}: not a losses file (columns {LOSS_COLUMNS}, '
                       f'got {reader.fieldnames}); move it away or delete it.')
    return [r for r in reader if None not in r.values() and all(r.values())]


# ------------------------------------------- where a NaN first appears --

_TOP = ('embedding', 'shared_embedding', 'encoder', 'decoder',
        'output_projection', 'adaptive_softmax')
_IN_LAYER = ('attention_norm', 'attention', 'self_attention', 'qk_norm',
             'cross_attention_norm', 'cross_attention', 'ffn_norm', 'ffn')


def forward_order(path: str) -> tuple:
  """A sort key putting probe sites and layers in the model's forward order:
  embedding, encoder (embed_norm, layer_0, ..., final_norm), decoder, output;
  within a layer attention, cross-attention, FFN (a '_out' norm after its
  sublayer)."""
  parts = path.split('/')
  key = [_TOP.index(parts[0]) if parts[0] in _TOP else len(_TOP)]
  for part in parts[1:]:
    match = re.fullmatch(r'layer_(\d+)', part)
    if match:
      key.append((1, int(match.group(1))))
    elif part.startswith('embed_norm'):
      key.append((0, 0))
    elif part.startswith('final_norm'):
      key.append((2, 0))
    else:
      base = part[:-4] if part.endswith('_out') else part
      rank = _IN_LAYER.index(base) if base in _IN_LAYER else len(_IN_LAYER)
      key.append((1, 2 * rank + part.endswith('_out')))
  return tuple(key)


def _nonfinite(values: Mapping[str, Any], metric: str) -> list[str]:
  return sorted({k.rsplit('/', 1)[0] for k, v in values.items()
                 if k.endswith('/' + metric) and not np.isfinite(float(v))},
                key=forward_order)


def nonfinite_layers(params: Any) -> list[str]:
  """Layers (probing.layer_of) holding NaN or Inf parameters, forward order."""
  from experiments import probing  # pylint: disable=g-import-not-at-top
  bad = {probing.layer_of(path)
         for path, leaf in normjax.probes.flatten(params).items()
         if not np.all(np.isfinite(np.asarray(leaf, np.float32)))}
  return sorted(bad, key=forward_order)


def locate(probes: Mapping[str, Any], params: Any = None) -> str:
  """Where the non-finite values are, from one step's probes (and the
  parameters the step started from), as a phrase for an error message."""
  found = []
  if params is not None:
    layers = nonfinite_layers(params)
    if layers:
      found.append(f'non-finite parameters in {", ".join(layers[:4])}')
  inputs = sorted({*_nonfinite(probes, 'act_var'),
                   *_nonfinite(probes, 'act_max')}, key=forward_order)
  if inputs:
    found.append(f'first norm with a non-finite input: {inputs[0]} (forward '
                 'order; the values went bad before it)')
  elif probes:
    found.append('every norm input is finite (the loss or the backward '
                 'pass went bad)')
  grads = [g for g in _nonfinite(probes, 'grad_norm') if g != 'model']
  if grads:
    found.append('non-finite gradients in '
                 f'{", ".join(grads[-3:][::-1])}'
                 f'{" ..." if len(grads) > 3 else ""} (backward order)')
  return '; '.join(found) if found else 'no probe located it'
