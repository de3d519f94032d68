"""Runs a sweep's runs as subprocesses, `parallel` at a time, resumably.

Each run is the ordinary command of `grid.Run` in its own workdir, its
output appended to <run>/log.txt. <run>/sweep.json records the command
and every attempt (start, wall seconds, exit code; both None while it
runs, and after a sweep killed by SIGKILL). On a re-run:
- a run with results.json is done and skipped;
- a run stopped part-way (killed, preempted, a failed save) is started
  again with the same command and resumes from its newest checkpoint;
- a run that diverged (exit code 3) is reported, not retried, unless
  `retry_diverged` (it would resume from the last good checkpoint and
  diverge again);
- a run whose workdir holds another command is an error (another sweep's
  run: give this one another --workdir).
SIGTERM or SIGINT to the sweep is passed once to every running run (each
saves a checkpoint after its current step and exits), no new run starts,
and the sweep exits with the signal's code (143 or 130).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from experiments import faults
from experiments.sweeps import grid

RECORD = 'sweep.json'
RESULTS = 'results.json'
LOG = 'log.txt'
DIVERGED = 3  # cli.EXIT_CODES of faults.NonFiniteError
STOPPED = {-signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT, 130, 143}


def record(run: grid.Run) -> dict:
  """<run>/sweep.json ({'command': ..., 'attempts': []} when absent)."""
  path = os.path.join(run.workdir, RECORD)
  if not os.path.exists(path):
    return {'command': run.shell(), 'attempts': []}
  with open(path) as f:
    return json.load(f)


def _write_record(run: grid.Run, rec: dict) -> None:
  path = os.path.join(run.workdir, RECORD)
  with open(path + '.tmp', 'w') as f:
    json.dump(rec, f, indent=2)
  os.replace(path + '.tmp', path)


def status(run: grid.Run) -> str:
  """'done', 'diverged', 'failed' (a user error: see log.txt), 'stopped'
  (killed or preempted part-way) or 'pending'."""
  if os.path.exists(os.path.join(run.workdir, RESULTS)):
    return 'done'
  attempts = record(run)['attempts']
  if not attempts:
    return 'pending'
  code = attempts[-1]['exit_code']
  if code == DIVERGED:
    return 'diverged'
  return 'stopped' if code in STOPPED or code is None else 'failed'


def check_commands(runs: list[grid.Run]) -> None:
  """Refuses runs whose workdir records another command."""
  clashes = [r for r in runs if record(r)['command'] != r.shell()]
  if clashes:
    raise ValueError(
        f'{clashes[0].workdir} (and {len(clashes) - 1} more) holds a run of '
        f'another command ({record(clashes[0])["command"]!r}); give this '
        'sweep another --workdir, or remove those runs.')


# Exec'd in front of a run's command: the run gets SIGTERM when the sweep
# dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG, kept across exec), so no
# run outlives it. Not a preexec_fn: that forks with Python's at-fork hooks,
# which JAX answers with a warning in a multithreaded parent.
_DEATHSIG = (
    'import ctypes, os, signal, sys\n'
    'try:\n'
    "  ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)\n"
    'except (OSError, AttributeError):\n'
    '  pass\n'
    'if os.getppid() == 1:\n'
    '  sys.exit(143)  # the sweep died before the prctl\n'
    'os.execv(sys.argv[1], sys.argv[1:])\n')


def _spawn_command(run: grid.Run) -> list[str]:
  command = run.command(sys.executable)
  if sys.platform.startswith('linux'):
    return [sys.executable, '-c', _DEATHSIG, *command]
  return command


@dataclasses.dataclass
class _Live:
  run: grid.Run
  process: subprocess.Popen
  started: float
  log: object


class Runner:
  """`Runner(runs, parallel).run()` runs what is not done; returns the
  exit code (0, or the stopping signal's 130 / 143). `report(run)` is
  printed after each finished run."""

  def __init__(self, runs: list[grid.Run], parallel: int = 1,
               retry_diverged: bool = False,
               describe: Callable[[grid.Run], str] = lambda run: ''):
    if parallel < 1:
      raise ValueError(f'--parallel={parallel}: must be >= 1.')
    self.runs, self.parallel = runs, parallel
    self.retry_diverged, self.describe = retry_diverged, describe
    self.stop_signal = 0
    self.live: list[_Live] = []

  def todo(self) -> list[grid.Run]:
    skip = {'done'} | (set() if self.retry_diverged else {'diverged'})
    return [r for r in self.runs if status(r) not in skip]

  def _on_signal(self, signum, frame) -> None:
    del frame
    first = not self.stop_signal
    self.stop_signal = self.stop_signal or signum
    for live in self.live:
      if live.process.poll() is None:
        live.process.send_signal(signum)
    if first:
      print(f'sweep: {signal.Signals(signum).name}: the running runs save a '
            'checkpoint and stop; rerun the same command to finish the grid '
            '(a second signal stops them at once).', file=sys.stderr,
            flush=True)

  def _start(self, run: grid.Run) -> None:
    os.makedirs(run.workdir, exist_ok=True)
    log = open(os.path.join(run.workdir, LOG), 'a')  # pylint: disable=consider-using-with
    log.write(f'\n=== {time.strftime("%Y-%m-%d %H:%M:%S")} {run.shell()}\n')
    log.flush()
    process = subprocess.Popen(  # pylint: disable=consider-using-with
        _spawn_command(run), stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True,
        env=dict(os.environ, PYTHONUNBUFFERED='1'))
    started = time.time()
    rec = record(run)
    rec['attempts'].append(dict(  # completed by _finish; a killed sweep
        started=time.strftime('%Y-%m-%dT%H:%M:%S',  # leaves it open
                              time.localtime(started)),
        wall_s=None, exit_code=None))
    _write_record(run, rec)
    self.live.append(_Live(run, process, started, log))

  def _finish(self, live: _Live, position: str) -> None:
    wall = time.time() - live.started
    live.log.close()
    rec = record(live.run)
    rec['attempts'][-1].update(wall_s=round(wall, 2),
                               exit_code=live.process.returncode)
    _write_record(live.run, rec)
    state = status(live.run)
    extra = self.describe(live.run) if state == 'done' else (
        f'exit code {live.process.returncode}; see '
        f'{os.path.join(live.run.workdir, LOG)}')
    print(f'{position} {live.run.cell.name} seed {live.run.seed}: {state} '
          f'after {wall / 60:.1f} min' + (f' ({extra})' if extra else ''),
          flush=True)

  def run(self) -> int:
    todo = self.todo()
    total, finished = len(todo), 0
    print(f'sweep: {len(self.runs)} runs, {len(self.runs) - total} already '
          f'finished, {total} to run, {self.parallel} at a time', flush=True)
    handlers = {s: signal.signal(s, self._on_signal)
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      while self.live or (todo and not self.stop_signal):
        while todo and not self.stop_signal and len(self.live) < self.parallel:
          self._start(todo.pop(0))
        time.sleep(0.2)
        for live in [x for x in self.live if x.process.poll() is not None]:
          self.live.remove(live)
          finished += 1
          self._finish(live, f'[{finished}/{total}]')
    finally:
      for s, handler in handlers.items():
        signal.signal(s, handler)
    if self.stop_signal:
      return 128 + self.stop_signal
    return 0


def lock(root: str) -> faults.WorkdirLock:
  """One sweep per root directory at a time."""
  os.makedirs(root, exist_ok=True)
  return faults.WorkdirLock(root)
