"""Transformer translation: training, evaluation, decoding and BLEU.

`train_and_evaluate(config, workdir)` trains with periodic validation (loss,
perplexity, BLEU) and checkpoints, resumes exactly from the newest
checkpoint, and at the end averages the last checkpoints and scores the test
set. `evaluate(config, workdir, checkpoint)` scores a saved or averaged
checkpoint. Entry points: experiments/wmt.py, experiments/iwslt.py.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import sacrebleu
import tqdm

from experiments import checkpointing
from experiments import decode
from experiments import train_lib
from experiments.data import TokenBatcher, load_translation
from experiments.models import Transformer

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


class Experiment(train_lib.Experiment):
  """Data, model, mesh, optimizer and jitted steps of one translation run."""
  model_class = Transformer
  model_inputs = ('inputs', 'targets')
  checkpoint_choices = f"'{AVERAGED}', 'latest' or a step number"

  def load_data(self, cache_dir: str):
    return load_translation(self.config.data, cache_dir=cache_dir)

  def make_batcher(self) -> TokenBatcher:
    return TokenBatcher(
        self.data.train, max_tokens=self.config.data.max_tokens,
        max_buckets=self.config.data.max_buckets, batch_multiple=self.dp,
        shuffle=True, seed=self.config.seed)

  # ---------------------------------------------------------------- eval --
  def _eval_batches(self, examples, max_tokens):
    return TokenBatcher(examples, max_tokens=max_tokens,
                        max_buckets=self.config.data.max_buckets,
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


  def finish(self, state, mngr, expect, writer) -> dict[str, Any]:
    """Averages the last `decode.average_last` checkpoints into
    <workdir>/averaged and scores the test set with it."""
    steps = checkpointing.averaging_steps(
        str(mngr.directory), self.config.decode.average_last,
        available=mngr.all_steps())
    abstract = checkpointing.abstract_like(self.state, self.state_shardings)
    states = [checkpointing.restore(mngr, s, abstract, expect)[0]
              for s in steps]
    averaged = jax.device_put(checkpointing.average(states),
                              self.state_shardings)
    save_averaged(self.workdir, averaged, dict(expect, steps=steps))
    result, hyps = self.score(averaged, 'test')
    print(f'test (average of steps {steps}): '
          + train_lib.format_metrics(result), flush=True)
    train_lib.log_scalars(writer, int(state.step), 'test', result)
    result['averaged_steps'] = steps
    train_lib.save_results(self.workdir, result,
                           {'test_hypotheses.txt': '\n'.join(hyps) + '\n'})
    return result

  def checkpoint_location(self, checkpoint: str) -> tuple[str, int | None]:
    """'averaged' is <workdir>/averaged; the others as the base's."""
    if checkpoint == AVERAGED:
      return os.path.join(self.workdir, AVERAGED), 0
    return super().checkpoint_location(checkpoint)


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains (resuming), averages the last checkpoints, scores the test set."""
  return Experiment(config, workdir).train_and_evaluate()


def save_averaged(workdir: str, state, meta: dict) -> None:
  """<workdir>/averaged, replaced atomically; `meta['steps']` records the
  checkpoints it averages."""
  checkpointing.write_single(os.path.join(workdir, AVERAGED), state, meta)


def evaluate(config, workdir: str, checkpoint: str = AVERAGED,
             split: str = 'test') -> dict[str, float]:
  """Scores `checkpoint` ('averaged', 'latest' or a step) on `split`."""
  exp = Experiment(config, workdir)
  state, what = exp.load_checkpoint(checkpoint)
  result, _ = exp.score(state, split)
  print(f'{split} ({what}): ' + train_lib.format_metrics(result),
        flush=True)
  return result
