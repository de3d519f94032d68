"""Two processes on localhost (CPU collectives) train like one process.

Runs the real entry point: once as 1 process with 4 CPU devices, once as 2
processes with 2 devices each (jax.distributed, gloo), and compares the
per-step losses and the final test loss after 4 PowerNorm steps,
checkpointing and checkpoint averaging.
"""

import os
import socket
import subprocess
import sys

import pytest

import json
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
ARGS = ['-m', 'experiments.wmt', '--config=powernorm,smoke',
        '--config.train.num_steps=4', '--config.train.eval_every=100',
        '--config.train.checkpoint_every=2']


def launch(workdir, devices, **env):
  env = {**os.environ, 'XLA_FLAGS':
         f'--xla_force_host_platform_device_count={devices}', **env}
  return subprocess.Popen([sys.executable, *ARGS, f'--workdir={workdir}'],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def results(workdir):
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)


def step_lines(out):
  """The logged steps' lines (not the first step's compile-time line)."""
  return [l for l in out.replace('\r', '\n').splitlines()
          if re.match(r'step \d+: (?!compiled)', l)]


@pytest.mark.slow  # two JAX processes: run by `pytest -m slow` (CI does)
def test_two_processes_match_one(tmp_path):
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  one = launch(str(tmp_path / 'one'), 4)
  two = [launch(str(tmp_path / 'two'), 2, JAX_NUM_PROCESSES='2',
                JAX_PROCESS_ID=str(i), JAX_COORDINATOR_ADDRESS=f'localhost:'
                f'{port}') for i in range(2)]
  outs = []
  for p in [one, *two]:
    out, _ = p.communicate(timeout=400)
    assert p.returncode == 0, out[-3000:]
    outs.append(out)
  # Per-step loss and gradient norm (printed to 4 digits) agree ...
  lines = [[re.sub(r'tokens_per_s [^,]+, ', '', l) for l in step_lines(o)]
           for o in outs]
  assert len(lines[0]) == 2 and lines[0] == lines[1] == lines[2], lines
  # ... and so does the test loss of the averaged final model (full float).
  a, b = results(str(tmp_path / 'one')), results(str(tmp_path / 'two'))
  deviation = max(abs(a[k] - b[k]) for k in ('loss', 'nll'))
  print('|two processes - one process| in test loss after 4 steps:',
        deviation)
  assert deviation < 1e-5
