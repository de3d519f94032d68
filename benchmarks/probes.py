"""Overhead of the training-dynamics probes (`--config.train.probe_every`).

    python -m benchmarks.probes                       # ptb_powernorm,demo, every 10
    python -m benchmarks.probes --preset=ptb_batchnorm,small \
        --override=data.path=../shared/data/ptb --every=10
    python -m benchmarks.probes --quick               # smoke model (CI)

Builds the language-model experiment, compiles the plain and the probed train
step, then times them on the same batches in interleaved rounds (each round:
one plain step, one probed step, in alternating order), medians with
`block_until_ready`. Reports the probed step's cost relative to the plain one
and the overhead of a run that probes every N-th step:
(N - 1 + probed / plain) / N - 1.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax

from benchmarks.norms import machine_info
from experiments import dynamics
from experiments import sharding
from experiments.runtime import tune_malloc


def run(preset: str, every: int, rounds: int, overrides: dict,
        exact_gradient: bool = False) -> dict:
  """{'plain_ms', 'probed_ms', 'ratio', 'overhead', 'every', ...}."""
  from experiments import language_model  # pylint: disable=g-import-not-at-top
  config = dynamics.lm_config(preset, {
      **overrides, 'train.probe_every': every,
      'train.probe_exact_gradient': exact_gradient})
  with tempfile.TemporaryDirectory() as workdir:
    exp = language_model.Experiment(config, workdir)
    batches = iter(exp.batcher)
    state = exp.state
    times = {'plain': [], 'probed': []}
    with jax.set_mesh(exp.mesh):
      batch = sharding.global_batch(next(batches), exp.mesh)
      for step in (exp.train_step, exp.probe_step):  # compile both
        state, m = step(state, batch)
        jax.block_until_ready(m)
      for r in range(rounds):
        batch = sharding.global_batch(next(batches), exp.mesh)
        order = (('plain', exp.train_step), ('probed', exp.probe_step))
        for name, step in order[::1 if r % 2 else -1]:
          t0 = time.perf_counter()
          state, m = step(state, batch)
          jax.block_until_ready((state, m))
          times[name].append(time.perf_counter() - t0)
  plain = statistics.median(times['plain'])
  probed = statistics.median(times['probed'])
  ratio = statistics.median(p / q for p, q in zip(times['probed'],
                                                   times['plain']))
  return dict(preset=preset, every=every, rounds=rounds,
              plain_ms=1e3 * plain, probed_ms=1e3 * probed, ratio=ratio,
              overhead=(every - 1 + ratio) / every - 1,
              exact_gradient=exact_gradient)


def report(r: dict) -> str:
  extra = ' (with the exact-gradient cosine)' if r['exact_gradient'] else ''
  return (f"{r['preset']}: plain step {r['plain_ms']:.1f} ms, probed step "
          f"{r['probed_ms']:.1f} ms{extra} (paired median ratio "
          f"{r['ratio']:.3f}, {r['rounds']} rounds); probing every "
          f"{r['every']} steps costs {100 * r['overhead']:.1f}% of step time")


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--preset', default='ptb_powernorm,demo')
  ap.add_argument('--every', type=int, default=10)
  ap.add_argument('--rounds', type=int, default=20)
  ap.add_argument('--exact_gradient', action='store_true')
  ap.add_argument('--override', action='append', default=[],
                  help='dotted config override KEY=VALUE (repeatable)')
  ap.add_argument('--quick', action='store_true',
                  help='the smoke model, 3 rounds: a smoke test for CI')
  args = ap.parse_args(argv)
  malloc = tune_malloc()
  base, overrides = dynamics.lm_config(args.preset), {}
  for item in args.override:
    key, sep, value = item.partition('=')
    if not sep:
      ap.error(f'--override={item!r}: write KEY=VALUE, e.g. '
               'data.path=../shared/data/ptb')
    node = base
    for part in key.split('.'):
      if part not in node:
        ap.error(f'--override={item!r}: the config has no {key!r}')
      node = node[part]
    overrides[key] = value if isinstance(node, str) else type(node)(value)
  preset, rounds = args.preset, args.rounds
  if args.quick:
    preset, rounds = 'ptb_powernorm,smoke', 3
  print(machine_info(malloc))
  print(report(run(preset, args.every, rounds, overrides,
                   args.exact_gradient)))


if __name__ == '__main__':
  main()
