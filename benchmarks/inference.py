"""Inference speed of folded norms: tokens/s of a pre-norm causal LM on CPU.

    python -m benchmarks.inference            # d 512, 6 layers, 8 x 128 tokens
    python -m benchmarks.inference --quick    # tiny model, 3 reps (CI)

One jitted evaluation-mode forward pass (`LanguageModel.apply`, logits over
the vocabulary) per model, all of the same size, with random weights:

  layernorm                 LayerNorm at every site (the reference)
  layernorm -> rmsnorm      the same model after `fold.to_pre_rmsnorm`
                            (exact: RMSNorm without affine, recentred writers)
  unified (eval)            Unified Normalization, unfolded: a per-channel
                            affine from its running statistics
  unified -> folded         after `fold.fold_affine`: no norm at all ('none')
  powernorm -> folded       after `fold.fold_affine`: GroupScaling only

After warm-up (the first call compiles), each round calls every model once
in a shuffled order, so drift hits all alike; times are medians with
`block_until_ready`, tokens/s = batch * length / median, and each ratio to
LayerNorm is the median over rounds of the two times of the same round.
The converted/folded models are checked against their originals first.
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.norms import machine_info
from experiments import fold
from experiments import models
from experiments.runtime import tune_malloc

REFERENCE = 'layernorm'
HEADLINE = 'unified -> folded'

# --quick compiles without LLVM optimisation: its numbers mean nothing.
_FAST = {'xla_backend_optimization_level': 0,
         'xla_cpu_use_fusion_emitters': False}


def _config(norm: dict, size: dict) -> models.TransformerConfig:
  return models.TransformerConfig(
      vocab_size=size['vocab'], d_model=size['d_model'],
      num_heads=size['heads'], ffn_dim=size['ffn'],
      num_decoder_layers=size['layers'], max_len=size['length'],
      placement='pre', share_embeddings=True, deterministic=True,
      norms={s: norm for s in models.SITES})


def _variables(cfg: models.TransformerConfig, tokens, seed: int) -> dict:
  """Random params (N(0, 1/fan_in) kernels; norms' scale 1, biases 0) and
  the norms' fresh state, from shapes only (nothing to compile)."""
  model = models.LanguageModel(cfg)
  shapes = nn.unbox(jax.eval_shape(functools.partial(
      model.init, train=False), jax.random.key(0), tokens))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return np.ones(leaf.shape, np.float32)
    if name.endswith("['bias']"):
      return np.zeros(leaf.shape, np.float32)
    fan_in = leaf.shape[-1] if 'embedding' in name else np.prod(
        leaf.shape[:2] if "['out']" in name else leaf.shape[:1])
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(
        np.float32)
  variables = {'params': jax.tree_util.tree_map_with_path(
      draw, shapes['params'])}
  for collection in set(shapes) - {'params'}:  # the norms' fresh state
    variables[collection] = jax.tree_util.tree_map_with_path(
        lambda path, leaf: (np.ones if path[-1].key in _ONES else np.zeros)(
            leaf.shape, leaf.dtype), shapes[collection])
  return variables


# State fields initialised to ones (BatchNorm var, PowerNorm / PN-V phi, UN
# R); every other field (means, windows, gradient statistics, steps) is 0.
_ONES = ('var', 'running_phi', 'running_var')


def _calibrate(cfg, variables, tokens, steps: int = 30) -> dict:
  """Train-mode passes move the running statistics to the data's, so the
  evaluation-mode model normalises like a trained one. (With the fresh
  state UN's eval map is the identity: the random 6-layer stream then grows
  until float32 rounding is amplified to 1e-3 of the logits.)"""
  model = models.LanguageModel(cfg)
  update = jax.jit(lambda v: model.apply(v, tokens, train=True,
                                         mutable=['batch_stats'])[1])
  for _ in range(steps):
    variables = {**variables, **update(variables)}
  return variables


PAIRS = (('layernorm -> rmsnorm', REFERENCE), (HEADLINE, 'unified (eval)'))


def models_to_time(size: dict, tokens) -> dict[str, tuple]:
  """{name: (config, variables)} of the models, all of one size."""
  ln = _config(dict(kind='layernorm', epsilon=1e-5), size)
  un = _config(dict(kind='unified', epsilon=1e-5), size)
  pn = _config(dict(kind='powernorm', epsilon=1e-5,
                    num_groups=size['heads']), size)
  ln_vars, un_vars, pn_vars = (_variables(c, tokens, s) for s, c in
                               enumerate((ln, un, pn)))
  un_vars, pn_vars = (_calibrate(c, v, tokens) for c, v in ((un, un_vars),
                                                            (pn, pn_vars)))
  return {REFERENCE: (ln, ln_vars),
          'layernorm -> rmsnorm': fold.to_pre_rmsnorm(ln, ln_vars),
          'unified (eval)': (un, un_vars),
          HEADLINE: fold.fold_affine(un, un_vars),
          'powernorm -> folded': fold.fold_affine(pn, pn_vars)}


def _forward(cfg, variables, quick=False):
  model = models.LanguageModel(cfg)
  apply = jax.jit(functools.partial(model.apply, train=False),
                  compiler_options=_FAST if quick else None)
  return functools.partial(apply, variables)


def run(quick: bool = False, batch: int = 8, length: int = 128,
        d_model: int = 512, layers: int = 6, reps: int = 20,
        warmup: int = 3) -> dict:
  """Times every model: {'rows': [per model], 'headline': folded UN / LN
  tokens/s, 'size', 'batch', 'reps'}."""
  size = dict(vocab=8000, d_model=d_model, heads=8, ffn=4 * d_model,
              layers=layers, length=length)
  if quick:
    batch, reps, warmup = 4, 3, 1
    size = dict(vocab=256, d_model=64, heads=2, ffn=128, layers=2, length=32)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, size['vocab'], (batch, size['length'])),
                       jnp.int32)
  built = models_to_time(size, tokens)
  fns = {name: _forward(cfg, v, quick) for name, (cfg, v) in built.items()}
  kinds = {name: cfg.norms['decoder_ffn']['kind']
           for name, (cfg, _) in built.items()}
  for f in fns.values():
    for _ in range(max(warmup, 1)):  # the first call compiles
      jax.block_until_ready(f(tokens))
  for folded, original in PAIRS:  # the transforms are exact
    want = fns[original](tokens)
    err = float(jnp.max(jnp.abs(fns[folded](tokens) - want)) /
                jnp.maximum(1.0, jnp.max(jnp.abs(want))))
    if not err < 1e-5:  # relative: unnormalised UN streams grow with depth
      raise RuntimeError(f'{folded}: logits differ from {original} by {err} '
                         '(relative to the largest logit)')
  times = {k: [] for k in fns}
  order, shuffle = list(fns), random.Random(0)
  for _ in range(reps):
    shuffle.shuffle(order)
    for k in order:
      t0 = time.perf_counter()
      jax.block_until_ready(fns[k](tokens))
      times[k].append(time.perf_counter() - t0)
  ntok = batch * size['length']
  rows = []
  for k, v in times.items():
    ratio = statistics.median(r / t for r, t in zip(times[REFERENCE], v))
    rows.append(dict(model=k, ms=1e3 * statistics.median(v),
                     tokens_per_s=ntok / statistics.median(v),
                     speedup_vs_layernorm=ratio, kind=kinds.get(k)))
  return dict(rows=rows, size=size, batch=batch, reps=reps,
              headline=next(r['speedup_vs_layernorm'] for r in rows
                            if r['model'] == HEADLINE))


def report(result: dict, malloc: str = '?') -> str:
  s = result['size']
  lines = [machine_info(malloc),
           f"LanguageModel: d_model {s['d_model']}, {s['layers']} layers, "
           f"{s['heads']} heads, ffn {s['ffn']}, vocab {s['vocab']}; "
           f"{result['batch']} x {s['length']} tokens, float32, medians of "
           f"{result['reps']} interleaved rounds", '',
           '| model | norm kind | ms / forward | tokens/s | tokens/s vs '
           'layernorm |', '| --- | --- | --- | --- | --- |']
  for r in result['rows']:
    lines.append(f"| {r['model']} | {r['kind']} | {r['ms']:.2f} | "
                 f"{r['tokens_per_s']:.0f} | "
                 f"{r['speedup_vs_layernorm']:.3f}x |")
  lines += ['', f"folded UN ('none') vs LayerNorm: "
            f"{result['headline']:.3f}x tokens/s (paired median)"]
  return '\n'.join(lines)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--quick', action='store_true',
                  help='tiny model, 3 rounds: a smoke test for CI')
  ap.add_argument('--batch', type=int, default=8)
  ap.add_argument('--length', type=int, default=128)
  ap.add_argument('--d_model', type=int, default=512)
  ap.add_argument('--layers', type=int, default=6)
  ap.add_argument('--reps', type=int, default=20)
  ap.add_argument('--warmup', type=int, default=3)
  ap.add_argument('--no-malloc-tuning', action='store_true')
  a = ap.parse_args(argv)
  malloc = tune_malloc(a.no_malloc_tuning)
  if not a.quick and a.reps < 10:
    ap.error('--reps must be >= 10 (use --quick for a smoke run)')
  result = run(a.quick, a.batch, a.length, a.d_model, a.layers, a.reps,
               a.warmup)
  print(report(result, malloc))


if __name__ == '__main__':
  main()
