"""What the experiments' tests share: tiny translation batches, straight and
resumed runs, and reading a run's checkpoints."""

import os

import numpy as np

from experiments import checkpointing
from experiments import models

PAD, BOS, EOS = models.PAD_ID, models.BOS_ID, models.EOS_ID
VOCAB = 13

# Right-padded sources and targets (EOS-terminated), varied lengths.
INPUTS = np.array([[5, 6, 7, 8, 9, EOS], [10, 11, EOS, PAD, PAD, PAD],
                   [4, 12, 6, EOS, PAD, PAD], [7, EOS, PAD, PAD, PAD, PAD]],
                  np.int32)
TARGETS = np.array([[3, 4, 5, EOS, PAD], [6, 7, 8, 9, EOS],
                    [10, EOS, PAD, PAD, PAD], [11, 12, EOS, PAD, PAD]],
                   np.int32)


def checkpoint(workdir: str, step: int):
  """(state, meta) of checkpoint `step` of the run, as saved."""
  return checkpointing.read(os.path.join(workdir, 'checkpoints'), step)[:2]


def straight_and_resumed(train_and_evaluate, config, tmp_path_factory,
                         prefix: str):
  """(straight workdir, resumed workdir, straight result): 6 steps in one go,
  and 3 steps, then the same command resumed to 6."""
  straight = str(tmp_path_factory.mktemp(f'{prefix}straight'))
  resumed = str(tmp_path_factory.mktemp(f'{prefix}resumed'))
  result = train_and_evaluate(config(6), straight)
  train_and_evaluate(config(3), resumed)
  train_and_evaluate(config(6), resumed)  # resumes at 3
  return straight, resumed, result
