"""GPU/TPU path: the bf16 LM train step per norm and its model FLOP utilisation.

    python -m benchmarks.accelerator                 # skipped without GPU/TPU
    python -m benchmarks.accelerator --force         # also on CPU (a check)

The `ptb_*` LM (`--size`, default the full preset) with bfloat16 compute,
each norm's train step timed on the same batches after a compiling one.
MFU = 6 x parameters x tokens/s (forward + backward of the matmuls, the
usual approximation) / the peak bf16 matmul FLOP/s *measured in the same run*
(a jitted 4096^3 bf16 matmul, best of 10), so no spec-sheet number enters.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp

NORMS = ('layernorm', 'powernorm', 'unified')


def matmul_peak(n: int = 4096, reps: int = 10) -> float:
  """FLOP/s of a jitted bf16 n^3 matmul on the default device (best run)."""
  a = jnp.ones((n, n), jnp.bfloat16)
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(a))
  best = float('inf')
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a))
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


def run(size: str = '', steps: int = 5, norms=NORMS) -> dict:
  from experiments import language_model, sharding  # pylint: disable=g-import-not-at-top
  from experiments.configs import lm  # pylint: disable=g-import-not-at-top
  peak = matmul_peak(1024 if size == 'smoke' else 4096)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for norm in norms:
      config = lm.get_config(f'ptb_{norm}' + (f',{size}' if size else ''))
      config.unlock()
      config.model.dtype = 'bfloat16'
      config.data.source = 'synthetic'
      config.lock()
      exp = language_model.Experiment(config, os.path.join(tmp, norm))
      params = sum(x.size for x in jax.tree.leaves(exp.state.params))
      batches, state, times = iter(exp.batcher), exp.state, []
      with jax.set_mesh(exp.mesh):
        for _ in range(steps + 1):
          batch = sharding.global_batch(next(batches), exp.mesh)
          t0 = time.perf_counter()
          state, m = exp.train_step(state, batch)
          jax.block_until_ready((state, m))
          times.append(time.perf_counter() - t0)
      tokens = config.data.batch_size * config.data.seq_len
      tps = tokens / statistics.median(times[1:])
      rows.append(dict(norm=norm, params=params, tokens_per_s=tps,
                       loss=float(m['loss']) if 'loss' in m else None,
                       mfu=6 * params * tps / peak))
  return dict(device=jax.devices()[0].device_kind, peak_flops=peak,
              rows=rows)


def markdown(result: dict) -> str:
  lines = [f"device: {result['device']}; measured bf16 matmul peak "
           f"{result['peak_flops'] / 1e12:.1f} TFLOP/s", '',
           '| norm | parameters | tokens/s | MFU |', '| --- | --- | --- | --- |']
  for r in result['rows']:
    lines.append(f"| {r['norm']} | {r['params']:,} | "
                 f"{r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% |")
  return '\n'.join(lines)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--size', default='', help="preset modifier, e.g. 'demo'")
  ap.add_argument('--steps', type=int, default=5)
  ap.add_argument('--force', action='store_true', help='run on CPU too')
  a = ap.parse_args(argv)
  backend = jax.default_backend()
  if backend == 'cpu' and not a.force:
    print('accelerator benchmark: skipped (backend cpu; no GPU/TPU here)')
    return
  print(markdown(run(a.size, a.steps)))


if __name__ == '__main__':
  main()
