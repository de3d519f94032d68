"""LayerNorm removal by fine-tuning (Baroni et al. 2025, "Transformers Don't
Need LayerNorm at Inference Time"; zoo spec §9), for the experiments'
pre-norm LanguageModel.

    python -m experiments.ln_removal --workdir=runs/lm_ptb_layernorm_demo \\
        --config=ptb_layernorm,demo --config.model.placement=pre \\
        --out=/tmp/ln_free

Takes a trained all-LayerNorm checkpoint of <workdir> and fine-tunes it
while switching its LayerNorms, one at a time, to FakeLN
(scale (x - mean x) / sigma + bias with sigma a fixed number), on the
schedule of submarat/removing-layer-norm (`config.py`, `gpt2_standard`;
`config.ln_removal`, counted in optimizer steps s = updates done, a removal
at s acting from update s + 1 on, as its `on_step_begin` callback):

    FFN norm (ln_2) of layer i        at start + i gap_ffn
    attention norm, Q/K path (ln_1qk) at start + L gap_ffn + i gap_qk
    attention norm, V path (ln_1v)    at start + L (gap_ffn + gap_qk) + i gap_v
    final norm (ln_f)                 at start + L (gap_ffn + gap_qk + gap_v)

(published: start 20, gaps 2 / 2 / 3, 300 steps for GPT-2 small's 12
layers). The attention norm is one module whose output feeds the query and
key projections (ln_1qk) and the value projection (ln_1v); while only its
Q/K path is fake, the value projection still reads the real LayerNorm, as
in the released code (one `FakeLayerNorm`, `mode` and `attn_v_mode`, one
scale and bias). sigma per norm: the mean over real tokens of
sqrt(var(x) + eps) on `calibration_batches` training batches of the trained
model (`normjax.folding.calibrate_layernorm`; the paper's std_dict), kept
for good (the released code's default, no re-estimation). Not done: the
BOS/EOT special sigmas and the auxiliary loss (optional in the paper; the
LM stream has no BOS). The switches are traced inputs of one compiled step
(`jnp.where` between the real and the fake output), so nothing recompiles
at a removal.

After the last fine-tuning step every norm is FakeLN, an affine map, which
`normjax.folding.freeze_layernorm` folds into the readers (experiments.fold:
W' = P diag(scale) W / sigma, b' = b + bias W): an LN-free model (every
site 'none', output layer untied) whose logits equal the fine-tuned FakeLN
model's to rounding (the maximum deviation is reported). Valid perplexity
is measured before removal, right after each removal event, after the
fine-tuning and after folding; <out>/ln_removal.json holds them and the
events, <out>/checkpoints/<step> and <out>/model_config.json the LN-free
model (`experiments.fold.load` reads it).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from experiments import checkpointing
from experiments import cli
from experiments import configs
from experiments import fold
from experiments import language_model
from experiments import models
from experiments import sharding
from experiments import train_lib
from experiments.configs import validate
from experiments.data import lm as lm_data
from normjax import folding
from normjax._src import folding as fold_lib

Path = tuple[str, ...]
RESULTS = 'ln_removal.json'
# Event kinds in the published order.
KINDS = ('ffn', 'attention_qk', 'attention_v', 'final')


class Event(NamedTuple):
  """One removal: at optimizer step `step`, `kind` of `layer` (None: the
  final norm), the norm module at `path`."""
  step: int
  kind: str
  layer: int | None
  path: Path

  @property
  def name(self) -> str:
    return 'final' if self.layer is None else f'layer_{self.layer}/{self.kind}'


def norm_path(kind: str, layer: int | None) -> Path:
  if kind == 'final':
    return ('decoder', 'final_norm')
  norm = 'ffn_norm' if kind == 'ffn' else 'attention_norm'
  return ('decoder', f'layer_{layer}', norm)


def removal_schedule(cfg: Any, num_layers: int) -> list[Event]:
  """Every removal event, in order (`cfg`: config.ln_removal)."""
  events, step = [], cfg.start
  for kind, gap in (('ffn', cfg.gap_ffn), ('attention_qk', cfg.gap_qk),
                    ('attention_v', cfg.gap_v)):
    for i in range(num_layers):
      events.append(Event(step + i * gap, kind, i, norm_path(kind, i)))
    step += num_layers * gap
  events.append(Event(step, 'final', None, norm_path('final', None)))
  return events


# ---------------------------------------------------------------------------
# The switchable model: real LayerNorm or FakeLN per norm and path.


def initial_switches(sigmas: Mapping[Path, float], num_layers: int
                     ) -> dict[str, dict[str, Any]]:
  """{'sigma': {name: f32}, 'fake': {name: bool}, 'fake_v': {attention
  norm name: bool}}, names '/'-joined paths; everything real."""
  names = ['/'.join(p) for p in sigmas]
  attention = ['/'.join(norm_path('attention_qk', i))
               for i in range(num_layers)]
  return {'sigma': {n: np.float32(sigmas[tuple(n.split('/'))])
                    for n in names},
          'fake': {n: np.bool_(False) for n in names},
          'fake_v': {n: np.bool_(False) for n in attention}}


def apply_event(switches: dict, event: Event) -> None:
  name = '/'.join(event.path)
  if event.kind == 'attention_v':
    if switches['fake_v'][name]:
      raise ValueError(f'{event.name} removed twice')
    switches['fake_v'][name] = np.bool_(True)
  else:
    if switches['fake'][name]:
      raise ValueError(f'{event.name} removed twice')
    switches['fake'][name] = np.bool_(True)


def all_fake(switches: dict) -> dict:
  return {'sigma': switches['sigma'],
          'fake': {k: np.bool_(True) for k in switches['fake']},
          'fake_v': {k: np.bool_(True) for k in switches['fake_v']}}


def switch_interceptor(switches: Mapping[str, Any]):
  """For `nn.intercept_methods`: every LayerNorm in switches['sigma']
  outputs FakeLN (`normjax.folding.frozen_layernorm_interceptor` with its
  sigma) where switches['fake'] is True, else the real LayerNorm; an
  attention norm's value projection reads FakeLN where
  switches['fake_v'] is True. Values may be traced."""
  stash: dict[Path, Any] = {}

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    path = tuple(context.module.path)
    name = '/'.join(path)
    if name in switches['sigma']:
      real = next_fun(*args, **kwargs)
      fake = folding.frozen_layernorm_interceptor(
          {path: switches['sigma'][name]})(next_fun, args, kwargs, context)
      if name in switches['fake_v']:
        stash[path[:-1] + ('self_attention', 'value')] = jnp.where(
            switches['fake_v'][name], fake, real)
      return jnp.where(switches['fake'][name], fake, real)
    if path in stash:
      return next_fun(stash.pop(path), *args[1:], **kwargs)
    return next_fun(*args, **kwargs)

  return interceptor


# ---------------------------------------------------------------------------
# The run.


def finetune_config(config: ml_collections.ConfigDict
                    ) -> ml_collections.ConfigDict:
  """The run's config with the fine-tuning's optimizer and schedule."""
  c = config.copy_and_resolve_references()
  c.unlock()
  r = c.ln_removal
  c.optim.weight_decay = r.weight_decay
  c.optim.clip_norm = r.clip_norm
  c.schedule = ml_collections.ConfigDict(dict(
      kind='cosine', peak_lr=r.peak_lr, warmup_steps=r.warmup_steps,
      min_lr=r.min_lr, decay_steps=r.num_steps, warmup_init_lr=0.0))
  c.train.num_steps = r.num_steps
  c.lock()
  return c


def _check_model(model_config: models.TransformerConfig) -> None:
  fold.check_foldable(model_config)
  kinds = {s: model_config.norms[s]['kind'] for s in
           fold.used_sites(model_config, False)}
  if set(kinds.values()) != {'layernorm'}:
    raise ValueError(f'ln_removal needs LayerNorm at every norm site; this '
                     f"model's norms are {kinds}.")


class _Steps:
  """The jitted fine-tuning and evaluation steps with switch inputs."""

  def __init__(self, exp: language_model.Experiment, label_smoothing: float):
    model, eval_model = exp.model, exp.eval_model

    def logits_fn(variables, batch, rngs, mutable):
      with nn.intercept_methods(switch_interceptor(batch['ln_removal'])):
        return model.apply(variables, batch['inputs'], train=True, rngs=rngs,
                           mutable=mutable)

    def eval_logits(variables, batch):
      with nn.intercept_methods(switch_interceptor(batch['ln_removal'])):
        return eval_model.apply(variables, batch['inputs'], train=False)

    train_step = train_lib.make_train_step(logits_fn, exp.tx, exp.schedule,
                                           label_smoothing)
    eval_step = train_lib.make_eval_step(eval_logits, label_smoothing)
    bs, repl = sharding.batch_sharding(exp.mesh), sharding.replicated(exp.mesh)
    batch_shardings = {'inputs': bs, 'targets': bs, 'weights': bs,
                       'ln_removal': repl}
    self.train = jax.jit(
        train_step, in_shardings=(exp.state_shardings, batch_shardings),
        out_shardings=(exp.state_shardings, repl), donate_argnums=0)
    self._eval = jax.jit(eval_step, in_shardings=(exp.state_shardings,
                                                  batch_shardings),
                         out_shardings=repl)
    self._logits = jax.jit(
        lambda v, x, w: eval_logits(v, {'inputs': x, 'ln_removal': w}),
        in_shardings=({'params': exp.state_shardings.params}, bs, repl),
        out_shardings=bs)
    self.exp = exp

  def perplexity(self, state, switches) -> float:
    cfg = self.exp.config.data
    batches = lm_data.eval_batches(
        self.exp.data.valid, batch_size=cfg.eval_batch_size,
        seq_len=cfg.eval_seq_len, batch_multiple=self.exp.dp)
    return train_lib.evaluate_loss(
        lambda s, b: self._eval(s, {**b, 'ln_removal': switches}), state,
        batches,
        self.exp.mesh)['ppl']

  def logits(self, variables, inputs, switches):
    with jax.set_mesh(self.exp.mesh):
      return np.asarray(self._logits(variables, inputs, switches))


def _folded_perplexity(exp, config: models.TransformerConfig, variables,
                       label_smoothing: float) -> float:
  model = models.LanguageModel(config)
  step = jax.jit(train_lib.make_eval_step(
      lambda v, b: model.apply({'params': v['params']}, b['inputs'],
                               train=False), label_smoothing))
  state = train_lib.TrainState(step=jnp.zeros((), jnp.int32),
                               params=variables['params'], opt_state=(),
                               batch_stats={}, grad_stats={},
                               rng=jnp.zeros((2,), jnp.uint32))
  cfg = exp.config.data
  batches = lm_data.eval_batches(exp.data.valid,
                                 batch_size=cfg.eval_batch_size,
                                 seq_len=cfg.eval_seq_len,
                                 batch_multiple=exp.dp)
  return train_lib.evaluate_loss(step, state, batches, exp.mesh)['ppl']


def run(workdir: str, run_config: Any, out: str, step: int | None = None,
        verbose: bool = True) -> dict[str, Any]:
  """Removes every LayerNorm of <workdir>'s checkpoint by fine-tuning on the
  schedule of `run_config.ln_removal`, folds, checks and saves to `out`;
  returns the results (also <out>/ln_removal.json)."""
  t0 = time.time()
  if isinstance(run_config, str):
    run_config = configs.from_spec(run_config)
  run_config = validate.checked(run_config)
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise FileNotFoundError(f'--workdir={workdir}: no checkpoints/ '
                            'directory; train the language model first.')
  config = finetune_config(run_config)
  r = config.ln_removal
  say = print if verbose else (lambda *a, **k: None)

  exp = language_model.Experiment(config, workdir)
  model_config = models.TransformerConfig.from_config(
      config.model, exp.data.vocab.size, deterministic=True)
  _check_model(model_config)
  saved, meta, step = checkpointing.read(
      os.path.join(workdir, 'checkpoints'), step,
      expect={'vocab_fingerprint': exp.data.fingerprint})
  variables = fold_lib.finish(fold_lib.plain(
      {k: saved[k] for k in ('params', 'batch_stats', 'grad_stats')
       if k in saved}))
  fold.check_variables(model_config, variables)
  params = jax.device_put(variables['params'], exp.state_shardings.params)
  state = exp.state.replace(params=params)

  # sigma: calibrated on training batches of the trained model.
  calibration = iter(exp.make_batcher())
  sigmas = fold.calibrate_layernorm(
      model_config, variables,
      [next(calibration)['inputs'] for _ in range(r.calibration_batches)])
  layers = model_config.num_decoder_layers
  events = removal_schedule(r, layers)
  sigmas = {e.path: sigmas[e.path] for e in events}
  switches = initial_switches(sigmas, layers)
  steps = _Steps(exp, config.optim.label_smoothing)

  ppl_before = steps.perplexity(state, switches)
  say(f'ln_removal: step {step} of {workdir}, valid ppl {ppl_before:.4g}; '
      f'{len(events)} removals over {r.num_steps} fine-tuning steps')
  during, by_step = [], {}
  for e in events:
    by_step.setdefault(e.step, []).append(e)
  batches = iter(exp.batcher)
  losses = []
  with jax.set_mesh(exp.mesh):
    for s in range(r.num_steps):
      if s in by_step:
        for e in by_step[s]:
          apply_event(switches, e)
        ppl = steps.perplexity(state, switches)
        during.append(dict(step=s, removed=[e.name for e in by_step[s]],
                           ppl=ppl))
        say(f'  step {s}: removed {", ".join(e.name for e in by_step[s])}'
            f'; valid ppl {ppl:.4g}')
      host = next(batches)
      batch = sharding.global_batch(
          {k: host[k] for k in ('inputs', 'targets', 'weights')}, exp.mesh)
      batch['ln_removal'] = switches
      state, metrics = steps.train(state, batch)
      if not bool(metrics['finite']):
        raise ValueError(f'ln_removal: fine-tuning step {s + 1} is not '
                         f'finite (loss {float(metrics["loss"])}); lower '
                         '--config.ln_removal.peak_lr.')
      losses.append(float(metrics['loss']))
      if (s + 1) % r.log_every == 0:
        say(f'  step {s + 1}: train loss {np.mean(losses[-r.log_every:]):.4f}')
  final = all_fake(switches)
  if final != switches:
    raise AssertionError('a norm was never removed')
  ppl_after = steps.perplexity(state, switches)

  # Fold every FakeLN into its readers.
  tuned = {'params': jax.tree.map(np.asarray, state.params)}
  new_config, new_variables = fold.freeze_layernorm(
      model_config, tuned, (), scales=sigmas)
  fold.check_variables(new_config, new_variables)
  check = [next(iter(lm_data.eval_batches(
      exp.data.valid, batch_size=config.data.eval_batch_size,
      seq_len=config.data.eval_seq_len, batch_multiple=exp.dp)))['inputs']]
  deviation, scale = 0.0, 0.0
  folded_model = models.LanguageModel(new_config)
  for inputs in check:
    a = steps.logits({'params': state.params}, inputs, switches)
    b = np.asarray(folded_model.apply(new_variables, inputs, train=False))
    deviation = max(deviation, float(np.max(np.abs(a - b))))
    scale = max(scale, float(np.max(np.abs(a))))
  ppl_folded = _folded_perplexity(exp, new_config, new_variables,
                                  config.optim.label_smoothing)
  path = fold.save(out, step, new_config, new_variables, dict(
      source_workdir=os.path.abspath(workdir), source_step=step,
      transform='ln_removal', model='language_model',
      vocab_fingerprint=meta.get('vocab_fingerprint')))
  result = dict(
      source_step=step, checkpoint=path, num_steps=r.num_steps,
      schedule={k: r[k] for k in ('start', 'gap_ffn', 'gap_qk', 'gap_v')},
      events=[dict(step=e.step, kind=e.kind, layer=e.layer,
                   path='/'.join(e.path)) for e in events],
      sigma={'/'.join(p): float(v) for p, v in sigmas.items()},
      ppl=dict(before=ppl_before, after_finetune=ppl_after,
               after_fold=ppl_folded),
      during=during, final_train_loss=float(np.mean(losses[-10:])),
      fold_max_abs_logit_deviation=deviation, fold_max_abs_logit=scale,
      norms={s: new_config.norms[s]['kind']
             for s in fold.used_sites(new_config, False)},
      wall_s=time.time() - t0)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, RESULTS), 'w') as f:
    json.dump(result, f, indent=2)
  say(table(result))
  return result


def table(result: Mapping[str, Any]) -> str:
  """The perplexities as a text table."""
  rows = [('before removal (LayerNorm)', '-', result['ppl']['before'])]
  rows += [(f'removed {", ".join(d["removed"])}', str(d['step']), d['ppl'])
           for d in result['during']]
  rows += [('after fine-tuning (all FakeLN)', str(result['num_steps']),
            result['ppl']['after_finetune']),
           ('after folding (LN-free)', str(result['num_steps']),
            result['ppl']['after_fold'])]
  width = max(len(r[0]) for r in rows)
  lines = [f'{"stage":{width}s}  {"step":>5s}  valid ppl']
  lines += [f'{a:{width}s}  {b:>5s}  {c:.4f}' for a, b, c in rows]
  lines.append(f'folded vs FakeLN logits: max |diff| '
               f'{result["fold_max_abs_logit_deviation"]:.2e} (max |logit| '
               f'{result["fold_max_abs_logit"]:.3g}); '
               f'{result["wall_s"]:.0f} s')
  return '\n'.join(lines)


# ---------------------------------------------------------------------------
# CLI.

# experiments.fold (imported above) defines --config, --out and --step at
# import; this tool reads the same flags.
def _flag(name: str, define) -> flags.FlagHolder:
  if name in flags.FLAGS:
    return flags.FlagHolder(flags.FLAGS, flags.FLAGS[name])
  return define()


_WORKDIR = cli.workdir_flag('The trained language model run directory.')
_CONFIG = _flag('config', lambda: configs.define_config_flag(
    'lm', default='ptb_layernorm'))
_OUT = _flag('out', lambda: flags.DEFINE_string('out', None,
                                                'Output directory.'))
_STEP = _flag('step', lambda: flags.DEFINE_integer(
    'step', None, 'Checkpoint step (default: the latest).'))


def main() -> None:
  for name, holder in (('workdir', _WORKDIR), ('config', _CONFIG),
                       ('out', _OUT)):
    if holder.value is None:
      raise ValueError(f'--{name} is required (python -m '
                       'experiments.ln_removal --workdir=RUN '
                       '--config=ptb_layernorm,demo '
                       '--config.model.placement=pre --out=OUT).')
  run(_WORKDIR.value, _CONFIG.value, _OUT.value, _STEP.value)


if __name__ == '__main__':
  cli.run(main, 'lm')
