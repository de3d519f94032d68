"""Train-step speed per norm (tokens/s, ratio to LayerNorm), and sharding.

    python -m benchmarks.train_steps                  # demo presets, 10 rounds
    python -m benchmarks.train_steps --size=small     # the LM `small` preset
    python -m benchmarks.train_steps --quick          # smoke presets (CI)

For translation (`wmt` presets) and language modelling (`ptb_*` presets) it
builds one experiment per norm (layernorm, batchnorm, pn_v, powernorm,
unified) on the same data, compiles each train step, then times them on the
same batches: one warm-up pass over the batches compiles every shape, then
each round runs every norm's step once on that round's batch, in a shuffled
order; medians with `block_until_ready`. tokens/s counts the target tokens of the
batch (translation: non-pad targets; LM: batch x length). Ratios to
LayerNorm are paired: the median over rounds of the two times of a round.

`sharding_check()` runs the LM step on 1, 2, 4 and 8 simulated CPU devices
(data parallel) from the same state and batches and reports the largest
parameter difference to 1 device: a correctness scale. On 2 cores the
simulated devices share the cores, so their step times are not a speed-up.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

NORMS = ('layernorm', 'batchnorm', 'pn_v', 'powernorm', 'unified')
TASKS = ('translation', 'lm')


def _experiment(task: str, norm: str, size: str, workdir: str, devices=None):
  # Imported here: the experiments pull in tfds, which the kernel
  # benchmark does not need.
  from experiments import language_model, translation  # pylint: disable=g-import-not-at-top
  from experiments.configs import lm, wmt  # pylint: disable=g-import-not-at-top
  if task == 'translation':
    return translation.Experiment(wmt.get_config(f'{norm},{size}'), workdir,
                                  devices)
  return language_model.Experiment(lm.get_config(f'ptb_{norm},{size}'),
                                   workdir, devices)


def _tokens(batch: dict) -> int:
  if 'weights' in batch:
    return int(np.sum(batch['weights'] > 0))
  targets = batch.get('targets', batch.get('inputs'))
  return int(np.sum(np.asarray(targets) > 0))


def run(task: str, size: str = 'demo', rounds: int = 10,
        norms: tuple[str, ...] = NORMS) -> list[dict]:
  """One dict per norm: step ms, tokens/s, paired ratio to layernorm."""
  from experiments import sharding  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    exps = {n: _experiment(task, n, size, os.path.join(tmp, n)) for n in norms}
    batches = iter(exps[norms[0]].batcher)
    states = {n: e.state for n, e in exps.items()}

    def step(name, batch):
      exp = exps[name]
      with jax.set_mesh(exp.mesh):
        t0 = time.perf_counter()
        states[name], metrics = exp.train_step(
            states[name], sharding.global_batch(batch, exp.mesh))
        jax.block_until_ready((states[name], metrics))
        return time.perf_counter() - t0

    fixed = [next(batches) for _ in range(rounds)]
    for name in norms:  # compiles every batch shape (translation buckets)
      for batch in fixed:
        step(name, batch)
    times, tokens = {n: [] for n in norms}, []
    order, rng = list(norms), random.Random(0)
    for batch in fixed:
      tokens.append(_tokens(batch))
      rng.shuffle(order)
      for name in order:
        times[name].append(step(name, batch))
  base = times['layernorm'] if 'layernorm' in times else None
  rows = []
  for name in norms:
    t = times[name]
    rows.append(dict(
        task=task, size=size, norm=name, rounds=rounds,
        step_ms=1e3 * statistics.median(t),
        tokens_per_s=statistics.median(k / s for k, s in zip(tokens, t)),
        vs_layernorm=(statistics.median(a / b for a, b in zip(t, base))
                      if base else None)))
  return rows


def markdown(rows: list[dict]) -> str:
  lines = ['| task | preset | norm | step ms | tokens/s | step / LayerNorm step |',
           '| --- | --- | --- | --- | --- | --- |']
  for r in rows:
    ratio = '—' if r['vs_layernorm'] is None else f"{r['vs_layernorm']:.3f}"
    lines.append(f"| {r['task']} | {r['size']} | {r['norm']} | "
                 f"{r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {ratio} |")
  return '\n'.join(lines)


def _sharding_worker(size: str, steps: int) -> None:
  """Runs in a fresh process with 8 simulated devices; prints one line/mesh."""
  from experiments import language_model, sharding  # pylint: disable=g-import-not-at-top
  from experiments.configs import lm  # pylint: disable=g-import-not-at-top
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for n in (1, 2, 4, 8):
      config = lm.get_config(f'ptb_powernorm,{size}')
      config.unlock()
      config.optim.eps = 1.0  # as in sharded_step_test: no sign flips of
      config.lock()           # rounding-level gradients in Adam's first steps
      exp = language_model.Experiment(config, os.path.join(tmp, str(n)),
                                      devices=jax.devices()[:n])
      batches, state, times = iter(exp.batcher), exp.state, []
      with jax.set_mesh(exp.mesh):
        for _ in range(steps):
          batch = sharding.global_batch(next(batches), exp.mesh)
          t0 = time.perf_counter()
          state, _ = exp.train_step(state, batch)
          jax.block_until_ready(state)
          times.append(time.perf_counter() - t0)
      params = [np.asarray(x, np.float64)
                for x in jax.tree.leaves(state.params)]
      results[n] = (params, statistics.median(times[1:]))
  for n, (params, t) in results.items():
    dev = max(float(np.max(np.abs(a - b)))
              for a, b in zip(params, results[1][0]))
    print(f'SHARDING {n} {1e3 * t:.1f} {dev:.3e}', flush=True)


def sharding_check(size: str = 'smoke', steps: int = 4) -> list[dict]:
  """LM powernorm on 1/2/4/8 simulated devices: step ms, max |dparams|."""
  env = dict(os.environ, XLA_FLAGS=(
      os.environ.get('XLA_FLAGS', '') +
      ' --xla_force_host_platform_device_count=8'), JAX_PLATFORMS='cpu')
  done = subprocess.run(
      [sys.executable, '-m', 'benchmarks.train_steps', '--sharding_worker',
       f'--size={size}', f'--steps={steps}'], env=env, capture_output=True,
      text=True, check=False,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if done.returncode:
    raise RuntimeError(f'sharding worker failed:\n{done.stderr[-3000:]}')
  rows = []
  for line in done.stdout.splitlines():
    if line.startswith('SHARDING '):
      _, n, ms, dev = line.split()
      rows.append(dict(devices=int(n), step_ms=float(ms),
                       max_param_diff=float(dev), size=size, steps=steps))
  return rows


def sharding_markdown(rows: list[dict]) -> str:
  lines = ['| simulated devices | step ms (shared cores) | '
           f'max \\|params − 1 device\\| after {rows[0]["steps"]} steps |',
           '| --- | --- | --- |']
  for r in rows:
    lines.append(f"| {r['devices']} | {r['step_ms']:.1f} | "
                 f"{r['max_param_diff']:.1e} |")
  return '\n'.join(lines)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--size', default='demo', help='preset modifier')
  ap.add_argument('--rounds', type=int, default=10)
  ap.add_argument('--task', choices=TASKS, action='append')
  ap.add_argument('--quick', action='store_true', help='smoke presets, layernorm and powernorm, 2 rounds (CI)')
  ap.add_argument('--sharding_worker', action='store_true',
                  help=argparse.SUPPRESS)
  ap.add_argument('--steps', type=int, default=4, help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  from experiments.runtime import tune_malloc  # pylint: disable=g-import-not-at-top
  malloc = tune_malloc()
  if a.sharding_worker:
    _sharding_worker(a.size, a.steps)
    return
  from benchmarks.norms import machine_info  # pylint: disable=g-import-not-at-top
  size, rounds = ('smoke', 2) if a.quick else (a.size, a.rounds)
  norms = ('layernorm', 'powernorm') if a.quick else NORMS
  print(machine_info(malloc))
  rows = [r for t in (a.task or TASKS) for r in run(t, size, rounds, norms)]
  print(markdown(rows))
  print(sharding_markdown(sharding_check()))


if __name__ == '__main__':
  main()
