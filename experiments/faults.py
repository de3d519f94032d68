"""What a long run needs to survive faults: preemption, non-finite steps, and
a per-step record that a resumed run continues exactly.

* `Preemption`: SIGTERM (a preemptible pod being reclaimed) or SIGINT
  (Ctrl-C) sets a flag; the training loop then writes a checkpoint and
  raises `Preempted`. A second signal stops at once.
* `WorkdirLock`: one training process per workdir.
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
import fcntl
import os
import re
import signal
import socket
import threading
import time
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

import normjax


class Preempted(Exception):
  """SIGTERM or SIGINT arrived; a checkpoint was written at `step`."""

  def __init__(self, step: int, directory: str, signum: int):
    self.step, self.signal = step, signal.Signals(signum).name
    super().__init__(
        f'stopped by {self.signal} after step {step}; checkpoint '
        f'{directory}/{step} is complete: rerun the same command to resume.')

  @property
  def exit_code(self) -> int:
    """128 + the signal number, as the shell reports a signalled process."""
    return 128 + signal.Signals[self.signal].value


class NonFiniteError(FloatingPointError):
  """A step produced a NaN or Inf loss or gradient, or the run diverged."""


class SaveError(OSError):
  """Writing a checkpoint failed (a full disk, a lost mount)."""


class Preemption:
  """`with Preemption() as p:` ... `p.requested` is the signal number after
  a SIGTERM or SIGINT (else 0).

  The first signal only sets the flag; the handlers that were there before
  come back at once, so a second signal acts as it would have (SIGINT
  raises KeyboardInterrupt, SIGTERM ends the process). Only the main thread
  may install signal handlers; elsewhere (a test thread) this is a no-op.
  """
  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = 0
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self.requested = signum
    self._restore()

  def _restore(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def __enter__(self) -> Preemption:
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle)
                        for s in self.SIGNALS}
    return self

  def __exit__(self, *exc) -> None:
    self._restore()


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds <workdir>/.lock for this process.

  The lock is an `fcntl.flock` on the file, which the operating system
  drops when the process dies however it dies, so a lock file left by a
  dead process is simply taken over. A second process gets a one-line
  ValueError naming the holder (pid, host, start time). On a multi-host run
  only process 0 takes it (the others follow process 0). Re-entrant within
  a process: an inner `WorkdirLock` of a workdir this process holds is a
  no-op.
  """
  _held: set[str] = set()  # the lock files this process holds

  def __init__(self, workdir: str, take: bool = True):
    self.path = os.path.realpath(os.path.join(workdir, '.lock'))
    self.take = take
    self._file = None

  def __enter__(self) -> WorkdirLock:
    if not self.take or self.path in WorkdirLock._held:
      return self
    f = open(self.path, 'a+')  # pylint: disable=consider-using-with
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or 'another process'
      f.close()
      raise ValueError(
          f'{os.path.dirname(self.path)} is in use by {holder}; wait for '
          'that run to end, or give this one another --workdir.') from None
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()} on {socket.gethostname()} since '
            f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n')
    f.flush()
    self._file = f
    WorkdirLock._held.add(self.path)
    return self

  def __exit__(self, *exc) -> None:
    if self._file is not None:
      WorkdirLock._held.discard(self.path)
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


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


# ------------------------------------------------------------ divergence --


class DivergenceWatch:
  """Flags a step loss above `factor` times a reference: `ceiling` (the
  loss of a uniform prediction, log V) from the first step, and the median
  of the last `window` step losses once there are 10 (factor 0: never)."""

  def __init__(self, factor: float, ceiling: float = float('inf'),
               window: int = 100):
    self.factor, self.ceiling, self.window = float(factor), ceiling, window
    self.losses: list[float] = []

  def check(self, loss: float) -> str | None:
    """A phrase naming the divergence, or None (and `loss` is recorded)."""
    recent = self.losses[-self.window:]
    if self.factor > 0:
      if loss > self.factor * self.ceiling:
        return (f'loss {loss:.4g} is {loss / self.ceiling:.3g} times that of '
                f'a uniform prediction ({self.ceiling:.4g}; limit '
                f'{self.factor:g}x)')
      median = float(np.median(recent)) if recent else 0.0
      if len(recent) >= min(10, self.window) and loss > self.factor * median:
        return (f'loss {loss:.4g} is {loss / median:.3g} times the median '
                f'{median:.4g} of the last {len(recent)} steps (limit '
                f'{self.factor:g}x)')
    self.losses = recent + [loss]
    return None


def largest(probes: Mapping[str, Any]) -> str:
  """The layer with the largest gradient norm and the norm with the largest
  input, from one step's probes, as a phrase for an error message."""
  def top(metric):
    values = {k.rsplit('/', 1)[0]: float(v) for k, v in probes.items()
              if k.endswith('/' + metric) and not k.startswith('model/')}
    return max(values.items(), key=lambda kv: kv[1]) if values else None
  found = []
  grad, act = top('grad_norm'), top('act_max')
  if grad:
    found.append(f'largest gradient norm {grad[1]:.3g} in {grad[0]}')
  if act:
    found.append(f'largest norm input {act[1]:.3g} at {act[0]}')
  return '; '.join(found) if found else 'no probe located it'
