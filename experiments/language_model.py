"""Causal Transformer language modelling: training and exact perplexity.

`train_and_evaluate(config, workdir)` trains on contiguous fixed-length
segments of the train stream with periodic validation and checkpoints
(`train_lib.fit`: exact resume), then reports the perplexity of the final
model over the complete valid and test streams. `evaluate(config, workdir,
checkpoint, split)` scores a saved checkpoint. Entry point: experiments/lm.py.

Perplexity is exp(total nll / number of tokens) with every token of a split
predicted exactly once (including each line's `<eos>`; the first token after
an `<eos>`), each segment of `eval_seq_len` tokens starting a fresh context.
Evaluation uses the norms' running statistics, so no prediction depends on
a later token; during training the batch-statistic norms (BatchNorm, PN-V,
PowerNorm in its warmup, UN) normalise with statistics of the whole batch,
which include later positions of the same segment (see the README).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from experiments import checkpointing
from experiments import sharding
from experiments import train_lib
from experiments.data import lm as lm_data
from experiments.models import LanguageModel, TransformerConfig


class Experiment:
  """Corpus, model, mesh, optimizer and jitted steps of one LM run."""

  def __init__(self, config, workdir: str, devices=None):
    self.config, self.workdir = config, workdir
    self.mesh = sharding.make_mesh(config.mesh, devices)
    self.rules = sharding.rules(config.mesh)
    self.data = lm_data.load_lm(config.data,
                                cache_dir=os.path.join(workdir, 'vocab'))
    size = self.data.vocab.size
    self.model = LanguageModel(TransformerConfig.from_config(
        config.model, size))
    self.eval_model = LanguageModel(TransformerConfig.from_config(
        config.model, size, deterministic=True))
    self.schedule = train_lib.make_schedule(config.schedule)
    self.tx = train_lib.make_optimizer(config.optim, self.schedule)
    self.dp = sharding.data_parallel_size(self.mesh)
    self.batcher = lm_data.StreamBatcher(
        self.data.train, batch_size=config.data.batch_size,
        seq_len=config.data.seq_len, shuffle=True, seed=config.seed,
        batch_multiple=self.dp)
    model, eval_model = self.model, self.eval_model
    tokens = jnp.ones((self.dp, 8), jnp.int32)  # shapes only

    def init_variables(rng):
      return model.init({'params': rng, 'dropout': rng}, tokens, train=False)

    def logits_fn(variables, batch, rngs, mutable):
      return model.apply(variables, batch['inputs'], train=True, rngs=rngs,
                         mutable=mutable)

    def eval_logits(variables, batch):
      return eval_model.apply(variables, batch['inputs'], train=False)

    (self.state, self.state_shardings, self.train_step, self.probe_step,
     self.eval_step) = train_lib.build_steps(
         init_variables, logits_fn, eval_logits, self.tx, self.schedule,
         seed=config.seed, label_smoothing=config.optim.label_smoothing,
         mesh=self.mesh, logical_rules=self.rules,
         exact_gradient=config.train.probe_exact_gradient)

  def perplexity(self, state, split: str) -> dict[str, float]:
    """Loss, nll and perplexity over the whole `split` stream."""
    cfg = self.config.data
    batches = lm_data.eval_batches(
        getattr(self.data, split), batch_size=cfg.eval_batch_size,
        seq_len=cfg.eval_seq_len, batch_multiple=self.dp)
    return train_lib.evaluate_loss(self.eval_step, state, batches, self.mesh)

  def validate(self, state) -> dict[str, float]:
    return self.perplexity(state, 'valid')


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  exp = Experiment(config, workdir)
  state, mngr, _, writer = train_lib.train(exp, config, workdir)
  mngr.close()
  result = {split: exp.perplexity(state, split) for split in ('valid', 'test')}
  for split, values in result.items():
    print(f'{split}: ' + train_lib.format_metrics(values), flush=True)
    train_lib.log_scalars(writer, int(state.step), split, values)
  result['step'] = int(state.step)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(result, f, indent=2)
  return result


def evaluate(config, workdir: str, checkpoint: str = 'latest',
             split: str = 'test') -> dict[str, float]:
  """Perplexity of checkpoint 'latest' or a step number on `split`."""
  exp = Experiment(config, workdir)
  expect = {'vocab_fingerprint': exp.data.fingerprint}
  directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  if not os.path.isdir(directory):
    raise checkpointing.CheckpointMismatch(
        f'no checkpoint directory {directory}; train first (same --workdir).')
  abstract = checkpointing.abstract_like(exp.state, exp.state_shardings)
  with ocp.CheckpointManager(directory) as m:
    if checkpoint == 'latest':
      step = m.latest_step()
    elif checkpoint.isdigit():
      step = int(checkpoint)
    else:
      raise ValueError(f'--checkpoint={checkpoint}: the language model '
                       "keeps no averaged checkpoint; use 'latest' or a "
                       'step number.')
    if step is None:
      raise checkpointing.CheckpointMismatch(
          f'{directory} holds no complete checkpoint; train first.')
    state, _ = checkpointing.restore(m, step, abstract, expect)
  result = exp.perplexity(state, split)
  print(f'{split} (step {step}): ' + train_lib.format_metrics(result),
        flush=True)
  return result
