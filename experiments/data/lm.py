"""Word-level language-model data: corpus -> vocabulary -> int32 streams.

    from experiments.data import load_lm, StreamBatcher, eval_batches

    data = load_lm(config.data, cache_dir=workdir)
    train = StreamBatcher(data.train, batch_size=64, seq_len=256, seed=0,
                          batch_multiple=devices)
    for batch in train: ...     # inputs/targets int32 [B, L], weights float32
    valid = eval_batches(data.valid, batch_size=64, seq_len=256,
                         batch_multiple=devices)

Corpus conventions (Transformer-XL's for PTB / WikiText): every line of a
split becomes `line.split() + ['<eos>']` (EOS_ID); empty lines, which
WikiText has between paragraphs, are kept and give one `<eos>` each. A
split's stream is the concatenation of its encoded lines. The literal
`<unk>` of PTB / WikiText maps to UNK_ID. The WordVocab (4 specials, then
the words by decreasing frequency) is built from the train split only, so
valid/test words it lacks map to UNK_ID too (counted as {split}_oov in
`stats`).

Config fields (an ml_collections.ConfigDict, a dict or any attribute object;
optional ones default as shown):

  source              'synthetic' | 'local' | 'tfds'
  path                local: the directory of the files
  train_file='', valid_file='', test_file=''
                      local: file names inside path; an empty one is found
                      by the first standard layout present: ptb.{split}.txt
                      (Mikolov PTB), wiki.{split}.tokens (WikiText-2/103),
                      {split}.txt. A name may also exist as name.gz.
  lowercase=False     lowercases every line before the vocabulary is built
  vocab_size=0        cap incl. the 4 specials (0 = every train word)
  tfds_name='wikitext103', tfds_data_dir='' (tfds default), tfds_module=''
                      (the module to import to register another builder),
  tfds_splits={'train': 'train', 'valid': 'validation', 'test': 'test'},
  text_field='text'   the example feature holding one line
  synthetic_seed=0, synthetic_train_lines=30000,
  synthetic_valid_lines=2500, synthetic_test_lines=2500

The synthetic corpus ('synthetic'): short stories in a tiny English-like
language (245 word types), generated offline and deterministically from
(seed, split), with structure that only context can predict:

    = felix and the big ring =
    felix lived in the mountain with seven ducks and his friend eva .
    eva said " new hat old " and felix said " new hat old " too .
    the goats beside the lamp that felix liked wait .
    he counted his ducks : one two three four five six seven .
    the basket near the ducks behind the map was heavy .
    at night he went back to the mountain .
    the kites ( that he bought beside the kites ) play .
    then felix pushed his big ring to the library .
    and so felix and the big ring stayed in the mountain .
    <empty line>

  * coreference: he/his or she/her follow the hero's gender; the hero's and
    the friend's names, the place, the pets and the title's adjective and
    noun recur lines later;
  * number agreement across attractors: the verb (wait/waits, was/were)
    agrees with the head noun, not with the nouns in between;
  * counting: 'counted his ducks : one ... seven' stops at the number of the
    introduction; copying: the second quote repeats the first;
  * matched brackets and quotes.

`stats['{split}_oracle_ppl']` is exp(the generator's mean negative log
likelihood per token): the perplexity a perfect model reaches with the whole
story in context (every line has one derivation, so it is exact). With the
defaults (313k train, 26k valid tokens) it is 2.1 on valid, where the add-one
unigram (`stats['valid_unigram_ppl']`, logged for every source) has 83, a
Witten-Bell bigram 8.7 and 4-gram 5.1: the gap from 5.1 to 2.1 needs the
context beyond the last few words. (Memory-less segments of eval_batches
start without their story's beginning, so a model gets somewhat above 2.1.)
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from experiments.data import batching
from experiments.data import sources
from experiments.data.vocab import EOS_ID, PAD_ID, UNK_ID, WordVocab

__all__ = ['LMData', 'StreamBatcher', 'eval_batches', 'load_lm']

_log = logging.getLogger(__name__)
SPLITS = sources.SPLITS
LAYOUTS = ('ptb.{}.txt', 'wiki.{}.tokens', '{}.txt')
Lines = dict[str, list[str]]


@dataclasses.dataclass
class LMData:
  """int32 token streams of each split (see the module docstring).

  fingerprint == vocab.fingerprint. stats: per split {split}_lines,
  _empty_lines, _tokens (== len(stream), one EOS per line), _unk (tokens
  that are UNK_ID), _oov (words not in the vocabulary, the literal `<unk>`
  excluded), {split}_unigram_ppl (valid/test under the add-one unigram of
  train), vocab_size, source, timings; synthetic: {split}_oracle_ppl.
  """
  vocab: WordVocab
  train: np.ndarray
  valid: np.ndarray
  test: np.ndarray
  fingerprint: str
  stats: dict[str, Any] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------- local files


def _existing(directory: str, name: str) -> str | None:
  for candidate in (name, name + '.gz'):
    path = os.path.join(directory, candidate)
    if os.path.isfile(path):
      return path
  return None


def local_files(cfg: Any) -> dict[str, str]:
  """The path of each split's file (see the module docstring)."""
  directory = sources.readable_directory(
      str(sources.cfg_get(cfg, 'path', required=True)), 'cfg.path',
      'point cfg.path at a directory with ptb.{train,valid,test}.txt, '
      'wiki.{train,valid,test}.tokens or {train,valid,test}.txt files.')
  names = {split: sources.cfg_get(cfg, f'{split}_file', '') or ''
           for split in SPLITS}
  auto = [split for split in SPLITS if not names[split]]
  layout = next((layout for layout in LAYOUTS if any(
      _existing(directory, layout.format(split)) for split in auto)), None)
  if auto and layout is None:
    tried = ', '.join(layout.format(auto[0]) for layout in LAYOUTS)
    raise FileNotFoundError(
        f'cfg.path={directory} has no {auto[0]} file of a standard layout '
        f'(tried {tried}, each also as .gz); set cfg.{auto[0]}_file to its '
        'name there.')
  paths = {}
  for split in SPLITS:
    name = names[split] or layout.format(split)
    path = _existing(directory, name)
    if path is None:
      found = '' if names[split] else f' (the layout {layout} found there)'
      raise FileNotFoundError(
          f'{split} split: file {os.path.join(directory, name)} (or '
          f'{name}.gz){found} not found; set cfg.{split}_file to the name '
          f'of the {split} file in cfg.path={directory}.')
    paths[split] = path
  return paths


def read_local(cfg: Any, stats: dict) -> Lines:
  paths = local_files(cfg)
  for split, path in paths.items():
    stats[f'{split}_file'] = path
  return {split: sources.read_lines(path, allow_empty=True)
          for split, path in paths.items()}


# --------------------------------------------------------- tensorflow-datasets


def read_tfds(cfg: Any, stats: dict) -> Lines:
  """One line per example, in index order, of each prepared tfds split."""
  # Registers the project's 'wikitext103' builder (and imports tfds).
  importlib.import_module('experiments.data.wikitext103')
  name = sources.cfg_get(cfg, 'tfds_name', '') or 'wikitext103'
  data_dir = sources.cfg_get(cfg, 'tfds_data_dir', '') or None
  module = sources.import_tfds_module(cfg, name)
  field = sources.cfg_get(cfg, 'text_field', '') or 'text'
  split_names = sources.cfg_get(cfg, 'tfds_splits', None) or {
      'train': 'train', 'valid': 'validation', 'test': 'test'}
  lines = {}
  for split in SPLITS:
    tfds_split = sources.tfds_split_name(split_names, split)
    source = sources.open_tfds_split(name, tfds_split, split, data_dir,
                                     module)
    stats[f'{split}_tfds_split'] = tfds_split
    lines[split] = _read_tfds_lines(source, name, tfds_split, field)
  return lines


def _read_tfds_lines(source, name: str, split: str, field: str) -> list[str]:
  out = []
  count, chunk = len(source), 10_000
  for start in range(0, count, chunk):
    indices = list(range(start, min(count, start + chunk)))
    for index, example in zip(indices, sources.tfds_examples(source,
                                                             indices)):
      out.append(sources.tfds_text(example, field, name, split, index,
                                   'cfg.text_field').strip())
  return out


# -------------------------------------------------------------------- synthetic

_FEMALE = ('alma', 'anna', 'clara', 'dora', 'emma', 'eva', 'greta', 'ida',
           'julia', 'lena', 'lisa', 'maria', 'mia', 'nora', 'olga', 'rosa',
           'sara', 'tina', 'vera', 'zoe')
_MALE = ('ben', 'carl', 'dan', 'emil', 'felix', 'gus', 'hans', 'ivan', 'jon',
         'karl', 'leo', 'max', 'nils', 'otto', 'paul', 'rex', 'sam', 'tom',
         'ugo', 'walt')
_NAMES = tuple((n, 'f') for n in _FEMALE) + tuple((n, 'm') for n in _MALE)
_PRONOUN = {'f': ('she', 'her'), 'm': ('he', 'his')}  # subject, possessive
# (singular, plural); animals can be pets.
_ANIMALS = (('dog', 'dogs'), ('cat', 'cats'), ('bird', 'birds'),
            ('horse', 'horses'), ('fox', 'foxes'), ('mouse', 'mice'),
            ('goat', 'goats'), ('cow', 'cows'), ('duck', 'ducks'),
            ('frog', 'frogs'), ('bee', 'bees'), ('owl', 'owls'),
            ('wolf', 'wolves'), ('rabbit', 'rabbits'), ('pig', 'pigs'),
            ('hen', 'hens'))
_THINGS = (('box', 'boxes'), ('book', 'books'), ('lamp', 'lamps'),
           ('key', 'keys'), ('cup', 'cups'), ('hat', 'hats'),
           ('coat', 'coats'), ('ring', 'rings'), ('bell', 'bells'),
           ('kite', 'kites'), ('ball', 'balls'), ('map', 'maps'),
           ('bag', 'bags'), ('drum', 'drums'), ('coin', 'coins'),
           ('shell', 'shells'), ('stone', 'stones'), ('apple', 'apples'),
           ('basket', 'baskets'), ('letter', 'letters'))
_NOUNS = _ANIMALS + _THINGS
_ADJECTIVES = ('red', 'blue', 'green', 'yellow', 'white', 'black', 'old',
               'new', 'small', 'big', 'tall', 'happy', 'sad', 'quiet', 'loud',
               'warm', 'cold', 'dark', 'bright', 'heavy', 'strange', 'hungry',
               'clean', 'lucky', 'brown', 'tiny', 'shiny', 'soft', 'wet',
               'gray')
_PLACES = ('village', 'forest', 'market', 'river', 'garden', 'harbor',
           'castle', 'valley', 'mill', 'farm', 'bakery', 'school', 'island',
           'meadow', 'city', 'mountain', 'station', 'beach', 'library',
           'church')
_VERBS_PAST = ('found', 'saw', 'took', 'carried', 'painted', 'lost', 'hid',
               'opened', 'cleaned', 'bought', 'sold', 'washed', 'kept',
               'dropped', 'fed', 'followed', 'helped', 'watched', 'liked',
               'chased')
_VERBS_MOVE = ('took', 'carried', 'brought', 'sent', 'rolled', 'pulled',
               'pushed', 'showed')  # 'then she took her red box to the mill'
_VERBS_AGREE = (('sleeps', 'sleep'), ('sings', 'sing'), ('waits', 'wait'),
                ('runs', 'run'), ('jumps', 'jump'), ('rests', 'rest'),
                ('plays', 'play'), ('shines', 'shine'))
_PREPOSITIONS = ('near', 'under', 'behind', 'beside')
_COUNTS = ('one', 'two', 'three', 'four', 'five', 'six', 'seven')
_BABBLE = tuple(_ADJECTIVES) + tuple(s for s, _ in _THINGS)
_BODY_LINES = (3, 8)  # body lines per story, uniform


class _Sampler:
  """random.Random choices that add up their negative log-likelihood."""

  def __init__(self, seed: str):
    self._random = random.Random(seed).random
    self.nll = 0.0

  def pick(self, options: Sequence[Any]) -> Any:
    self.nll += math.log(len(options))
    return options[int(self._random() * len(options))]

  def flip(self, p: float) -> bool:
    if self._random() < p:
      self.nll -= math.log(p)
      return True
    self.nll -= math.log1p(-p)
    return False

  def integer(self, low: int, high: int) -> int:
    """Uniform in [low, high]."""
    return self.pick(range(low, high + 1))


def _agreement_line(s: _Sampler, names: Sequence[str]) -> list[str]:
  """'the cats ( that tom fed near the drum ) sleep .' (head agreement)."""
  number = s.flip(0.5)  # True: plural
  noun = s.pick(_NOUNS)[number]
  modifiers = []
  for _ in range(s.integer(1, 2)):
    if s.flip(0.5):
      modifiers += [s.pick(_PREPOSITIONS), 'the', s.pick(_NOUNS)[s.flip(0.5)]]
    else:
      modifiers += ['that', s.pick(names), s.pick(_VERBS_PAST)]
  if s.flip(0.25):
    modifiers = ['(', *modifiers, ')']
  if s.flip(0.5):
    predicate = ['were' if number else 'was', s.pick(_ADJECTIVES)]
  else:
    predicate = [s.pick(_VERBS_AGREE)[number]]
  return ['the', noun, *modifiers, *predicate, '.']


def _story(s: _Sampler, line_nll: list[float]) -> list[str]:
  """One story's lines (the last one empty); line_nll gets each line's NLL."""
  lines = []

  def add(tokens):
    lines.append(' '.join(tokens))
    line_nll.append(s.nll)
    s.nll = 0.0

  hero = s.integer(0, len(_NAMES) - 1)
  name, gender = _NAMES[hero]
  friend = s.integer(0, len(_NAMES) - 2)  # any other name
  friend = _NAMES[friend + (friend >= hero)][0]
  pronoun, possessive = _PRONOUN[gender]
  adjective, key = s.pick(_ADJECTIVES), s.pick(_THINGS)[0]
  place, count, pets = s.pick(_PLACES), s.integer(2, 7), s.pick(_ANIMALS)[1]
  body = s.integer(*_BODY_LINES)

  def subject():  # drawn only where a line has one
    return name if s.flip(0.5) else pronoun

  add(['=', name, 'and', 'the', adjective, key, '='])
  add([name, 'lived', 'in', 'the', place, 'with', _COUNTS[count - 1], pets,
       'and', possessive, 'friend', friend, '.'])
  for _ in range(body):
    kind = s.integer(0, 5)
    if kind == 0:
      add(_agreement_line(s, (name, friend, pronoun)))
    elif kind == 1:
      add(['then', subject(), s.pick(_VERBS_MOVE), possessive, adjective, key,
           'to', 'the', s.pick(_PLACES), '.'])
    elif kind == 2:
      add([subject(), 'counted', possessive, pets, ':', *_COUNTS[:count], '.'])
    elif kind == 3:
      words = [s.pick(_BABBLE) for _ in range(s.integer(1, 4))]
      add([friend, 'said', '"', *words, '"', 'and', name, 'said', '"',
           *words, '"', 'too', '.'])
    elif kind == 4:
      add([possessive, 'friend', friend, s.pick(_VERBS_PAST), 'the',
           s.pick(_ADJECTIVES), s.pick(_NOUNS)[s.flip(0.5)], '.'])
    else:
      add(['at', 'night', subject(), 'went', 'back', 'to', 'the', place, '.'])
  add(['and', 'so', name, 'and', 'the', adjective, key, 'stayed', 'in',
       'the', place, '.'])
  add([])
  return lines


def synthetic_lines(seed: int, num_lines: int,
                    split: str) -> tuple[list[str], float]:
  """(the first num_lines lines of the split's stories, their total NLL).

  Each split has its own random stream, derived from (seed, split).
  """
  if num_lines < 0:
    raise ValueError(f'synthetic: cfg.synthetic_{split}_lines={num_lines} '
                     'must be >= 0.')
  sampler = _Sampler(f'normjax-lm-synthetic/{seed}/{split}')
  lines: list[str] = []
  line_nll: list[float] = []
  while len(lines) < num_lines:
    lines += _story(sampler, line_nll)
  return lines[:num_lines], float(sum(line_nll[:num_lines]))


SYNTHETIC_DEFAULT_LINES = {'train': 30000, 'valid': 2500, 'test': 2500}


def read_synthetic(cfg: Any, stats: dict) -> Lines:
  seed = int(sources.cfg_get(cfg, 'synthetic_seed', 0) or 0)
  lines = {}
  for split in SPLITS:
    count = sources.cfg_get(cfg, f'synthetic_{split}_lines', None)
    count = SYNTHETIC_DEFAULT_LINES[split] if count is None else int(count)
    lines[split], nll = synthetic_lines(seed, count, split)
    tokens = sum(len(line.split()) + 1 for line in lines[split])
    stats[f'{split}_oracle_ppl'] = (round(math.exp(nll / tokens), 4)
                                    if tokens else None)
  return lines


READERS = {'synthetic': read_synthetic, 'local': read_local, 'tfds': read_tfds}


# ------------------------------------------------------------------- loading


def encode_stream(vocab: WordVocab, lines: Sequence[str]) -> tuple[
    np.ndarray, int]:
  """(concatenated vocab.encode(line) of all lines, number of OOV words).

  OOV words are those not in the vocabulary (the literal `<unk>` is in it).
  """
  index = {token: i for i, token in enumerate(vocab.tokens)}
  get = index.get
  chunks, oov, step = [], 0, 100_000
  for start in range(0, len(lines), step):
    ids: list[int] = []
    for line in lines[start:start + step]:
      ids += [get(word, -1) for word in line.split()]
      ids.append(EOS_ID)
    chunk = np.asarray(ids, np.int32)
    missing = chunk < 0
    oov += int(missing.sum())
    chunk[missing] = UNK_ID
    chunks.append(chunk)
  if not chunks:
    return np.zeros((0,), np.int32), 0
  return np.concatenate(chunks), oov


def _unigram_ppl(train: np.ndarray, stream: np.ndarray, size: int) -> float:
  """Perplexity of `stream` under the add-one smoothed unigram of train."""
  counts = np.bincount(train, minlength=size).astype(np.float64) + 1.0
  log_p = np.log(counts) - np.log(counts.sum())
  return float(np.exp(-log_p[stream].mean()))


def load_lm(cfg: Any, cache_dir: str | None = None) -> LMData:
  """Reads cfg.source, builds the train vocabulary and encodes each split.

  With cache_dir, the vocabulary is also saved as {cache_dir}/vocab.json.
  """
  start = time.time()
  source = sources.cfg_get(cfg, 'source')
  if source not in READERS:
    raise ValueError(f'cfg.source={source!r} is unknown; use one of '
                     f'{tuple(READERS)}.')
  size = int(sources.cfg_get(cfg, 'vocab_size', 0) or 0)
  if size < 0:
    raise ValueError(f'cfg.vocab_size={size} must be >= 0 (0 = every train '
                     'word).')
  stats: dict[str, Any] = {'source': source}
  lines = READERS[source](cfg, stats)
  if sources.cfg_get(cfg, 'lowercase', False):
    lines = {split: [line.lower() for line in v] for split, v in lines.items()}
  stats['read_s'] = round(time.time() - start, 3)

  vocab = WordVocab.build(lines['train'], max_size=size)
  if not any(lines['train']):
    raise ValueError(f"the train split of cfg.source={source!r} has no "
                     f"words ({len(lines['train'])} lines); check the data "
                     '(or cfg.train_file / cfg.synthetic_train_lines).')
  streams = {}
  for split in SPLITS:
    stream, oov = encode_stream(vocab, lines[split])
    streams[split] = stream
    stats[f'{split}_lines'] = len(lines[split])
    stats[f'{split}_empty_lines'] = sum(not line for line in lines[split])
    stats[f'{split}_tokens'] = int(stream.size)
    stats[f'{split}_unk'] = int(np.count_nonzero(stream == UNK_ID))
    stats[f'{split}_oov'] = oov
  for split in ('valid', 'test'):
    if streams[split].size:
      stats[f'{split}_unigram_ppl'] = round(
          _unigram_ppl(streams['train'], streams[split], vocab.size), 3)
  stats['vocab_size'] = vocab.size
  if cache_dir:
    vocab.save(os.path.join(cache_dir, 'vocab.json'))
  stats['load_s'] = round(time.time() - start, 3)
  _log.info('language-model data: %s', stats)
  return LMData(vocab=vocab, train=streams['train'], valid=streams['valid'],
                test=streams['test'], fingerprint=vocab.fingerprint,
                stats=stats)


# ------------------------------------------------------------------ batching


def _check_positive(**values) -> None:
  for name, value in values.items():
    if int(value) <= 0:
      raise ValueError(f'{name} must be positive, got {value}.')


class StreamBatcher:
  """Shuffled full-length segments of a token stream; deterministic, resumable.

  Iterating yields dict(inputs=int32[B, L], targets=int32[B, L],
  weights=float32[B, L]) forever (epoch after epoch); a row is
  inputs = stream[s:s+L], targets = stream[s+1:s+L+1], weights all 1.

  Epoch e draws from np.random.default_rng([seed, e]) an offset o in [0, L),
  cuts the stream after o into the full segments s = o + k*L (those with a
  next token for their last position), permutes them (shuffle=True) and
  takes the first `batches_per_epoch` * B of them; the rest is dropped that
  epoch. batches_per_epoch = ((len(stream) - L) // L) // B is the same for
  every offset. The order is a pure function of (seed, epoch), so `state()`
  is {'epoch', 'position', 'seed'} and `restore` continues bit-identically.
  `iter(batcher)` is the batcher itself: all loops share its position.
  """

  def __init__(self, stream, *, batch_size: int, seq_len: int,
               shuffle: bool = True, seed: int = 0, batch_multiple: int = 1):
    _check_positive(batch_size=batch_size, seq_len=seq_len,
                    batch_multiple=batch_multiple)
    self.batch_size, self.seq_len = int(batch_size), int(seq_len)
    self.batch_multiple = int(batch_multiple)
    if self.batch_size % self.batch_multiple:
      fixed = max(1, self.batch_size // self.batch_multiple)
      raise ValueError(
          f'config.data.batch_size={self.batch_size} is not divisible by the '
          f'{self.batch_multiple} data-parallel devices (batch_multiple); '
          f'set it to a multiple of {self.batch_multiple}, e.g. '
          f'{fixed * self.batch_multiple}.')
    self.stream = np.asarray(stream)
    if self.stream.ndim != 1 or not np.issubdtype(self.stream.dtype,
                                                  np.integer):
      raise ValueError(f'StreamBatcher: the stream must be a 1-D integer '
                       f'array, got {self.stream.dtype}{self.stream.shape}.')
    self.stream = self.stream.astype(np.int32, copy=False)
    self.shuffle, self.seed = bool(shuffle), int(seed)
    if self.batches_per_epoch == 0:
      need = (self.batch_size + 1) * self.seq_len
      raise ValueError(
          f'StreamBatcher: the stream has {self.stream.size} tokens, fewer '
          f'than the {need} that one batch of batch_size={self.batch_size} x '
          f'seq_len={self.seq_len} needs (after an offset < seq_len); use a '
          'larger train split (e.g. more cfg.synthetic_train_lines) or lower '
          'config.data.batch_size / seq_len.')
    self._epoch = 0
    self._position = 0
    self._cached: tuple[int, np.ndarray] | None = None

  @property
  def batches_per_epoch(self) -> int:
    """Full batches per epoch (the same for every epoch's offset)."""
    return max(0, (self.stream.size - self.seq_len) // self.seq_len
               ) // self.batch_size

  def _starts(self, epoch: int) -> np.ndarray:
    """Start of every row of the epoch, int64[batches_per_epoch * B]."""
    if self._cached is not None and self._cached[0] == epoch:
      return self._cached[1]
    rng = np.random.default_rng([self.seed, epoch])
    offset = int(rng.integers(self.seq_len))
    segments = (self.stream.size - 1 - offset) // self.seq_len
    order = (rng.permutation(segments) if self.shuffle
             else np.arange(segments))
    starts = offset + order[:self.batches_per_epoch * self.batch_size] * (
        self.seq_len)
    self._cached = (epoch, starts.astype(np.int64))
    return self._cached[1]

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    self._normalize()
    b = self.batch_size
    starts = self._starts(self._epoch)[self._position * b:
                                       (self._position + 1) * b]
    self._position += 1  # state() now points at the next batch
    window = self.stream[starts[:, None] + np.arange(self.seq_len + 1)]
    return dict(inputs=np.ascontiguousarray(window[:, :-1]),
                targets=np.ascontiguousarray(window[:, 1:]),
                weights=np.ones((b, self.seq_len), np.float32))

  def _normalize(self) -> None:
    if self._position >= self.batches_per_epoch:
      self._epoch += self._position // self.batches_per_epoch
      self._position %= self.batches_per_epoch

  def state(self) -> dict:
    """JSON-serializable position: the next batch is (epoch, position)."""
    self._normalize()
    return batching.position_state(self._epoch, self._position, self.seed)

  def restore(self, state: dict) -> None:
    """Continues exactly where the batcher that produced `state` was."""
    self._epoch, self._position = batching.parse_position_state(
        'StreamBatcher', state, self.seed, self.batches_per_epoch,
        'data, batch_size or seq_len')


def eval_batches(stream, *, batch_size: int, seq_len: int,
                 batch_multiple: int = 1) -> list[dict[str, np.ndarray]]:
  """Every token of `stream` exactly once as a target, in order.

  targets = stream, inputs = [EOS_ID] + stream[:-1] (the first token is
  predicted as after an end of line), cut into consecutive segments of
  seq_len, each a fresh context; the last segment is right-padded (PAD_ID,
  weights 0). Rows are grouped into batches of batch_size rounded up to a
  multiple of batch_multiple; filler rows (all PAD, weights 0) complete the
  last batch. So sum(weights) == len(stream). An empty stream gives [].
  """
  _check_positive(batch_size=batch_size, seq_len=seq_len,
                  batch_multiple=batch_multiple)
  targets = np.asarray(stream).astype(np.int32).reshape(-1)
  n = targets.size
  if not n:
    return []
  rows = -(-int(batch_size) // batch_multiple) * batch_multiple
  segments = -(-n // seq_len)
  batches = -(-segments // rows)
  total = batches * rows * seq_len
  padded = np.full((2, total), PAD_ID, np.int32)
  padded[0, 0] = EOS_ID
  padded[0, 1:n] = targets[:-1]
  padded[1, :n] = targets
  weights = np.zeros((total,), np.float32)
  weights[:n] = 1.0
  shape = (batches, rows, seq_len)
  inputs, targets = padded[0].reshape(shape), padded[1].reshape(shape)
  weights = weights.reshape(shape)
  return [dict(inputs=inputs[i], targets=targets[i], weights=weights[i])
          for i in range(batches)]
