"""End-to-end efficiency: train-step FLOP/s against a same-run matmul peak,
where a step's time goes, and beam-search decoding speed.

    python -m benchmarks.efficiency            # demo presets (~3-4 min, 2 cores)
    python -m benchmarks.efficiency --quick    # smoke presets (CI)

1. Peak: the best FLOP/s of a jitted float32 n x n matmul (n 1024 and 2048,
   best of several calls), measured in this run.
2. Train steps of the translation demo model (`wmt` presets with `demo`, the
   README quick start's model) and the LM demo model (`ptb_*,demo`), each
   with LayerNorm and PowerNorm: the jitted `train_step` of the experiment
   on the same fixed batches, every batch shape compiled first, then rounds
   with the norms in shuffled order (median). Model FLOPs per step two ways:
   `experiments.sweeps.cost.flops_per_step` (6 x weights x tokens + 12 x
   layers x context x attention width per token: the usual approximation,
   norms, softmax and optimizer left out; its tokens are the step's
   capacity, `max_tokens` or batch x length, and translation's attention
   context an assumed 32) with the vocabulary the run really has; and XLA's
   own count of the compiled step (`cost_analysis()['flops']`: every
   matmul, attention included, plus elementwise work, for the real batch
   shape). MFU = cost.py FLOPs / step time / peak.
3. Where a step's time goes (one batch, medians of interleaved calls): the
   forward loss alone, forward + backward, forward + backward without
   dropout (its random bits are threefry on the CPU), and the optimizer
   update alone; the rest of the step is the gradient scaling, the
   finiteness check and the state select.
4. Decoding: `experiments.decode.translate` on the validation split in the
   experiment's batches (`decode.batch_tokens`), beam 4 and beam 1, with the
   parameters of the timed LayerNorm run (a few steps from the random
   initialisation, so most hypotheses run to the length limit), compile
   excluded; sentences/s and generated tokens/s (up to EOS). Both with the
   candidate selection of before (`flat_top_k=True`: one top-k over K x V,
   which XLA:CPU turns into a full sort inside the decoding loop) and
   after (a top-k per beam), interleaved in the same run, and checked equal.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

NORMS = ('layernorm', 'powernorm')
TASKS = ('translation', 'lm')


def matmul_peak(sizes=(1024, 2048), reps: int = 5) -> dict:
  """Best FLOP/s of a jitted float32 matmul over `sizes`, and its n."""
  best, best_n = 0.0, 0
  for n in sizes:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)),
                    jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, a))
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready(f(a, a))
      rate = 2 * n**3 / (time.perf_counter() - t0)
      if rate > best:
        best, best_n = rate, n
  return dict(flops=best, n=best_n)


def _cost_flops(task: str, norm: str, size: str, exp) -> float:
  """cost.py's FLOPs of one step, with the run's real vocabulary size."""
  from experiments.sweeps import cost  # pylint: disable=g-import-not-at-top
  config = exp.config.copy_and_resolve_references()
  config.unlock()
  config.data.vocab_size = exp.data.vocab.size
  name, preset = (('wmt', f'{norm},{size}') if task == 'translation'
                  else ('lm', f'ptb_{norm},{size}'))
  return cost.flops_per_step(name, preset, config)[0]


def _xla_flops(exp, state, batch) -> float:
  """XLA's FLOP count of the compiled train step for this batch's shape
  (the step is compiled already: this lowers and hits the cache)."""
  with jax.set_mesh(exp.mesh):
    compiled = exp.train_step.lower(state, batch).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis['flops'])


def train(task: str, size: str, rounds: int, peak: float, tmp: str,
          norms: tuple[str, ...] = NORMS) -> tuple[list[dict], dict]:
  """Rows per norm; and (experiments, states, fixed batches) for later."""
  from benchmarks.train_steps import _experiment, _tokens  # pylint: disable=g-import-not-at-top
  from experiments import sharding  # pylint: disable=g-import-not-at-top
  exps = {n: _experiment(task, n, size, os.path.join(tmp, f'{task}_{n}'))
          for n in norms}
  host = [b for b, _ in zip(iter(exps[norms[0]].batcher), range(rounds))]
  mesh = exps[norms[0]].mesh
  with jax.set_mesh(mesh):
    fixed = [sharding.global_batch(b, mesh) for b in host]
  states = {n: e.state for n, e in exps.items()}

  def step(name, batch):
    with jax.set_mesh(mesh):
      t0 = time.perf_counter()
      states[name], metrics = exps[name].train_step(states[name], batch)
      jax.block_until_ready((states[name], metrics))
      return time.perf_counter() - t0

  compile_s = {}
  for name in norms:  # compiles every batch shape
    t0 = time.perf_counter()
    for batch in fixed:
      step(name, batch)
    compile_s[name] = time.perf_counter() - t0
  times = {n: [] for n in norms}
  order, rng = list(norms), random.Random(0)
  for batch in fixed:
    rng.shuffle(order)
    for name in order:
      times[name].append(step(name, batch))
  rows = []
  for name in norms:
    shapes = {}
    for batch in fixed:
      key = batch['targets'].shape
      if key not in shapes:
        shapes[key] = _xla_flops(exps[name], states[name], batch)
    xla = [shapes[b['targets'].shape] for b in fixed]
    model = _cost_flops(task, name, size, exps[name])
    t = times[name]
    rows.append(dict(
        task=task, size=size, norm=name, rounds=rounds,
        shapes=len(shapes), warm_pass_s=compile_s[name],
        step_ms=1e3 * statistics.median(t),
        tokens_per_s=statistics.median(
            _tokens(h) / s for h, s in zip(host, t)),
        cost_gflop=model / 1e9,
        xla_gflop=statistics.median(xla) / 1e9,
        cost_flops_per_s=statistics.median(model / s for s in t),
        xla_flops_per_s=statistics.median(f / s for f, s in zip(xla, t)),
        mfu=statistics.median(model / s for s in t) / peak,
        xla_fraction=statistics.median(f / s for f, s in zip(xla, t)) / peak))
  return rows, dict(exps=exps, states=states, batches=fixed)


def breakdown(task: str, run: dict, reps: int) -> list[dict]:
  """Forward, forward + backward (with and without dropout), optimizer and
  the whole step, on the first batch; ms medians of interleaved calls."""
  from benchmarks.timing import timed_rounds  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from experiments import train_lib  # pylint: disable=g-import-not-at-top
  batch = run['batches'][0]
  fns = {}
  for name, exp in run['exps'].items():
    state = run['states'][name]
    smoothing = exp.config.optim.label_smoothing
    bare = exp._make_model(deterministic=True)  # pylint: disable=protected-access

    def loss(params, grad_stats, state, batch, model,
             inputs=exp.model_inputs, smoothing=smoothing):
      variables = {'params': params, 'batch_stats': state.batch_stats,
                   'grad_stats': grad_stats}
      logits, _ = model.apply(
          variables, *[batch[k] for k in inputs], train=True,
          rngs={'dropout': jax.random.fold_in(state.rng, state.step)},
          mutable=['batch_stats'])
      return train_lib.label_smoothed_loss(
          logits, batch['targets'], batch['weights'], smoothing)[0]

    def fwd(state, batch, model=exp.model, loss=loss):
      return loss(state.params, state.grad_stats, state, batch, model)

    def fwd_bwd(state, batch, model=exp.model, loss=loss):
      return jax.grad(loss, (0, 1))(state.params, state.grad_stats, state,
                                    batch, model)

    def optimizer(state, tx=exp.tx):
      updates, opt_state = tx.update(state.params, state.opt_state,
                                     state.params)
      return optax.apply_updates(state.params, updates), opt_state

    def whole(state, batch, exp=exp):  # the step donates: a copy each call
      return exp.train_step(jax.tree.map(jnp.copy, state), batch)

    copy = jax.jit(lambda s: jax.tree.map(jnp.copy, s))
    with jax.set_mesh(exp.mesh):
      fns[(name, 'forward')] = (jax.jit(fwd), (state, batch))
      fns[(name, 'forward + backward')] = (jax.jit(fwd_bwd), (state, batch))
      fns[(name, 'forward + backward, no dropout')] = (
          jax.jit(lambda s, b, f=fwd_bwd, m=bare: f(s, b, model=m)),
          (state, batch))
      fns[(name, 'optimizer update')] = (jax.jit(optimizer), (state,))
      fns[(name, 'state copy (subtracted from the step)')] = (copy, (state,))
      fns[(name, 'train step')] = (
          lambda s, b, w=whole, c=copy, e=exp: _in_mesh(e, w, c(s), b),
          (state, batch))
  times = timed_rounds(fns, warmup=1, reps=reps)
  rows = []
  for (name, piece), t in times.items():
    rows.append(dict(task=task, norm=name, piece=piece,
                     ms=statistics.median(t)))
  return rows


def _in_mesh(exp, f, *args):
  with jax.set_mesh(exp.mesh):
    return f(*args)


def decoding(run: dict, limit: int, reps: int,
             flat: tuple[bool, ...] = (True, False)) -> list[dict]:
  """Beam 4 and 1 over the first `limit` validation sentences, before and
  after the per-beam top-k; sentences/s and generated tokens/s."""
  from experiments import decode  # pylint: disable=g-import-not-at-top
  exp = run['exps']['layernorm']
  state = run['states']['layernorm']
  cfg = exp.config.decode
  examples = exp.data.valid[:limit] if limit else exp.data.valid
  batches = exp._eval_batches(examples, cfg.batch_tokens)  # pylint: disable=protected-access
  variables = state.variables()

  def translate(beam, flat):
    out = []
    for batch in batches:
      max_len = min(int(cfg.max_len_a * batch['inputs'].shape[1]
                        + cfg.max_len_b) + 1, exp.eval_model.config.max_len)
      out.append(decode.translate(
          exp.eval_model, variables, jnp.asarray(batch['inputs']),
          beam_size=beam, max_len=max_len,
          length_penalty=cfg.length_penalty, flat_top_k=flat))
    return jax.block_until_ready(out)

  cases = [(beam, f) for beam in (4, 1) for f in flat]
  outputs = {c: [np.asarray(x) for x in translate(*c)] for c in cases}
  for beam in (4, 1) if len(flat) == 2 else ():  # the fix changes nothing
    for a, b in zip(outputs[(beam, True)], outputs[(beam, False)]):
      np.testing.assert_array_equal(a, b)
  times = {c: [] for c in cases}
  order, rng = list(cases), random.Random(0)
  for _ in range(reps):
    rng.shuffle(order)
    for c in order:
      t0 = time.perf_counter()
      translate(*c)
      times[c].append(time.perf_counter() - t0)
  sentences = len(examples)
  rows = []
  for beam, flat in cases:  # pylint: disable=redefined-argument-from-local
    real = [row for out, batch in zip(outputs[(beam, flat)], batches)
            for row, index in zip(out, batch['index']) if index >= 0]
    tokens = int(sum(np.sum(r != 0) for r in real))  # EOS included
    rows_total = sum(b['inputs'].shape[0] for b in batches)
    t = statistics.median(times[(beam, flat)])
    rows.append(dict(beam=beam, path='flat top-k (before)' if flat
                     else 'per-beam top-k (after)', sentences=sentences,
                     batch_rows=rows_total, seconds=t,
                     sentences_per_s=sentences / t, tokens_per_s=tokens / t,
                     tokens=tokens))
  return rows


def run(quick: bool = False) -> dict:
  """Everything above. `quick` (CI, seconds): the translation smoke model
  with LayerNorm only, one batch, no breakdown, 8 sentences decoded with
  the per-beam top-k only."""
  size = 'smoke' if quick else 'demo'
  rounds, reps = (1, 1) if quick else (9, 7)
  peak = matmul_peak((256,) if quick else (1024, 2048),
                     reps=2 if quick else 5)
  rows, parts, runs = [], [], {}
  with tempfile.TemporaryDirectory() as tmp:
    for task in ('translation',) if quick else TASKS:
      task_rows, runs[task] = train(
          task, size, rounds, peak['flops'], tmp,
          norms=('layernorm',) if quick else NORMS)
      rows += task_rows
      if not quick:
        parts += breakdown(task, runs[task], reps)
    decoded = decoding(runs['translation'], limit=8 if quick else 0,
                       reps=reps if quick else 2,
                       flat=(False,) if quick else (True, False))
  return dict(device=jax.devices()[0].device_kind, cpus=os.cpu_count(),
              size=size, peak=peak, train=rows, breakdown=parts,
              decode=decoded)


def markdown(result: dict) -> str:
  peak = result['peak']
  lines = [f"Measured float32 matmul peak: {peak['flops'] / 1e9:.1f} GFLOP/s "
           f"(n = {peak['n']}) on {result['cpus']} CPU(s) "
           f"({result['device']}).", '',
           '| task | norm | step ms | tokens/s | cost.py GFLOP / step | '
           'XLA GFLOP / step | cost.py GFLOP/s | MFU (cost.py) | '
           'XLA GFLOP/s / peak | batch shapes (warm-up s) |',
           '|' + ' --- |' * 10]
  for r in result['train']:
    lines.append(
        f"| {r['task']} ({r['size']}) | {r['norm']} | {r['step_ms']:.1f} | "
        f"{r['tokens_per_s']:.0f} | {r['cost_gflop']:.2f} | "
        f"{r['xla_gflop']:.2f} | {r['cost_flops_per_s'] / 1e9:.1f} | "
        f"{100 * r['mfu']:.1f}% | {100 * r['xla_fraction']:.1f}% | "
        f"{r['shapes']} ({r['warm_pass_s']:.1f}) |")
  if result['breakdown']:
    lines += ['', '| task | norm | piece | ms |', '| --- | --- | --- | --- |']
  for r in result['breakdown']:
    lines.append(f"| {r['task']} | {r['norm']} | {r['piece']} | "
                 f"{r['ms']:.1f} |")
  lines += ['', '| beam | candidate selection | sentences (batch rows) | s | '
            'sentences/s | tokens/s |', '|' + ' --- |' * 6]
  for r in result['decode']:
    lines.append(f"| {r['beam']} | {r['path']} | {r['sentences']} "
                 f"({r['batch_rows']}) | {r['seconds']:.2f} | "
                 f"{r['sentences_per_s']:.1f} | {r['tokens_per_s']:.0f} |")
  return '\n'.join(lines)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--quick', action='store_true',
                  help='smoke presets, few rounds (CI)')
  a = ap.parse_args(argv)
  from experiments.runtime import tune_malloc  # pylint: disable=g-import-not-at-top
  malloc = tune_malloc()
  from benchmarks.norms import machine_info  # pylint: disable=g-import-not-at-top
  print(machine_info(malloc))
  t0 = time.time()
  result = run(a.quick)
  print(markdown(result))
  print(f'\n({time.time() - t0:.0f} s)')


if __name__ == '__main__':
  main()
