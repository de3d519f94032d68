"""What every experiment shares: state, optimizer, loss, the step, the run's
skeleton (`Experiment`, which a task fills with its data, model and
batcher), and the training loop (`fit`) with logging, validation and
checkpoints.

The train step follows fairseq, whose semantics the PowerNorm results were
obtained with: the loss is *summed* over target tokens and differentiated,
then the parameter gradients are divided by the token count. PowerNorm's and
UN's backward-pass statistics therefore see the gradient of the summed loss,
as in the official code; they are folded into the state with
`normjax.apply_backward_stats` and never reach the optimizer.
"""

from __future__ import annotations

import abc
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

import normjax
from experiments import checkpointing
from experiments import curves
from experiments import faults
from experiments import probing
from experiments import sharding
from experiments.models import TransformerConfig

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  step: Array         # int32 optimizer updates so far
  params: Any
  opt_state: Any
  batch_stats: Any    # the norms' forward running statistics
  grad_stats: Any     # the norms' backward-pass statistics (never optimized)
  rng: Array          # uint32[2] base key; dropout uses fold_in(rng, step)

  def variables(self) -> dict[str, Any]:
    """The model's variable collections, for `model.apply`."""
    return {'params': self.params, 'batch_stats': self.batch_stats,
            'grad_stats': self.grad_stats}


def make_schedule(cfg: Any) -> optax.Schedule:
  """The learning rate by update count, `cfg.kind`:

  'inverse_sqrt' (fairseq): linear warmup from `warmup_init_lr` to `peak_lr`
  over `warmup_steps`, then peak * sqrt(warmup / step).
  'cosine' (Transformer-XL): linear warmup from 0 over `warmup_steps`, then
  min_lr + (peak - min_lr) * (1 + cos(pi * step / decay_steps)) / 2, as
  torch's CosineAnnealingLR(max_step, eta_min) stepped with the update count.
  """
  peak, warmup = cfg.peak_lr, max(int(cfg.warmup_steps), 1)
  if cfg.kind == 'inverse_sqrt':
    def decay(count):  # count: updates since the end of the warmup
      return peak * jnp.sqrt(warmup / (jnp.asarray(count, jnp.float32)
                                       + warmup))
    return optax.join_schedules(
        [optax.linear_schedule(cfg.warmup_init_lr, peak, warmup), decay],
        [warmup])
  if cfg.kind == 'cosine':
    floor = cfg.min_lr
    cosine = optax.cosine_decay_schedule(peak - floor,
                                         max(int(cfg.decay_steps), 1))

    def annealed(count):  # the cosine counts from 0, through the warmup
      return floor + cosine(count)
    if int(cfg.warmup_steps) <= 0:
      return annealed
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup),
         lambda count: annealed(count + warmup)], [warmup])
  raise ValueError(f"config.schedule.kind={cfg.kind!r}: choose 'inverse_sqrt' "
                   "or 'cosine'.")


def make_optimizer(cfg: Any, schedule: optax.Schedule
                   ) -> optax.GradientTransformation:
  """`cfg.kind` 'adam': Adam with decoupled weight decay (fairseq's Adam);
  'adamp': AdamP (`normjax.optim.adamp`, with `delta`, `wd_ratio`,
  `nesterov`); optional global-norm clipping before it and, with `cfg.nap`,
  NaP's projection after it (`normjax.optim.nap_project`) of the params
  whose '/'-joined path matches the regex `cfg.nap_params`. Configs
  without these keys get Adam without NaP."""
  parts = []
  if cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  kind = cfg.get('kind', 'adam')
  if kind == 'adam':
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay))
  elif kind == 'adamp':
    parts.append(normjax.optim.adamp(
        schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
        weight_decay=cfg.weight_decay, delta=cfg.get('delta', 0.1),
        wd_ratio=cfg.get('wd_ratio', 0.1),
        nesterov=bool(cfg.get('nesterov', False))))
  else:
    raise ValueError(f"--config.optim.kind={kind!r}: choose 'adam' or "
                     "'adamp'.")
  if cfg.get('nap', False):
    parts.append(normjax.optim.nap_project(
        normjax.optim.mask_by_path(cfg.nap_params)))
  return optax.chain(*parts)


def label_smoothed_loss(logits: Array, targets: Array, weights: Array,
                        smoothing: float) -> tuple[Array, Array, Array]:
  """fairseq's label_smoothed_cross_entropy, summed over real tokens.

  loss = (1 - eps - eps/V) * nll + (eps/V) * sum_v(-log p_v).
  Returns (loss_sum, nll_sum, num_tokens).
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  smooth = -jnp.sum(logp, axis=-1)
  eps_i = smoothing / logits.shape[-1]
  loss = (1.0 - smoothing - eps_i) * nll + eps_i * smooth
  return (jnp.sum(loss * weights), jnp.sum(nll * weights), jnp.sum(weights))


def init_state(init_variables: Callable[[Array], dict], tx, seed: int,
               mesh, logical_rules) -> tuple[TrainState, Any]:
  """Builds the state directly into its shardings; returns (state, shardings)."""
  def init(rng):
    variables = init_variables(rng)
    params = variables['params']
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        opt_state=tx.init(params),
        batch_stats=variables.get('batch_stats', {}),
        grad_stats=variables.get('grad_stats', {}), rng=rng)

  rng = jax.random.PRNGKey(seed)
  shardings = sharding.tree_shardings(jax.eval_shape(init, rng), mesh,
                                     logical_rules)
  state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
  return state, shardings


def make_train_step(logits_fn: Callable[..., tuple[Array, dict]], tx,
                    schedule: optax.Schedule, label_smoothing: float, *,
                    probe: bool = False, exact_gradient: bool = False,
                    project_params: Callable[[Any], Any] | None = None):
  """A train step for `logits_fn(variables, batch, rngs, mutable) ->
  (logits, updates)`, `mutable` the collections the model may write.

  `project_params(params) -> params`, if given, is applied to the
  parameters after every optimizer update (nGPT's renormalisation).

  `batch` holds `targets` and `weights` (1 for real target tokens). With
  `probe` the metrics also hold 'probes' (`experiments.probing`), and with
  `exact_gradient` the cosine of the gradient with exact autodiff.

  A step whose loss, gradient norm or updated state (parameters, optimizer
  state, norm statistics) is not finite changes nothing but the step
  counter (metrics['finite'] is False): the state stays that of the last
  good step, and `fit` stops or skips (config.train.nonfinite).
  """
  mutable = ['batch_stats', normjax.probes.PROBES] if probe else [
      'batch_stats']

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rngs = {'dropout': jax.random.fold_in(state.rng, state.step)}

    def loss_fn(params, grad_stats):
      variables = {'params': params, 'batch_stats': state.batch_stats,
                   'grad_stats': grad_stats}
      logits, updates = logits_fn(variables, batch, rngs, mutable)
      loss, nll, ntokens = label_smoothed_loss(
          logits, batch['targets'], batch['weights'], label_smoothing)
      return loss, (nll, ntokens, updates)

    (loss, (nll, ntokens, updates)), (grads, stat_updates) = (
        jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
            state.params, state.grad_stats))
    denom = jnp.maximum(ntokens, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)  # fairseq: sum, then /N
    exact = None
    if exact_gradient:
      with normjax.functional.power_norm_autodiff():
        exact = jax.grad(lambda p: loss_fn(p, state.grad_stats)[0])(
            state.params)
    param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, param_updates)
    if project_params is not None:
      params = project_params(params)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        batch_stats=updates.get('batch_stats', state.batch_stats),
        grad_stats=normjax.apply_backward_stats(state.grad_stats,
                                                stat_updates))
    grad_norm = optax.tree.norm(grads)
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & all_finite(new_state))
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                             new_state, state).replace(step=new_state.step)
    metrics = dict(loss=loss / denom, nll=nll / denom, ntokens=ntokens,
                   grad_norm=grad_norm, lr=schedule(state.step),
                   finite=finite)
    if probe:
      metrics['probes'] = {
          **probing.norm_probes(updates.get(normjax.probes.PROBES, {})),
          **probing.gradient_probes(grads, exact),
          **probing.state_probes(new_state.batch_stats, new_state.grad_stats)}
    return new_state, metrics

  return train_step


def all_finite(tree: Any) -> Array:
  """True if every floating-point value of `tree` is finite."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def make_eval_step(logits_fn: Callable[..., Array], label_smoothing: float):
  """Summed loss and nll of a batch in evaluation mode (running statistics)."""

  def eval_step(state: TrainState, batch: dict) -> dict:
    logits = logits_fn(state.variables(), batch)
    loss, nll, ntokens = label_smoothed_loss(
        logits, batch['targets'], batch['weights'], label_smoothing)
    return dict(loss=loss, nll=nll, ntokens=ntokens)

  return eval_step


def evaluate_loss(eval_step, state: TrainState, batches, mesh
                  ) -> dict[str, float]:
  """Per-token loss, nll and perplexity summed over every batch exactly.

  `batches` hold 'inputs', 'targets', 'weights' (other keys are ignored).
  """
  totals = dict(loss=0.0, nll=0.0, ntokens=0.0)
  with jax.set_mesh(mesh):
    for batch in batches:
      batch = {k: batch[k] for k in ('inputs', 'targets', 'weights')}
      out = eval_step(state, sharding.global_batch(batch, mesh))
      for k in totals:
        totals[k] += float(out[k])
  n = max(totals['ntokens'], 1.0)
  return dict(loss=totals['loss'] / n, nll=totals['nll'] / n,
              ppl=float(np.exp(totals['nll'] / n)),
              ntokens=totals['ntokens'])


# ---------------------------------------------------------- the skeleton --


class Experiment(abc.ABC):
  """One run's mesh, data, model, optimizer and jitted steps.

  A task subclasses it with its data (`load_data`), its model
  (`model_class`, called with the batch entries `model_inputs`), its
  training batches (`make_batcher`), its validation metrics (`validate`)
  and its final evaluation (`finish`); `train_and_evaluate` trains (`train`)
  and finishes, `load_checkpoint` restores a state for evaluation.

  Attributes: config, workdir, mesh, rules (logical axis rules), dp (the
  data-parallel size every batch's rows divide by), data (`vocab`,
  `fingerprint`), model and eval_model (deterministic), schedule, tx,
  batcher (an iterable of numpy batches with state()/restore()), state (the
  freshly initialised state) and state_shardings, and the jitted
  train_step (state, batch) -> (state, metrics), probe_step (the same,
  metrics['probes'] added) and eval_step (state, batch) -> summed losses.
  """
  model_class: type[nn.Module]
  model_inputs: tuple[str, ...]  # batch entries, the model's arguments
  checkpoint_choices = "'latest' or a step number"  # for --checkpoint

  def __init__(self, config, workdir: str, devices=None):
    self.config, self.workdir = config, workdir
    self.mesh = sharding.make_mesh(config.mesh, devices)
    self.rules = sharding.rules(config.mesh)
    self.data = self.load_data(os.path.join(workdir, 'vocab'))
    self.check_splits()
    self.model = self._make_model()
    self.eval_model = self._make_model(deterministic=True)
    self.schedule = make_schedule(config.schedule)
    self.tx = make_optimizer(config.optim, self.schedule)
    self.dp = sharding.data_parallel_size(self.mesh)
    self.batcher = self.make_batcher()
    self._build_steps()

  @abc.abstractmethod
  def load_data(self, cache_dir: str) -> Any:
    """The run's data: splits, `vocab` and `fingerprint`."""

  min_split_size = 1  # examples (translation) or tokens (an LM stream)

  def check_splits(self) -> None:
    """Raises ValueError, before anything compiles, if a split is too small
    to train on or to score (an empty file, a filter that kept nothing)."""
    cfg = self.config.data
    source = cfg.get('source', 'local')
    where = (f"data.path={cfg.get('path')}" if source == 'local'
             else f'data.source={source}')
    for split in ('train', 'valid', 'test'):
      size = len(getattr(self.data, split))
      if size < self.min_split_size:
        raise ValueError(
            f'the {split} split of {where} has {size} '
            f'{"tokens" if self.min_split_size > 1 else "examples"} (at '
            f'least {self.min_split_size} needed); check its file, or the '
            'length filters and max_*_examples settings.')

  @abc.abstractmethod
  def make_batcher(self) -> Any:
    """The training batches, rows a multiple of `self.dp`."""

  @abc.abstractmethod
  def validate(self, state: TrainState) -> dict[str, float]:
    """Validation metrics; 'loss' drives early stopping."""

  @abc.abstractmethod
  def finish(self, state: TrainState, mngr, expect: dict, writer
             ) -> dict[str, Any]:
    """The final evaluation after training; returns the results."""

  def project_params(self, params: Any) -> Any:
    """Applied to the parameters after every optimizer update: the model
    class's static `project_params` where it has one (nGPT), else the
    identity."""
    project = getattr(self.model_class, 'project_params', None)
    return params if project is None else project(params)

  def _make_model(self, **overrides) -> nn.Module:
    """`model_class` for config.model and the vocabulary, with `overrides`."""
    return self.model_class(TransformerConfig.from_config(
        self.config.model, self.data.vocab.size, **overrides))

  def _build_steps(self) -> None:
    """The sharded initial state and the jitted train, probed and eval
    steps; the train steps donate the state, batches are split over the
    mesh's data axes, `probe_step` compiles when first called."""
    config, model, eval_model = self.config, self.model, self.eval_model
    inputs = lambda batch: [batch[k] for k in self.model_inputs]
    shapes = {k: jnp.ones((self.dp, 8), jnp.int32) for k in self.model_inputs}

    def init_variables(rng):
      return model.init({'params': rng, 'dropout': rng}, *inputs(shapes),
                        train=False)

    def logits_fn(variables, batch, rngs, mutable):
      return model.apply(variables, *inputs(batch), train=True, rngs=rngs,
                         mutable=mutable)

    def eval_logits(variables, batch):
      return eval_model.apply(variables, *inputs(batch), train=False)

    with jax.set_mesh(self.mesh):
      self.state, self.state_shardings = init_state(
          init_variables, self.tx, config.seed, self.mesh, self.rules)
    shardings = (self.state_shardings, sharding.batch_sharding(self.mesh))
    repl = sharding.replicated(self.mesh)

    def jit_train(**kwargs):
      return jax.jit(
          make_train_step(logits_fn, self.tx, self.schedule,
                          config.optim.label_smoothing,
                          project_params=self.project_params, **kwargs),
          in_shardings=shardings, out_shardings=(self.state_shardings, repl),
          donate_argnums=0)
    self.train_step = jit_train()
    self.probe_step = jit_train(
        probe=True, exact_gradient=config.train.probe_exact_gradient)
    self.eval_step = jax.jit(
        make_eval_step(eval_logits, config.optim.label_smoothing),
        in_shardings=shardings, out_shardings=repl)

  def train_and_evaluate(self) -> dict[str, Any]:
    """`train`s (resuming from the newest checkpoint), then `finish`es."""
    state, mngr, expect, writer = train(self, self.config, self.workdir)
    try:
      return self.finish(state, mngr, expect, writer)
    finally:
      close_run(mngr)

  def checkpoint_location(self, checkpoint: str) -> tuple[str, int | None]:
    """(directory, step) of a --checkpoint: 'latest' (step None: the
    newest) or a step number of <workdir>/checkpoints."""
    directory = os.path.join(self.workdir, 'checkpoints')
    if checkpoint == 'latest':
      return directory, None
    if checkpoint.isdigit():
      return directory, int(checkpoint)
    raise ValueError(f'--checkpoint={checkpoint}: choose '
                     f'{self.checkpoint_choices}.')

  def load_checkpoint(self, checkpoint: str) -> tuple[TrainState, str]:
    """(state, what it is) of a --checkpoint (`checkpoint_location`),
    restored into this run's shardings; its vocabulary must be this run's.
    `what` names the training step, or the steps an average holds."""
    directory, step = self.checkpoint_location(checkpoint)
    state, meta, step = checkpointing.read(
        directory, step,
        abstract_state=checkpointing.abstract_like(self.state,
                                                   self.state_shardings),
        expect={'vocab_fingerprint': self.data.fingerprint})
    if 'steps' in meta:
      return state, f'{checkpoint}: the average of steps {meta["steps"]}'
    return state, f'step {step}'


def save_results(workdir: str, result: dict,
                 texts: dict[str, str] | None = None) -> None:
  """On process 0: <workdir>/results.json, and `texts` (file name -> text)."""
  if jax.process_index() != 0:
    return
  for name, text in (texts or {}).items():
    with open(os.path.join(workdir, name), 'w') as f:
      f.write(text)
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(result, f, indent=2)


# ---------------------------------------------------------------- the loop --


def log_scalars(writer, step: int, prefix: str, values: dict) -> None:
  """TensorBoard scalars `prefix/name` (writer None: not the chief)."""
  if writer is None:
    return
  for k, v in values.items():
    writer.add_scalar(f'{prefix}/{k}', v, step)
  writer.flush()


def summary_writer(workdir: str):
  """A TensorBoard event writer in <workdir>/tensorboard on process 0."""
  if jax.process_index() != 0:
    return None
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  return SummaryWriter(os.path.join(workdir, 'tensorboard'))


def log_config(writer, config) -> None:
  """The resolved config to TensorBoard: as text, and its scalar and
  string leaves as hparams (the HPARAMS tab), in the run's own event
  file (writer None: not the chief)."""
  if writer is None:
    return
  from tensorboardX.summary import hparams  # pylint: disable=g-import-not-at-top
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  writer.add_text('config', '    ' + text.replace('\n', '\n    '), 0)
  flat = {k: v for k, v in _flatten(config.to_dict()).items()
          if isinstance(v, (bool, int, float, str))}
  for summary in hparams(flat, {}):
    writer.file_writer.add_summary(summary)
  writer.flush()


def _flatten(tree: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def banner(exp: Experiment, step: int) -> None:
  """One line at start-up (process 0): preset, workdir, devices, mesh,
  parameter count, and where training starts."""
  if jax.process_index() != 0:
    return
  devices = jax.devices()
  params = sum(int(np.prod(x.shape))
               for x in jax.tree.leaves(exp.state.params))
  mesh = ', '.join(f'{k} {v}' for k, v in exp.mesh.shape.items())
  start = f'resuming at step {step}' if step else 'from scratch'
  print(f'{exp.config.preset}: workdir {exp.workdir}; {len(devices)} '
        f'{devices[0].platform} device(s) on {jax.process_count()} '
        f'process(es), mesh ({mesh}); {params:,} parameters; {start} to '
        f'step {exp.config.train.num_steps}', flush=True)


def restore_or_init(exp: Experiment, mngr, expect: dict) -> TrainState:
  """The newest valid checkpoint (data position included), else the fresh
  state (`checkpointing.restore_newest`: invalid ones are moved aside)."""
  if mngr.latest_step() is None:
    return exp.state
  abstract = checkpointing.abstract_like(exp.state, exp.state_shardings)
  restored = checkpointing.restore_newest(mngr, abstract, expect)
  if restored is None:
    return exp.state
  state, meta = restored
  exp.batcher.restore(meta['data'])
  print(f'resumed from step {int(state.step)} of {mngr.directory}',
        flush=True)
  return state


def fit(exp: Experiment, train_cfg: Any, mngr, expect: dict, writer,
        preset: str, probe_log: probing.ProbeLog | None = None,
        state: TrainState | None = None,
        step_log: faults.StepLog | None = None) -> TrainState:
  """Trains to `train_cfg.num_steps`, resuming from `mngr`'s newest step.

  Every `log_every` steps: loss, perplexity, tokens/s, lr and gradient norm
  to stdout and TensorBoard; every `probe_every` steps (if > 0) the step is
  `exp.probe_step` and its probes go to TensorBoard and `probe_log`
  (`experiments.probing`); every `eval_every` steps `exp.validate`; every
  `checkpoint_every` steps (and at the end, or at an early stop after
  `early_stop_patience` evaluations without a better valid loss) the whole
  state with `expect`, the data position and the preset as metadata, the
  old ones pruned to `keep_checkpoints` (`checkpointing.prune`).
  `state` is where to start (default: `restore_or_init`); `step_log` gets
  every step's values (`faults.StepLog`).

  Faults: a SIGTERM or SIGINT writes a checkpoint after the current step
  (kind 'preempted': it never enters the averaging set) and raises
  `faults.Preempted`. A step with a non-finite loss, gradient norm or
  updated state (which the train step leaves without effect) raises
  `faults.NonFiniteError` naming the step and where the values first went
  bad, or with `nonfinite='skip'` is skipped, up to `nonfinite_max_skips`
  in a row; so does a loss above `divergence_factor` times the median of
  the last 100 (`faults.DivergenceWatch`) and a non-finite validation
  metric. A checkpoint that failed to save raises `faults.SaveError` at
  the next step.
  """
  cfg = train_cfg
  if state is None:
    state = restore_or_init(exp, mngr, expect)
  loop = _Loop(exp, cfg, mngr, expect, preset, int(state.step))
  batches: Iterator = iter(exp.batcher)
  window, compiling = _new_window(), True
  bar = tqdm.tqdm(total=cfg.num_steps, initial=loop.step, desc='train',
                  disable=jax.process_index() != 0, mininterval=5)
  with jax.set_mesh(exp.mesh), faults.Preemption() as preemption, bar:
    while loop.step < cfg.num_steps:
      loop.check_saves()
      host_batch = next(batches)
      batch = sharding.global_batch(host_batch, exp.mesh)
      probed = cfg.probe_every > 0 and (loop.step + 1) % cfg.probe_every == 0
      state, metrics = (exp.probe_step if probed else exp.train_step)(
          state, batch)
      step = loop.step = loop.step + 1
      if compiling:  # the first step of this process compiles
        jax.block_until_ready(metrics['loss'])
        bar.write(f'step {step}: compiled and ran in '
                  f'{time.time() - window["start"]:.1f} s (tokens/s '
                  'counts the steps after it)')
        window['start'] = time.time()
      loop.check_step(state, batch, metrics, bar)
      if step_log is not None:
        step_log.write(step, metrics, faults.batch_crc(host_batch))
      if probed:
        values = {k: float(v) for k, v in metrics.pop('probes').items()}
        log_scalars(writer, step, 'probes', values)
        if probe_log is not None:
          probe_log.write(step, values)
      bar.update(1)
      if not loop.skipped:
        window['steps'] += 1
        for k in ('loss', 'nll', 'ntokens'):
          window[k] += float(metrics[k])
      if compiling:  # its tokens are not in the timed window
        window['ntokens'], compiling = 0.0, False
      if window['steps'] and (step % cfg.log_every == 0
                              or step == cfg.num_steps):
        logged = _summarize(window, metrics)
        bar.set_postfix(loss=f"{logged['loss']:.3f}",
                        tok_s=f"{logged['tokens_per_s']:.0f}")
        bar.write(f'step {step}: ' + format_metrics(logged))
        log_scalars(writer, step, 'train', logged)
        window = _new_window()
      stop = False
      if step % cfg.eval_every == 0 or step == cfg.num_steps:
        stop = loop.validate(state, writer, bar)
      if stop or preemption.requested or step % cfg.checkpoint_every == 0 \
          or step == cfg.num_steps:
        loop.save(state, checkpointing.CADENCE if step % cfg.checkpoint_every
                  == 0 else checkpointing.FINAL if stop or step ==
                  cfg.num_steps else checkpointing.PREEMPTED)
      if preemption.requested:
        loop.finish_saves()
        raise faults.Preempted(step, str(mngr.directory),
                               preemption.requested)
      if stop:
        bar.write(f'early stop at step {step}: valid loss did not improve for '
                  f'{loop.stale} evaluations')
        break
  loop.finish_saves()
  return state


class _Loop:
  """What `fit` tracks between steps: the step, the non-finite steps
  skipped in a row, early stopping, divergence, and the checkpoints (the
  newest known good one; saves that failed)."""

  def __init__(self, exp, cfg, mngr, expect, preset, step):
    self.exp, self.cfg, self.mngr = exp, cfg, mngr
    self.expect, self.preset, self.step = expect, preset, step
    self.skipped, self.best, self.stale = 0, float('inf'), 0
    self.divergence = faults.DivergenceWatch(
        cfg.divergence_factor,
        ceiling=float(np.log(exp.data.vocab.size)))
    # The newest good checkpoint: one this run saved (its state passed the
    # finite check), or the one it resumed from once a step from it was
    # finite.
    self.good, self.unconfirmed = [], step if step else None
    self.valid_log = (curves.ValidLog(exp.workdir, resume_step=step)
                      if jax.process_index() == 0 else None)

  def check_step(self, state, batch, metrics, bar) -> None:
    """Stops (NonFiniteError) or counts a non-finite or diverging step."""
    if not bool(metrics['finite']):
      self.skipped = _nonfinite_step(self.exp, self.cfg, state, batch,
                                     metrics, self.step, self.skipped,
                                     self.last_good())
      bar.write(f'step {self.step}: skipped, loss {float(metrics["loss"])}, '
                f'grad_norm {float(metrics["grad_norm"])} '
                f'({self.skipped} in a row)')
      return
    self.skipped = 0
    if self.unconfirmed is not None:
      self.good.append(self.unconfirmed)
      self.unconfirmed = None
    problem = self.divergence.check(float(metrics['loss']))
    if problem:
      where = faults.largest(_probe(self.exp, state, batch))
      raise faults.NonFiniteError(
          f'step {self.step}: {problem}; {where}. The run diverged; the last '
          f'good checkpoint is {self.last_good()}; lower the learning rate, '
          'or raise --config.train.divergence_factor (0 turns this off).')

  def validate(self, state, writer, bar) -> bool:
    """Runs `exp.validate`; True if early stopping says stop."""
    result = self.exp.validate(state)
    bar.write(f'step {self.step} valid: ' + format_metrics(result))
    log_scalars(writer, self.step, 'valid', result)
    if self.valid_log is not None:
      self.valid_log.write(self.step, result)
    bad = [k for k, v in result.items()
           if isinstance(v, float) and not np.isfinite(v)]
    if bad:
      raise faults.NonFiniteError(
          f'step {self.step}: validation {", ".join(bad)} not finite '
          f'({format_metrics(result)}): the model diverged; the last good '
          f'checkpoint is {self.last_good()}; lower the learning rate.')
    if result['loss'] < self.best:
      self.best, self.stale = result['loss'], 0
    else:
      self.stale += 1
    return bool(self.cfg.early_stop_patience) and (
        self.stale >= self.cfg.early_stop_patience)

  def save(self, state, kind: str) -> None:
    """Prunes old checkpoints (the previous save is committed first), then
    saves this step's asynchronously."""
    self.check_saves()
    checkpointing.prune(self.mngr, self.cfg.keep_checkpoints)
    checkpointing.save(self.mngr, self.step, state, dict(
        self.expect, data=self.exp.batcher.state(), step=self.step,
        preset=self.preset, kind=kind))
    self.good.append(self.step)
    self.unconfirmed = None

  def check_saves(self) -> None:
    """Raises faults.SaveError if a save in flight failed."""
    try:
      self.mngr.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise faults.SaveError(
          f'saving a checkpoint in {self.mngr.directory} failed: '
          f'{type(e).__name__}: {str(e).splitlines()[0][:200]}; the last '
          f'complete checkpoint is {self.last_good()}; free space or fix the '
          'directory, then rerun the same command to resume.') from None

  def finish_saves(self) -> None:
    """Waits for the save in flight, checks it, prunes."""
    try:
      self.mngr.wait_until_finished()
    except Exception:  # pylint: disable=broad-except
      pass
    self.check_saves()
    checkpointing.prune(self.mngr, self.cfg.keep_checkpoints)

  def last_good(self) -> str:
    """The newest checkpoint known good and complete, as a path (or 'none');
    waits for a save in flight."""
    try:
      with checkpointing.quiet_asyncio():
        self.mngr.wait_until_finished()
    except Exception:  # pylint: disable=broad-except  # reported elsewhere
      pass
    complete = set(self.mngr.all_steps())
    good = [s for s in self.good if s in complete]
    return f'{self.mngr.directory}/{max(good)}' if good else 'none'


def train(exp: Experiment, config: Any, workdir: str):
  """`fit` of a run: checkpoints in <workdir>/checkpoints, the vocabulary
  fingerprint (`exp.data.fingerprint`) and the run's settings
  (`checkpointing.run_identity`) checked on resume, TensorBoard in
  <workdir>/tensorboard, per-step losses in <workdir>/losses.csv, the validation curve in
  <workdir>/valid.csv (`experiments.curves`), probes
  (if on) in <workdir>/probes.csv. Returns (state, manager, expect,
  writer); the caller evaluates and closes the manager."""
  lock = faults.WorkdirLock(workdir, take=jax.process_index() == 0)
  lock.__enter__()
  try:
    mngr = checkpointing.manager(os.path.join(workdir, 'checkpoints'))
  except BaseException:
    lock.__exit__()
    raise
  mngr.lock = lock  # released by close_run
  expect = {'vocab_fingerprint': exp.data.fingerprint,
            **checkpointing.run_identity(config)}
  step_log = writer = None
  try:
    state = restore_or_init(exp, mngr, expect)
    writer = summary_writer(workdir)
    log_config(writer, config)
    banner(exp, int(state.step))
    probe_log = None
    if jax.process_index() == 0:
      step_log = faults.StepLog(workdir, resume_step=int(state.step))
      if config.train.probe_every > 0:
        probe_log = probing.ProbeLog(workdir, resume_step=int(state.step))
    state = fit(exp, config.train, mngr, expect, writer, config.preset,
                probe_log, state=state, step_log=step_log)
  except BaseException:
    close_run(mngr)  # waits for a save in flight; the last good one stays
    if writer is not None:
      writer.close()
    raise
  finally:
    if step_log is not None:
      step_log.close()
  return state, mngr, expect, writer


def close_run(mngr) -> None:
  """Closes the checkpoint manager of `train` (waiting for a save in
  flight, whose failure was reported already) and releases the workdir."""
  try:
    with checkpointing.quiet_asyncio():
      mngr.close()
  except Exception:  # pylint: disable=broad-except
    pass
  finally:
    mngr.lock.__exit__()


def _nonfinite_step(exp: Experiment, cfg: Any, state: TrainState,
                    batch: dict, metrics: dict, step: int, skipped: int,
                    last_good: str) -> int:
  """Raises NonFiniteError, or returns the count of steps skipped in a row."""
  skipped += 1
  policy = cfg.get('nonfinite', 'stop')
  if policy not in ('stop', 'skip'):
    raise ValueError(f"--config.train.nonfinite={policy!r}: choose 'stop' or "
                     "'skip'.")
  if policy == 'skip' and skipped <= cfg.get('nonfinite_max_skips', 10):
    return skipped
  # The step left the state as it was: probe the same batch from it.
  where = faults.locate(_probe(exp, state.replace(step=state.step - 1),
                               batch), state.params)
  hint = ('the run skipped ' + str(skipped - 1) + ' steps in a row before; '
          if policy == 'skip' else
          'set --config.train.nonfinite=skip to skip such steps; ')
  raise faults.NonFiniteError(
      f'step {step}: loss {float(metrics["loss"])}, gradient norm '
      f'{float(metrics["grad_norm"])}; {where}. Nothing of this step was '
      f'saved; the last good checkpoint is {last_good}; {hint}lower the '
      'learning rate or check the data.')


def _probe(exp: Experiment, state: TrainState, batch: dict) -> dict:
  """The probes of one step (the probed step donates: it gets a copy)."""
  try:
    _, metrics = exp.probe_step(jax.tree.map(jnp.copy, state), batch)
    return {k: float(v) for k, v in metrics['probes'].items()}
  except Exception as e:  # pylint: disable=broad-except  # a diagnosis only
    print(f'warning: probing the non-finite step failed: {e}',
          file=sys.stderr)
    return {}


def _new_window() -> dict:
  return dict(loss=0.0, nll=0.0, ntokens=0.0, steps=0, start=time.time())


def _summarize(window: dict, metrics: dict) -> dict[str, float]:
  """Per-token means over the window's steps, throughput, last lr/grad norm."""
  elapsed = time.time() - window['start']
  return dict(loss=window['loss'] / window['steps'],
              ppl=float(np.exp(window['nll'] / window['steps'])),
              tokens_per_s=window['ntokens'] / max(elapsed, 1e-9),
              lr=float(metrics['lr']),
              grad_norm=float(metrics['grad_norm']))


def format_metrics(values: dict) -> str:
  """`name value, ...` of the numeric entries, 4 significant digits."""
  return ', '.join(f'{k} {v:.4g}' for k, v in values.items()
                   if isinstance(v, (int, float)))
