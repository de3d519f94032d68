"""Transformer translation: training, evaluation, decoding and BLEU.

`train_and_evaluate(config, workdir)` trains with periodic validation (loss,
perplexity, BLEU) and checkpoints, resumes exactly from the newest
checkpoint, and at the end averages the last checkpoints and scores the test
set. `evaluate(config, workdir, checkpoint)` scores a saved or averaged
checkpoint. Entry points: experiments/wmt.py, experiments/iwslt.py.
"""

from __future__ import annotations

import json
import os
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


class Experiment:
  """Data, model, mesh, optimizer and jitted steps of one translation run."""

  def __init__(self, config, workdir: str, devices=None):
    self.config, self.workdir = config, workdir
    self.mesh = sharding.make_mesh(config.mesh, devices)
    self.rules = sharding.rules(config.mesh)
    self.data = load_translation(config.data,
                                 cache_dir=os.path.join(workdir, 'vocab'))
    self.model = Transformer(TransformerConfig.from_config(
        config.model, self.data.vocab.size))
    self.eval_model = Transformer(TransformerConfig.from_config(
        config.model, self.data.vocab.size, deterministic=True))
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

    def logits_fn(variables, batch, rngs, mutable):
      return model.apply(variables, batch['inputs'], batch['targets'],
                         train=True, rngs=rngs, mutable=mutable)

    def eval_logits(variables, batch):
      return self.eval_model.apply(variables, batch['inputs'],
                                   batch['targets'], train=False)

    (self.state, self.state_shardings, self.train_step, self.probe_step,
     self.eval_step) = train_lib.build_steps(
         init_variables, logits_fn, eval_logits, self.tx, self.schedule,
         seed=config.seed, label_smoothing=config.optim.label_smoothing,
         mesh=self.mesh, logical_rules=self.rules,
         exact_gradient=config.train.probe_exact_gradient)

  # ---------------------------------------------------------------- eval --
  def _eval_batches(self, examples, max_tokens):
    return TokenBatcher(examples, max_tokens=max_tokens,
                        batch_multiple=self.dp, shuffle=False).eval_batches()

  def loss(self, state, examples) -> dict[str, float]:
    batches = self._eval_batches(examples, self.config.data.max_tokens)
    result = train_lib.evaluate_loss(self.eval_step, state, batches,
                                     self.mesh)
    del result['ntokens']
    return result

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

  def validate(self, state) -> dict[str, float]:
    """Loss, perplexity and BLEU on the first `eval_bleu_examples` pairs."""
    return self.score(state, 'valid', self.config.train.eval_bleu_examples)[0]


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  exp = Experiment(config, workdir)
  state, mngr, expect, writer = train_lib.train(exp, config, workdir)
  final = _average_and_test(exp, mngr, expect, writer, int(state.step))
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
  train_lib.log_scalars(writer, step, 'test', {k: v for k, v in result.items()
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
