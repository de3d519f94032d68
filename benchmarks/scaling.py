"""How the LM train step's time and memory grow with batch, length and width.

    python -m benchmarks.scaling                 # from ptb_*,demo; writes the figure
    python -m benchmarks.scaling --quick         # smoke model, 2 points per axis (CI)

From the `demo` LM (batch 32, length 64, d_model 128, ffn 2 x d_model), one
axis is varied at a time, for LayerNorm and PowerNorm. Per point: the median
of `--reps` train steps after a warm-up one, and XLA's memory plan of the
compiled step (arguments + outputs + temporaries - aliased, from
`memory_analysis()`), which is deterministic where peak RSS is not.
The figure goes to benchmarks/figures/scaling.png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax

AXES = {  # name: (config key, values)
    'batch': ('data.batch_size', (8, 16, 32, 64)),
    'length': ('data.seq_len', (32, 64, 128, 256)),
    'width': ('model.d_model', (64, 128, 256, 512)),
}
QUICK_AXES = {  # from the smoke model (batch 8, length 8, d_model 32)
    'batch': ('data.batch_size', (4, 8)),
    'length': ('data.seq_len', (8, 16)),
    'width': ('model.d_model', (32, 64)),
}
NORMS = ('layernorm', 'powernorm')
FIGURE = os.path.join(os.path.dirname(__file__), 'figures', 'scaling.png')


def _point(norm: str, key: str, value: int, reps: int, workdir: str,
           base: str) -> dict:
  from experiments import language_model, sharding  # pylint: disable=g-import-not-at-top
  from experiments.configs import lm  # pylint: disable=g-import-not-at-top
  config = lm.get_config(f'ptb_{norm},{base}')
  overrides = {key: value,
               'data.synthetic_train_lines': 400 if base == 'smoke' else 3000}
  if key == 'model.d_model':
    overrides['model.ffn_dim'] = 2 * value
  if key == 'data.seq_len':
    overrides['model.max_len'] = max(512, value)
  config.update_from_flattened_dict(overrides)
  exp = language_model.Experiment(config, workdir)
  batches, state, times = iter(exp.batcher), exp.state, []
  with jax.set_mesh(exp.mesh):
    batch = sharding.global_batch(next(batches), exp.mesh)
    compiled = exp.train_step.lower(state, batch).compile()
    mem = compiled.memory_analysis()
    for _ in range(reps + 1):
      t0 = time.perf_counter()
      state, m = compiled(state, batch)
      jax.block_until_ready((state, m))
      times.append(time.perf_counter() - t0)
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes +
           mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  tokens = config.data.batch_size * config.data.seq_len
  step = statistics.median(times[1:])
  return dict(norm=norm, key=key, value=value, step_ms=1e3 * step,
              tokens_per_s=tokens / step, memory_mib=total / 2**20,
              temp_mib=mem.temp_size_in_bytes / 2**20)


def run(reps: int = 3, quick: bool = False) -> list[dict]:
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for axis, (key, values) in (QUICK_AXES if quick else AXES).items():
      for value in values:
        for norm in NORMS:
          rows.append(dict(axis=axis, **_point(
              norm, key, value, 1 if quick else reps,
              os.path.join(tmp, f'{norm}_{axis}_{value}'),
              'smoke' if quick else 'demo')))
  return rows


def markdown(rows: list[dict]) -> str:
  lines = ['| varied | value | norm | step ms | tokens/s | XLA memory plan MiB |',
           '| --- | --- | --- | --- | --- | --- |']
  for r in rows:
    lines.append(f"| {r['axis']} | {r['value']} | {r['norm']} | "
                 f"{r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | "
                 f"{r['memory_mib']:.1f} |")
  return '\n'.join(lines)


def figure(rows: list[dict], path: str = FIGURE) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(2, len(AXES), figsize=(12, 6.5))
  for col, axis in enumerate(AXES):
    for norm in NORMS:
      pts = [r for r in rows if r['axis'] == axis and r['norm'] == norm]
      xs = [r['value'] for r in pts]
      axes[0, col].plot(xs, [r['step_ms'] for r in pts], 'o-', label=norm)
      axes[1, col].plot(xs, [r['memory_mib'] for r in pts], 'o-', label=norm)
    for row, label in enumerate(('train step (ms)', 'XLA memory plan (MiB)')):
      ax = axes[row, col]
      ax.set_xscale('log', base=2)
      ax.set_yscale('log')
      ax.set_xlabel({'batch': 'batch (sequences)', 'length': 'sequence length',
                     'width': 'd_model (ffn = 2 d_model)'}[axis])
      ax.set_ylabel(label)
      ax.grid(True, which='both', alpha=0.3)
  axes[0, 0].legend()
  fig.suptitle('LM train step on the 2-core CPU, from the demo model '
               '(batch 32, length 64, d_model 128)')
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--reps', type=int, default=3)
  ap.add_argument('--quick', action='store_true',
                  help='the smoke model, two points per axis, one timed step (CI)')
  ap.add_argument('--figure', default=FIGURE)
  a = ap.parse_args(argv)
  from benchmarks.norms import machine_info  # pylint: disable=g-import-not-at-top
  from experiments.runtime import tune_malloc  # pylint: disable=g-import-not-at-top
  print(machine_info(tune_malloc()))
  rows = run(a.reps, a.quick)
  print(markdown(rows))
  print('figure:', figure(rows, a.figure))


if __name__ == '__main__':
  main()
