"""Joint source/target vocabularies: whitespace words or sentencepiece.

Every vocabulary starts with the same four specials (fairseq-like):
PAD_ID=0, BOS_ID=1, EOS_ID=2, UNK_ID=3. `encode` appends EOS and never adds
BOS (the model shifts targets right itself). `decode` stops at the first EOS
and drops PAD/BOS.

A vocabulary is saved as one JSON file ({'kind': 'word', 'tokens': [...]} or
{'kind': 'sentencepiece', 'model': <base64 model proto>}); `fingerprint` is a
hash of exactly that content, so a checkpoint can detect a vocabulary
mismatch on resume.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Sequence

import numpy as np

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIALS = ('<pad>', '<s>', '</s>', '<unk>')
BPE_MARKER = '@@'

_log = logging.getLogger(__name__)


def _ids_until_eos(ids) -> list[int]:
  """Token ids up to (excluding) the first EOS, without PAD and BOS."""
  out = []
  for i in np.asarray(ids).reshape(-1).tolist():
    if i == EOS_ID:
      break
    if i not in (PAD_ID, BOS_ID):
      out.append(int(i))
  return out


def remove_bpe(text: str) -> str:
  """Joins subword-nmt BPE pieces: 'ne@@ w york' -> 'new york'."""
  text = (text + ' ').replace(BPE_MARKER + ' ', '')
  return ' '.join(text.split())


class Vocab:
  """Base class: id <-> text mapping shared by source and target."""

  kind = ''

  @property
  def size(self) -> int:
    raise NotImplementedError

  def encode(self, line: str) -> np.ndarray:
    """int32 ids of `line`, with EOS_ID appended."""
    raise NotImplementedError

  def encode_many(self, lines: Sequence[str]) -> list[np.ndarray]:
    return [self.encode(line) for line in lines]

  def decode(self, ids) -> str:
    """Text of `ids`: stops at EOS, drops PAD/BOS, joins subwords."""
    raise NotImplementedError

  def reference(self, line: str) -> str:
    """A stored line as `decode` would print it (for BLEU references)."""
    return ' '.join(line.split())

  def _payload(self) -> dict:
    raise NotImplementedError

  def _serialized(self) -> bytes:
    return json.dumps(self._payload(), sort_keys=True).encode('utf-8')

  @property
  def fingerprint(self) -> str:
    """Hash of the vocabulary contents (16 hex digits)."""
    return hashlib.sha256(self._serialized()).hexdigest()[:16]

  def save(self, path: str | os.PathLike) -> None:
    """Writes the vocabulary as one JSON file (atomically)."""
    _atomic_write(os.fspath(path), self._serialized())

  @classmethod
  def load(cls, path: str | os.PathLike) -> Vocab:
    """Reads a file written by `save` (either kind)."""
    path = os.fspath(path)
    if not os.path.exists(path):
      raise FileNotFoundError(f'vocabulary file {path} does not exist; save '
                              'one with Vocab.save or pass the right path.')
    try:
      with open(path, 'rb') as f:
        payload = json.loads(f.read().decode('utf-8'))
      kind = payload['kind']
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f'{path} is not a vocabulary written by Vocab.save '
                       f'({e}); re-create it.') from e
    if kind == 'word':
      return WordVocab(payload['tokens'])
    if kind == 'sentencepiece':
      return SentencePieceVocab(base64.b64decode(payload['model']))
    raise ValueError(f'{path}: unknown vocabulary kind {kind!r}; expected '
                     "'word' or 'sentencepiece'.")

  def __repr__(self):
    return (f'{type(self).__name__}(size={self.size}, '
            f'fingerprint={self.fingerprint!r})')


class WordVocab(Vocab):
  """Whitespace tokens (for synthetic or already tokenized / BPE'd text).

  `decode` joins tokens with spaces and removes subword-nmt '@@ ' markers.
  Unknown words map to UNK_ID and decode as '<unk>'.
  """

  kind = 'word'

  def __init__(self, tokens: Sequence[str]):
    tokens = list(tokens)
    if tuple(tokens[:4]) != SPECIALS:
      raise ValueError(f'a word vocabulary must start with {SPECIALS}, got '
                       f'{tokens[:4]}.')
    self.tokens = tokens
    self._ids = {t: i for i, t in enumerate(tokens)}
    if len(self._ids) != len(tokens):
      raise ValueError('a word vocabulary has duplicate tokens.')

  @classmethod
  def build(cls, lines: Iterable[str], max_size: int = 0) -> WordVocab:
    """Most frequent words first (ties: alphabetical), min count 1.

    max_size caps the total size including the 4 specials (0 = no cap).
    """
    counts = collections.Counter()
    for line in lines:
      counts.update(line.split())
    for special in SPECIALS:
      counts.pop(special, None)
    words = sorted(counts, key=lambda w: (-counts[w], w))
    if max_size:
      if max_size <= len(SPECIALS):
        raise ValueError(f'cfg.vocab_size={max_size} leaves no room for '
                         f'words after the {len(SPECIALS)} specials; use 0 '
                         '(all words) or a larger size.')
      words = words[:max_size - len(SPECIALS)]
    return cls([*SPECIALS, *words])

  @property
  def size(self) -> int:
    return len(self.tokens)

  def encode(self, line: str) -> np.ndarray:
    ids = [self._ids.get(t, UNK_ID) for t in line.split()]
    ids.append(EOS_ID)
    return np.asarray(ids, np.int32)

  def decode(self, ids) -> str:
    return remove_bpe(' '.join(self.tokens[i] for i in _ids_until_eos(ids)))

  def reference(self, line: str) -> str:
    return remove_bpe(line)

  def _payload(self) -> dict:
    return {'kind': self.kind, 'tokens': self.tokens}


class SentencePieceVocab(Vocab):
  """A sentencepiece model whose first ids are PAD, BOS, EOS, UNK."""

  kind = 'sentencepiece'

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self.model_proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
    specials = (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id(),
                self._sp.unk_id())
    if specials != (PAD_ID, BOS_ID, EOS_ID, UNK_ID):
      raise ValueError('the sentencepiece model must use pad/bos/eos/unk ids '
                       f'0/1/2/3, got {specials}; train it with '
                       'train_sentencepiece.')

  @property
  def size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, line: str) -> np.ndarray:
    return np.asarray([*self._sp.encode(line), EOS_ID], np.int32)

  def encode_many(self, lines: Sequence[str]) -> list[np.ndarray]:
    """Batch encoding (multi-threaded inside sentencepiece)."""
    return [np.asarray([*ids, EOS_ID], np.int32)
            for ids in self._sp.encode(list(lines))]

  def decode(self, ids) -> str:
    return self._sp.decode(_ids_until_eos(ids))

  def pieces(self, line: str) -> list[str]:
    return self._sp.encode(line, out_type=str)

  def _payload(self) -> dict:
    return {'kind': self.kind,
            'model': base64.b64encode(self.model_proto).decode('ascii')}


def train_sentencepiece(lines: Sequence[str], vocab_size: int, cache_dir: str,
                        data_fingerprint: str, model_type: str = 'unigram',
                        character_coverage: float = 1.0,
                        input_sentence_size: int = 1_000_000,
                        ) -> SentencePieceVocab:
  """Trains a joint sentencepiece vocabulary, or loads it from the cache.

  The cache file is `{cache_dir}/spm_<key>.json` where key hashes the data
  fingerprint and every training setting, so a second call with the same
  data and settings loads the file instead of training. vocab_size is a soft
  limit (a tiny corpus gets a smaller vocabulary instead of an error).
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  if vocab_size <= len(SPECIALS):
    raise ValueError(f'cfg.vocab_size={vocab_size}: sentencepiece needs a '
                     f'size above {len(SPECIALS)} (e.g. 8000).')
  if model_type not in ('unigram', 'bpe'):
    raise ValueError(f"cfg.spm_model_type={model_type!r}: use 'unigram' or "
                     "'bpe'.")
  settings = dict(vocab_size=vocab_size, model_type=model_type,
                  character_coverage=character_coverage,
                  input_sentence_size=input_sentence_size,
                  spm_version=spm.__version__, data=data_fingerprint)
  key = hashlib.sha256(
      json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
  path = os.path.join(cache_dir, f'spm_{key}.json')
  if os.path.exists(path):
    _log.info('sentencepiece vocabulary from cache %s', path)
    return Vocab.load(path)
  start = time.time()
  model = io.BytesIO()
  spm.set_random_generator_seed(0)  # the input sampling is reproducible
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model,
      vocab_size=vocab_size, model_type=model_type,
      character_coverage=character_coverage,
      input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
      hard_vocab_limit=False, pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      unk_id=UNK_ID, pad_piece=SPECIALS[0], bos_piece=SPECIALS[1],
      eos_piece=SPECIALS[2], unk_piece=SPECIALS[3],
      num_threads=os.cpu_count() or 1, minloglevel=2)
  vocab = SentencePieceVocab(model.getvalue())
  os.makedirs(cache_dir, exist_ok=True)
  vocab.save(path)
  _log.info('trained sentencepiece (%d pieces) in %.1f s -> %s', vocab.size,
            time.time() - start, path)
  return vocab


def _atomic_write(path: str, data: bytes) -> None:
  directory = os.path.dirname(path) or '.'
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp_vocab_')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
