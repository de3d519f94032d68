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

from typing import Any

from experiments import ngpt
from experiments import train_lib
from experiments.data import lm as lm_data
from experiments.models import LanguageModel

# config.model.architecture -> the model (models.ARCHITECTURES).
ARCHITECTURES = {'transformer': LanguageModel, 'ngpt': ngpt.NGPT}


class Experiment(train_lib.Experiment):
  """Corpus, model, mesh, optimizer and jitted steps of one LM run.

  `config.model.architecture` picks the model ('transformer' when absent;
  'ngpt': `experiments.ngpt.NGPT`, whose `project_params` runs after every
  optimizer step)."""
  model_inputs = ('inputs',)

  @property
  def model_class(self):
    return ARCHITECTURES[self.config.model.get('architecture',
                                               'transformer')]

  checkpoint_choices = ("'latest' or a step number (the language model "
                        'keeps no averaged checkpoint)')
  min_split_size = 2  # a stream of n tokens has n - 1 targets

  def load_data(self, cache_dir: str) -> lm_data.LMData:
    return lm_data.load_lm(self.config.data, cache_dir=cache_dir)

  def make_batcher(self) -> lm_data.StreamBatcher:
    cfg = self.config.data
    return lm_data.StreamBatcher(
        self.data.train, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
        shuffle=True, seed=self.config.seed, batch_multiple=self.dp)

  def perplexity(self, state, split: str) -> dict[str, float]:
    """Loss, nll and perplexity over the whole `split` stream."""
    cfg = self.config.data
    batches = lm_data.eval_batches(
        getattr(self.data, split), batch_size=cfg.eval_batch_size,
        seq_len=cfg.eval_seq_len, batch_multiple=self.dp)
    return train_lib.evaluate_loss(self.eval_step, state, batches, self.mesh)

  def validate(self, state) -> dict[str, float]:
    """Loss, nll and perplexity over the whole valid stream."""
    return self.perplexity(state, 'valid')

  def finish(self, state, mngr, expect, writer) -> dict[str, Any]:
    """The final model's perplexity over the complete valid and test
    streams."""
    del mngr, expect
    result = {split: self.perplexity(state, split)
              for split in ('valid', 'test')}
    for split, values in result.items():
      print(f'{split}: ' + train_lib.format_metrics(values), flush=True)
      train_lib.log_scalars(writer, int(state.step), split, values)
    result['step'] = int(state.step)
    train_lib.save_results(self.workdir, result)
    return result


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains (resuming), then scores the valid and test streams."""
  return Experiment(config, workdir).train_and_evaluate()


def evaluate(config, workdir: str, checkpoint: str = 'latest',
             split: str = 'test') -> dict[str, float]:
  """Perplexity of checkpoint 'latest' or a step number on `split`."""
  exp = Experiment(config, workdir)
  state, what = exp.load_checkpoint(checkpoint)
  result = exp.perplexity(state, split)
  print(f'{split} ({what}): ' + train_lib.format_metrics(result),
        flush=True)
  return result
