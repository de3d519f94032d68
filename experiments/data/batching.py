"""fairseq-style token-count batching with fixed-shape length buckets.

Every example goes to the smallest bucket length L >= max(len(src), len(tgt))
and a bucket's batches all have the shape [B_L, L] with

    B_L = max(batch_multiple,
              (max_tokens // L) // batch_multiple * batch_multiple)

so jit compiles one program per bucket and B_L splits evenly over
`batch_multiple` data-parallel devices. (B_L * L <= max_tokens unless
max_tokens < batch_multiple * L, which is logged as a warning.)

Training order (shuffle=True) is a pure function of (seed, epoch): each
bucket's examples are permuted, cut into full batches, and the batches of all
buckets are shuffled together. The examples of a bucket that do not fill a
last batch are DROPPED for that epoch; the next epoch's permutation differs,
so every example is still seen regularly. Because the plan is recomputed
from (seed, epoch), `state()` is just {'epoch', 'position', 'seed'} and a
restored batcher continues bit-identically.

Evaluation (`eval_batches`) covers every example exactly once, sorted by
length, with filler rows (all PAD, weights 0, index -1) completing the last
batch of each bucket.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np

from experiments.data.vocab import PAD_ID

Example = tuple[np.ndarray, np.ndarray]
_log = logging.getLogger(__name__)


MAX_BUCKETS = 8  # the default: each bucket compiles its own programs


def default_bucket_lengths(lengths: Sequence[int],
                           max_buckets: int = MAX_BUCKETS,
                           multiple: int = 8) -> list[int]:
  """At most `max_buckets` multiples of `multiple` with the least padding.

  Chooses the buckets that minimize the total padded length (dynamic
  programming over the lengths rounded up to `multiple`); the last bucket is
  the longest example rounded up, so every example fits.
  """
  if not len(lengths):
    return [multiple]
  rounded = -(-np.asarray(lengths, np.int64) // multiple) * multiple
  values, counts = np.unique(rounded, return_counts=True)
  below = np.concatenate([[0], np.cumsum(counts)])  # examples < values[j]
  n = len(values)
  # best[j]: least padded length of the examples <= values[j-1] when
  # values[j-1] is a bucket; choice[k][j]: the previous bucket's end.
  best = np.full(n + 1, np.inf)
  best[0] = 0.0
  choice = []
  for _ in range(min(max_buckets, n)):
    new_best = np.full(n + 1, np.inf)
    prev = np.zeros(n + 1, np.int64)
    for j in range(1, n + 1):
      costs = best[:j] + (below[j] - below[:j]) * values[j - 1]
      prev[j] = int(np.argmin(costs))
      new_best[j] = costs[prev[j]]
    best = new_best
    choice.append(prev)
  buckets, j = [], n
  for prev in reversed(choice):
    if j == 0:
      break
    buckets.append(int(values[j - 1]))
    j = int(prev[j])
  return sorted(buckets)


def position_state(epoch: int, position: int, seed: int) -> dict:
  """The JSON-serializable resume point of a seeded batch plan."""
  return {'epoch': int(epoch), 'position': int(position), 'seed': int(seed)}


def parse_position_state(owner: str, state: dict, seed: int,
                         per_epoch: int, saved_for: str) -> tuple[int, int]:
  """(epoch, position) of `state`, checked against this batcher's seed and
  batches per epoch; errors name `owner` and what the state was saved for."""
  try:
    epoch, position, saved_seed = (int(state['epoch']),
                                   int(state['position']), int(state['seed']))
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f'{owner}.restore: bad state {state!r} ({e}); '
                     "expected {'epoch', 'position', 'seed'}.") from None
  if saved_seed != seed:
    raise ValueError(f'{owner}.restore: state seed {saved_seed} != batcher '
                     f'seed {seed}; build the batcher with seed={saved_seed}.')
  if epoch < 0 or not 0 <= position <= per_epoch:
    raise ValueError(f'{owner}.restore: state {state!r} is out of range '
                     f'({per_epoch} batches/epoch); was it saved for other '
                     f'{saved_for}?')
  return epoch, position


class TokenBatcher:
  """Token-count batches [B_L, L] per length bucket; deterministic, resumable.

  Iterating yields dict(inputs=int32[B, L], targets=int32[B, L],
  weights=float32[B, L]); weights are 1 on real target tokens (incl. EOS).
  With shuffle=True iteration is infinite (epoch after epoch); with
  shuffle=False it is one pass over full batches in length order. All
  iterators of one batcher share its position (see `state`/`restore`).
  Without `bucket_lengths`, `default_bucket_lengths` picks at most
  `max_buckets` from the examples' lengths.
  """

  def __init__(self, examples: Sequence[Example], *, max_tokens: int,
               bucket_lengths: Sequence[int] | None = None,
               max_buckets: int = MAX_BUCKETS, batch_multiple: int = 1,
               shuffle: bool = True, seed: int = 0):
    if max_tokens <= 0:
      raise ValueError(f'max_tokens must be positive, got {max_tokens}.')
    if max_buckets <= 0:
      raise ValueError(f'max_buckets must be positive, got {max_buckets}.')
    if batch_multiple <= 0:
      raise ValueError(f'batch_multiple must be positive, got '
                       f'{batch_multiple}.')
    self.examples = list(examples)
    self.max_tokens = int(max_tokens)
    self.batch_multiple = int(batch_multiple)
    self.shuffle = bool(shuffle)
    self.seed = int(seed)
    lengths = np.asarray([max(len(s), len(t)) for s, t in self.examples],
                         np.int64)
    if bucket_lengths is None:
      bucket_lengths = default_bucket_lengths(lengths, max_buckets)
    self.bucket_lengths = sorted({int(b) for b in bucket_lengths})
    if not self.bucket_lengths or self.bucket_lengths[0] <= 0:
      raise ValueError(f'bucket_lengths must be positive, got '
                       f'{list(bucket_lengths)}.')
    if len(lengths) and lengths.max() > self.bucket_lengths[-1]:
      index = int(np.argmax(lengths))
      raise ValueError(f'example {index} has length {lengths[index]} > the '
                       f'largest bucket {self.bucket_lengths[-1]}; add a '
                       'longer bucket or filter/truncate to max_len.')
    bucket_of = np.searchsorted(self.bucket_lengths, lengths, side='left')
    order = np.lexsort((np.arange(len(lengths)), lengths))  # by length, index
    self._members = [order[bucket_of[order] == b]
                     for b in range(len(self.bucket_lengths))]
    self.batch_sizes = {}
    for length in self.bucket_lengths:
      size = (self.max_tokens // length) // self.batch_multiple
      size = max(self.batch_multiple, size * self.batch_multiple)
      if size * length > self.max_tokens:
        _log.warning('bucket %d: batch %d x %d exceeds max_tokens=%d '
                     '(batch_multiple=%d)', length, size, length,
                     self.max_tokens, self.batch_multiple)
      self.batch_sizes[length] = size
    self._epoch = 0
    self._position = 0
    self._cached_plan: tuple[int, list[tuple[int, np.ndarray]]] | None = None

  # ------------------------------------------------------------------ plan

  def _plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
    """The epoch's batches: [(bucket length, example indices)]."""
    if self._cached_plan is not None and self._cached_plan[0] == epoch:
      return self._cached_plan[1]
    rng = np.random.default_rng([self.seed, epoch])
    batches = []
    for length, members in zip(self.bucket_lengths, self._members):
      if self.shuffle:
        members = rng.permutation(members)
      size = self.batch_sizes[length]
      for start in range(0, len(members) - size + 1, size):
        batches.append((length, members[start:start + size]))
    if self.shuffle:
      batches = [batches[i] for i in rng.permutation(len(batches))]
    self._cached_plan = (epoch, batches)
    return batches

  def batches_per_epoch(self) -> int:
    """Full batches per epoch (leftovers of each bucket are dropped)."""
    return sum(len(m) // self.batch_sizes[length]
               for length, m in zip(self.bucket_lengths, self._members))

  # -------------------------------------------------------------- batches

  def _make_batch(self, length: int, indices: Sequence[int],
                  size: int) -> dict[str, np.ndarray]:
    inputs = np.full((size, length), PAD_ID, np.int32)
    targets = np.full((size, length), PAD_ID, np.int32)
    for row, index in enumerate(indices):
      src, tgt = self.examples[index]
      inputs[row, :len(src)] = src
      targets[row, :len(tgt)] = tgt
    weights = (targets != PAD_ID).astype(np.float32)
    return dict(inputs=inputs, targets=targets, weights=weights)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    if self.batches_per_epoch() == 0:
      raise ValueError(
          f'TokenBatcher: no bucket has a full batch ({len(self.examples)} '
          f'examples, batch sizes {self.batch_sizes}); lower max_tokens or '
          'batch_multiple, or use more data.')
    while True:
      self._normalize()
      if not self.shuffle and self._epoch > 0:
        return
      length, indices = self._plan(self._epoch)[self._position]
      self._position += 1  # state() now points at the next batch
      yield self._make_batch(length, indices, len(indices))

  def eval_batches(self) -> list[dict[str, np.ndarray]]:
    """One ordered pass over ALL examples, with 'index' int32[B] (-1: filler).

    Ordered by bucket, then length, then original index. The last batch of a
    bucket has `batch_multiple * 2**j` rows, the fewest that hold its
    examples (at most the bucket's batch size), completed with filler rows
    (all PAD, weights 0): filler costs at most as much as the examples (beam
    search decodes every row), and each bucket compiles at most
    log2(batch size) extra shapes.
    """
    batches = []
    for length, members in zip(self.bucket_lengths, self._members):
      full = self.batch_sizes[length]
      for start in range(0, len(members), full):
        indices = members[start:start + full]
        size = self.batch_multiple
        while size < len(indices):
          size *= 2
        size = min(size, full)
        batch = self._make_batch(length, indices, size)
        index = np.full((size,), -1, np.int32)
        index[:len(indices)] = indices
        batch['index'] = index
        batches.append(batch)
    return batches

  # ---------------------------------------------------------------- state

  def _normalize(self) -> None:
    per_epoch = self.batches_per_epoch()
    if per_epoch and self._position >= per_epoch:
      self._epoch += self._position // per_epoch
      self._position %= per_epoch

  def state(self) -> dict:
    """JSON-serializable position: the next batch is (epoch, position)."""
    self._normalize()
    return position_state(self._epoch, self._position, self.seed)

  def restore(self, state: dict) -> None:
    """Continues exactly where the batcher that produced `state` was."""
    self._epoch, self._position = parse_position_state(
        'TokenBatcher', state, self.seed, self.batches_per_epoch(),
        'data or max_tokens')
