"""Transformer translation: training, evaluation, decoding and BLEU.

`train_and_evaluate(config, workdir)` trains with periodic validation (loss,
perplexity, BLEU) and checkpoints, resumes exactly from the newest
checkpoint, and at the end averages the last checkpoints and scores the test
set. `evaluate(config, workdir, checkpoint)` scores a saved or averaged
checkpoint. Entry points: experiments/wmt.py, experiments/iwslt.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import sacrebleu
import tqdm

from experiments import checkpointing
from experiments import decode
from experiments import sharding
from experiments import train_lib
from experiments.data import TokenBatcher, load_translation
from experiments.models import Transformer, TransformerConfig

AVERAGED = 'averaged'


def bleu(hypotheses: list[str], references: list[str], lowercase: bool
         ) -> dict[str, float]:
  """sacreBLEU (13a tokenizer) and tokenized BLEU as fairseq computes it.

  For text that is already tokenized (IWSLT14, Multi30k `tok`), 'tok_bleu'
  splits on whitespace only, which is fairseq generate's BLEU4.
  """
  detok = sacrebleu.corpus_bleu(hypotheses, [references], lowercase=lowercase)
  tok = sacrebleu.corpus_bleu(hypotheses, [references], lowercase=lowercase,
                              tokenize='none')
  return {'bleu': detok.score, 'tok_bleu': tok.score}


def model_config(config, vocab_size: int, **overrides) -> TransformerConfig:
  fields = {f.name for f in dataclasses.fields(TransformerConfig)}
  kwargs = {k: v for k, v in config.model.to_dict().items() if k in fields}
  kwargs['norms'] = {site: dict(norm) for site, norm in
                     config.model.norms.to_dict().items()}
  return TransformerConfig(vocab_size=vocab_size, **{**kwargs, **overrides})


class Experiment:
  """Data, model, mesh, optimizer and jitted steps of one translation run."""

  def __init__(self, config, workdir: str, devices=None):
    self.config, self.workdir = config, workdir
    self.mesh = sharding.make_mesh(config.mesh, devices)
    self.rules = sharding.rules(config.mesh)
    self.data = load_translation(config.data,
                                 cache_dir=os.path.join(workdir, 'vocab'))
    self.model = Transformer(model_config(config, self.data.vocab.size))
    self.eval_model = Transformer(model_config(
        config, self.data.vocab.size, deterministic=True))
    self.schedule = train_lib.make_schedule(config.schedule)
    self.tx = train_lib.make_optimizer(config.optim, self.schedule)
    self.dp = sharding.data_parallel_size(self.mesh)
    self.batcher = TokenBatcher(
        self.data.train, max_tokens=config.data.max_tokens,
        batch_multiple=self.dp, shuffle=True, seed=config.seed)
    self._build()

  def _build(self):
    model, config = self.model, self.config
    tokens = jnp.ones((self.dp, 8), jnp.int32)  # shapes only

    def init_variables(rng):
      return model.init({'params': rng, 'dropout': rng}, tokens, tokens,
                        train=False)

    with jax.set_mesh(self.mesh):
      self.state, self.state_shardings = train_lib.init_state(
          init_variables, self.tx, config.seed, self.mesh, self.rules)

    def logits_fn(variables, batch, rngs):
      return model.apply(variables, batch['inputs'], batch['targets'],
                         train=True, rngs=rngs, mutable=['batch_stats'])

    def eval_logits(variables, batch):
      return self.eval_model.apply(variables, batch['inputs'],
                                   batch['targets'], train=False)

    batch_sh = sharding.batch_sharding(self.mesh)
    repl = sharding.replicated(self.mesh)
    self.train_step = jax.jit(
        train_lib.make_train_step(logits_fn, self.tx, self.schedule,
                                  config.optim.label_smoothing),
        in_shardings=(self.state_shardings, batch_sh),
        out_shardings=(self.state_shardings, repl), donate_argnums=0)
    self.eval_step = jax.jit(
        train_lib.make_eval_step(eval_logits, config.optim.label_smoothing),
        in_shardings=(self.state_shardings, batch_sh), out_shardings=repl)

  # ---------------------------------------------------------------- eval --
  def _eval_batches(self, examples, max_tokens):
    return TokenBatcher(examples, max_tokens=max_tokens,
                        batch_multiple=self.dp, shuffle=False).eval_batches()

  def loss(self, state, examples) -> dict[str, float]:
    totals = dict(loss=0.0, nll=0.0, ntokens=0.0)
    with jax.set_mesh(self.mesh):
      for batch in self._eval_batches(examples, self.config.data.max_tokens):
        batch = {k: batch[k] for k in ('inputs', 'targets', 'weights')}
        out = self.eval_step(state, sharding.global_batch(batch, self.mesh))
        for k in totals:
          totals[k] += float(out[k])
    n = max(totals['ntokens'], 1.0)
    return dict(loss=totals['loss'] / n, nll=totals['nll'] / n,
                ppl=float(np.exp(totals['nll'] / n)))

  def translate(self, state, examples, beam_size: int) -> list[str]:
    """Beam search over `examples` in order; detokenized hypotheses."""
    cfg = self.config.decode
    hyps = [''] * len(examples)
    variables = state.variables()
    batches = self._eval_batches(examples, cfg.batch_tokens)
    for batch in tqdm.tqdm(batches, desc='decode', leave=False,
                           disable=jax.process_index() != 0):
      # fairseq's budget a * src_len + b, taken at the bucket's padded
      # length so that each bucket compiles once.
      max_len = min(int(cfg.max_len_a * batch['inputs'].shape[1]
                        + cfg.max_len_b) + 1, self.eval_model.config.max_len)
      tokens = decode.translate(
          self.eval_model, variables, jnp.asarray(batch['inputs']),
          beam_size=beam_size, max_len=max_len,
          length_penalty=cfg.length_penalty)
      tokens = np.asarray(tokens)  # every process decodes the whole batch
      for row, index in zip(tokens, batch['index']):
        if index >= 0:
          hyps[index] = self.data.vocab.decode(row)
    return hyps

  def score(self, state, split: str, limit: int = 0,
            beam_size: int | None = None
            ) -> tuple[dict[str, float], list[str]]:
    """Loss, perplexity and BLEU on `split` (first `limit` pairs), and the
    hypotheses."""
    examples = getattr(self.data, split)
    refs = getattr(self.data, f'{split}_refs')
    if limit:
      examples, refs = examples[:limit], refs[:limit]
    beam = self.config.decode.beam_size if beam_size is None else beam_size
    hyps = self.translate(state, examples, beam)
    result = self.loss(state, examples)
    result.update(bleu(hyps, refs, self.config.decode.lowercase_bleu))
    return result, hyps


def _log(writer, step: int, prefix: str, values: dict[str, float]) -> None:
  if writer is None:
    return
  for k, v in values.items():
    writer.add_scalar(f'{prefix}/{k}', v, step)
  writer.flush()


def _writer(workdir: str):
  if jax.process_index() != 0:
    return None
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  return SummaryWriter(os.path.join(workdir, 'tensorboard'))


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  exp = Experiment(config, workdir)
  cfg = config.train
  mngr = checkpointing.manager(os.path.join(workdir, 'checkpoints'),
                               cfg.keep_checkpoints)
  expect = {'vocab_fingerprint': exp.data.fingerprint}
  state = exp.state
  if mngr.latest_step() is not None:
    abstract = checkpointing.abstract_like(state, exp.state_shardings)
    state, meta = checkpointing.restore(mngr, mngr.latest_step(), abstract,
                                        expect)
    exp.batcher.restore(meta['data'])
    print(f'resumed from step {int(state.step)} in {workdir}', flush=True)
  writer = _writer(workdir)
  step = int(state.step)
  best, stale = float('inf'), 0
  batches = iter(exp.batcher)
  window = dict(loss=0.0, nll=0.0, ntokens=0.0, steps=0, start=time.time())
  bar = tqdm.tqdm(total=cfg.num_steps, initial=step, desc='train',
                  disable=jax.process_index() != 0, mininterval=5)
  with jax.set_mesh(exp.mesh):
    while step < cfg.num_steps:
      batch = sharding.global_batch(next(batches), exp.mesh)
      state, metrics = exp.train_step(state, batch)
      step += 1
      bar.update(1)
      window['steps'] += 1
      for k in ('loss', 'nll', 'ntokens'):
        window[k] += float(metrics[k])
      if step % cfg.log_every == 0 or step == cfg.num_steps:
        elapsed = time.time() - window['start']
        logged = dict(loss=window['loss'] / window['steps'],
                      ppl=float(np.exp(window['nll'] / window['steps'])),
                      tokens_per_s=window['ntokens'] / max(elapsed, 1e-9),
                      lr=float(metrics['lr']),
                      grad_norm=float(metrics['grad_norm']))
        bar.set_postfix(loss=f"{logged['loss']:.3f}",
                        tok_s=f"{logged['tokens_per_s']:.0f}")
        bar.write(f'step {step}: ' + ', '.join(
            f'{k} {v:.4g}' for k, v in logged.items()))
        _log(writer, step, 'train', logged)
        window = dict(loss=0.0, nll=0.0, ntokens=0.0, steps=0,
                      start=time.time())
      if step % cfg.eval_every == 0 or step == cfg.num_steps:
        result, _ = exp.score(state, 'valid', cfg.eval_bleu_examples)
        bar.write(f'step {step} valid: ' + ', '.join(
            f'{k} {v:.4g}' for k, v in result.items()))
        _log(writer, step, 'valid', result)
        if result['loss'] < best:
          best, stale = result['loss'], 0
        else:
          stale += 1
      stop = bool(cfg.early_stop_patience) and (
          stale >= cfg.early_stop_patience)
      if stop or step % cfg.checkpoint_every == 0 or step == cfg.num_steps:
        checkpointing.save(mngr, step, state, dict(
            expect, data=exp.batcher.state(), step=step,
            preset=config.preset))
      if stop:
        bar.write(f'early stop at step {step}: valid loss did not improve for '
                  f'{stale} evaluations')
        break
  bar.close()
  mngr.wait_until_finished()
  final = _average_and_test(exp, mngr, expect, writer, step)
  mngr.close()
  return final


def _average_and_test(exp: Experiment, mngr, expect, writer, step):
  steps = sorted(mngr.all_steps())[-exp.config.decode.average_last:]
  abstract = checkpointing.abstract_like(exp.state, exp.state_shardings)
  states = [checkpointing.restore(mngr, s, abstract, expect)[0]
            for s in steps]
  averaged = jax.device_put(checkpointing.average(states),
                            exp.state_shardings)
  save_averaged(exp.workdir, averaged, dict(expect, steps=steps))
  result, hyps = exp.score(averaged, 'test')
  result['averaged_steps'] = steps
  print(f'test (average of steps {steps}): ' + ', '.join(
      f'{k} {v:.4g}' for k, v in result.items() if k != 'averaged_steps'),
        flush=True)
  _log(writer, step, 'test', {k: v for k, v in result.items()
                              if k != 'averaged_steps'})
  if jax.process_index() == 0:
    with open(os.path.join(exp.workdir, 'test_hypotheses.txt'), 'w') as f:
      f.write('\n'.join(hyps) + '\n')
    with open(os.path.join(exp.workdir, 'results.json'), 'w') as f:
      json.dump(result, f, indent=2)
  return result


def save_averaged(workdir: str, state, meta: dict) -> None:
  path = os.path.join(workdir, AVERAGED)
  with ocp.CheckpointManager(os.path.abspath(path), options=
                             ocp.CheckpointManagerOptions(max_to_keep=1,
                                                          create=True)) as m:
    checkpointing.save(m, 0, state, meta)
    m.wait_until_finished()


def evaluate(config, workdir: str, checkpoint: str = AVERAGED,
             split: str = 'test') -> dict[str, float]:
  """Scores `checkpoint` ('averaged', 'latest' or a step) on `split`."""
  exp = Experiment(config, workdir)
  expect = {'vocab_fingerprint': exp.data.fingerprint}
  abstract = checkpointing.abstract_like(exp.state, exp.state_shardings)
  if checkpoint == AVERAGED:
    directory, step = os.path.join(workdir, AVERAGED), 0
  else:
    directory = os.path.join(workdir, 'checkpoints')
    step = None if checkpoint == 'latest' else int(checkpoint)
  if not os.path.isdir(directory):
    raise checkpointing.CheckpointMismatch(
        f'no checkpoint directory {directory}; train first, or pass '
        '--checkpoint=latest|<step>.')
  with ocp.CheckpointManager(os.path.abspath(directory)) as m:
    step = m.latest_step() if step is None else step
    state, _ = checkpointing.restore(m, step, abstract, expect)
  result, _ = exp.score(state, split)
  print(f'{split} ({checkpoint}): ' + ', '.join(
      f'{k} {v:.4g}' for k, v in result.items()), flush=True)
  return result
