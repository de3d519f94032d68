"""Streaming vs normal stores in the fused kernels, with the output's reader.

    python -m benchmarks.stores              # (4096, 1024) f32, 30 rounds
    python -m benchmarks.stores --rows=2048  # 8 MiB: the default threshold
    python -m benchmarks.stores --quick      # smoke run (CI-sized)

The kernels write y and dx of 8 MiB and more with streaming (non-temporal)
stores, which skip the read of each line before it is written but leave the
output out of the cache (`normjax/_src/kernel_rows.h`). So the store kind is
timed here both alone and with the op that reads the output next: an
elementwise op, a reduction, a matmul, and a residual block's training step.
Each case is one jitted function called with the kernels' threshold set at
call time (`cpu_kernel.stream_stores`) to the default and to never, in the
same interleaved rounds, the last-level cache evicted before every call
(`benchmarks.timing`); the ratio is the median over rounds of the two
paired times (< 1: streaming stores are faster).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.norms import stream_threshold
from benchmarks.timing import cache_evictor, paired_ratio, timed_rounds
from normjax import functional as nf
from normjax._src import cpu_kernel


def cases(rows: int, features: int) -> dict[str, tuple[Callable, tuple]]:
  """{label: (jitted function, args)}: a norm's output and its reader."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((rows, features), np.float32) + 0.5)
  dy = jnp.asarray(rng.standard_normal((rows, features), np.float32))
  w = jnp.asarray(rng.standard_normal((features, features), np.float32)
                  / np.sqrt(features))
  p = {'scale': jnp.ones((features,)), 'bias': jnp.zeros((features,))}
  bn_state = nf.init_batch_norm_state(features)

  def ln(x):
    return nf.layer_norm(x, p)[0]

  def bn(x):
    return nf.batch_norm(x, p, bn_state)[0]

  def block_loss(x, w):
    return jnp.sum((x + ln(x) @ w) * dy)

  def ln_dx(x):
    return jax.grad(lambda x: jnp.sum(ln(x) * dy))(x)

  return {
      'LayerNorm forward': (jax.jit(ln), (x,)),
      'LayerNorm forward, then y * 2 + 1': (jax.jit(lambda x: ln(x) * 2 + 1),
                                            (x,)),
      'LayerNorm forward, then sum(y, axis=0)': (
          jax.jit(lambda x: jnp.sum(ln(x), axis=0)), (x,)),
      'LayerNorm forward, then y @ W': (jax.jit(lambda x: ln(x) @ w), (x,)),
      'LayerNorm fwd+bwd, then dx * 2': (jax.jit(lambda x: ln_dx(x) * 2),
                                         (x,)),
      'BatchNorm forward, then y * 2 + 1': (jax.jit(lambda x: bn(x) * 2 + 1),
                                            (x,)),
      'block step: grad of sum((x + LN(x) @ W) dy)': (
          jax.jit(jax.grad(block_loss, (0, 1))), (x, w)),
  }


def run(rows: int = 4096, features: int = 1024, reps: int = 30,
        quick: bool = False) -> list[dict]:
  """One dict per case: normal-store ms, streaming-store ms, their ratio."""
  if not cpu_kernel.available():
    raise RuntimeError('the fused CPU kernel is unavailable: nothing to time')
  if quick:
    rows, features, reps = 256, 128, 3
  fns = {}
  for label, (f, args) in cases(rows, features).items():
    fns[label, 'streaming'] = (stream_threshold(f, 1 if quick else 0), args)
    fns[label, 'normal'] = (stream_threshold(f, cpu_kernel.STREAM_NEVER),
                            args)
  samples = timed_rounds(fns, 3, reps, None if quick else cache_evictor())
  out = []
  for label in dict.fromkeys(k[0] for k in fns):
    a, b = samples[label, 'streaming'], samples[label, 'normal']
    out.append(dict(case=label, normal_ms=statistics.median(b),
                    streaming_ms=statistics.median(a),
                    ratio=paired_ratio(a, b)))
  return out


def markdown(results: list[dict], rows: int, features: int) -> str:
  mib = rows * features * 4 / 2**20
  lines = [f'x: ({rows}, {features}) f32, {mib:g} MiB per array',
           '', '| case | normal stores, ms | streaming stores, ms | '
           'streaming / normal |', '| --- | --- | --- | --- |']
  for r in results:
    lines.append(f"| {r['case']} | {r['normal_ms']:.3f} | "
                 f"{r['streaming_ms']:.3f} | {r['ratio']:.3f} |")
  return '\n'.join(lines)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--rows', type=int, default=4096)
  ap.add_argument('--features', type=int, default=1024)
  ap.add_argument('--reps', type=int, default=30)
  ap.add_argument('--quick', action='store_true',
                  help='(256, 128), 3 reps, every output streamed: a smoke run')
  a = ap.parse_args(argv)
  if not a.quick and a.reps < 10:
    ap.error('--reps must be >= 10 (use --quick for a smoke run)')
  from experiments.runtime import tune_malloc  # pylint: disable=g-import-not-at-top
  tune_malloc()
  results = run(a.rows, a.features, a.reps, a.quick)
  rows, features = (256, 128) if a.quick else (a.rows, a.features)
  print(markdown(results, rows, features))


if __name__ == '__main__':
  main()
