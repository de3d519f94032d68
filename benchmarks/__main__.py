"""All benchmarks in one run; prints the report and puts it into the README.

    python -m benchmarks                 # ~15 min on 2 cores; rewrites README
    python -m benchmarks --quick         # smoke sizes, README untouched (CI)
    python -m benchmarks --out=FILE      # also write the report to FILE

Sections, each measured in this run on this machine (details in each
module's docstring): the norm kernels against flax.linen, PyTorch (if
installed) and a same-bytes copy (`benchmarks.norms`); LayerNorm and
RMSNorm from 2^14 to 2^24 elements (`benchmarks.sizes`); the translation
and LM train steps per norm (`benchmarks.train_steps`); train-step FLOP/s
against a same-run matmul peak and decoding speed (`benchmarks.efficiency`);
folded inference
(`benchmarks.inference`); step time and memory against batch, length and
width, with a figure (`benchmarks.scaling`); 1/2/4/8 simulated devices
(`benchmarks.train_steps.sharding_check`); and the bf16 accelerator path
(`benchmarks.accelerator`, skipped on CPU). The README's text between the
two `benchmark-results` markers is replaced by the report.
"""

from __future__ import annotations

import argparse
import os
import time

import jax

from benchmarks import accelerator
from benchmarks import efficiency
from benchmarks import inference
from benchmarks import norms
from benchmarks import scaling
from benchmarks import sizes
from benchmarks import train_steps
from experiments.runtime import tune_malloc

BEGIN, END = '<!-- benchmark-results:begin -->', '<!-- benchmark-results:end -->'
README = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'README.md')


def report(quick: bool, figures: dict[str, str]) -> str:
  malloc = tune_malloc()
  started = time.time()
  parts = [norms.machine_info(malloc), '']
  results = norms.run(quick=quick)
  parts += [f"### Norm kernels: x {results[0]['shape']} float32, medians of "
            f"{results[0]['reps']} interleaved rounds", '',
            norms.markdown(results), '', *[f'- {l}' for l in
                                           norms.ratios(results)], '']
  size, rounds = ('smoke', 2) if quick else ('demo', 10)
  which = ('layernorm', 'powernorm') if quick else train_steps.NORMS
  rows = sizes.run(quick=quick)
  path = sizes.figure(rows, figures['sizes'])
  parts += ['### Norm time against size (LayerNorm, RMSNorm fwd+bwd, 2^14-2^24 '
            'elements)', '',
            f'![sizes]({os.path.relpath(path, os.path.dirname(README))})', '',
            sizes.markdown(rows), '', *[f'- {l}' for l in sizes.targets(rows)],
            '']
  rows = [r for t in train_steps.TASKS
          for r in train_steps.run(t, size, rounds, which)]
  parts += [f'### Train steps per norm (`{size}` presets, {rounds} rounds on '
            'the same batches)', '', train_steps.markdown(rows), '']
  parts += ['### End to end: train-step FLOP/s and decoding speed', '',
            efficiency.markdown(efficiency.run(quick=quick)), '']
  parts += ['### Folded inference', '',
            inference.report(inference.run(quick=quick)).split('\n', 2)[2],
            '']
  rows = scaling.run(quick=quick)
  path = scaling.figure(rows, figures['scaling'])
  parts += ['### Scaling with batch, length and width (LM train step)', '',
            f'![scaling]({os.path.relpath(path, os.path.dirname(README))})',
            '', scaling.markdown(rows), '']
  parts += ['### Sharding over simulated CPU devices (correctness scale)', '',
            train_steps.sharding_markdown(train_steps.sharding_check()), '']
  if jax.default_backend() == 'cpu':
    parts += ['### Accelerator (bf16, MFU)', '',
              'skipped: no GPU/TPU on this machine '
              '(`python -m benchmarks.accelerator` runs it where there is one)',
              '']
  else:
    parts += ['### Accelerator (bf16, MFU)', '',
              accelerator.markdown(accelerator.run('smoke' if quick else '')),
              '']
  parts.append(f'Benchmark wall time: {(time.time() - started) / 60:.1f} min.')
  return '\n'.join(parts)


def write_readme(text: str, path: str = README) -> None:
  with open(path) as fh:
    readme = fh.read()
  if BEGIN not in readme or END not in readme:
    raise SystemExit(f'{path}: the markers {BEGIN} and {END} are missing')
  head, rest = readme.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  with open(path, 'w') as fh:
    fh.write(f'{head}{BEGIN}\n{text}\n{END}{tail}')


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--quick', action='store_true',
                  help='smoke sizes; the README is left alone (CI)')
  ap.add_argument('--out', help='also write the report here')
  a = ap.parse_args(argv)
  tmp = os.environ.get('TMPDIR', '/tmp')
  figures = ({'scaling': os.path.join(tmp, 'normjax_scaling_quick.png'),
              'sizes': os.path.join(tmp, 'normjax_sizes_quick.png')}
             if a.quick else {'scaling': scaling.FIGURE,
                              'sizes': sizes.FIGURE})
  text = report(a.quick, figures)
  print(text)
  if a.out:
    with open(a.out, 'w') as fh:
      fh.write(text + '\n')
  if not a.quick and not os.path.exists(README):
    raise SystemExit(f'error: no README.md beside the benchmarks ({README}): '
                     'run them from a checkout, or pass --out=FILE and '
                     '--quick to keep the report elsewhere.')
  if not a.quick:
    write_readme(text)
    print(f'\nwritten into {README}')


if __name__ == '__main__':
  main()
