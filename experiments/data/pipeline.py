"""`load_translation`: raw text -> joint vocabulary -> encoded, filtered splits.

Config fields (an ml_collections.ConfigDict, a dict or any attribute object;
optional ones default as shown):

  source              'synthetic' | 'local' | 'tfds'
  path                local: directory with {prefix}{suffix}.{lang}[.gz]
  train_prefix='train', valid_prefix='valid', test_prefix='test', suffix=''
  src_lang, tgt_lang  e.g. 'de', 'en' (file suffixes / tfds feature keys)
  tfds_name, tfds_data_dir='' (tfds default), tfds_module='' (catalogue
                      module to import; guessed for wmt*/ted*/... names),
  tfds_splits={'train': 'train', 'valid': 'validation', 'test': 'test'}
  vocab               'word' | 'sentencepiece'
  vocab_size          sentencepiece size; word: cap incl. the 4 specials
                      (0 = all words)
  spm_model_type='unigram', spm_character_coverage=1.0,
  spm_input_sentence_size=1_000_000 (sentences sampled for training)
  max_len=0           train pairs with a side longer than max_len ids
                      (incl. EOS) are dropped; valid/test sides are
                      truncated to max_len (ending in EOS) and counted
                      (0 = no limit)
  lowercase=False     lowercases all text (references included)
  synthetic_train/valid/test/seed, max_train_examples=0 (0 = all)

The sentencepiece model is trained on train src+tgt (after lowercasing and
max_train_examples) and cached in cache_dir keyed by a hash of the data and
the settings; the second load reads the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from typing import Any

import numpy as np

from experiments.data import sources
from experiments.data.batching import TokenBatcher  # re-exported
from experiments.data.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from experiments.data.vocab import SentencePieceVocab, Vocab, WordVocab
from experiments.data.vocab import train_sentencepiece

__all__ = ['BOS_ID', 'EOS_ID', 'PAD_ID', 'UNK_ID', 'SentencePieceVocab',
           'TokenBatcher', 'TranslationData', 'Vocab', 'WordVocab',
           'load_translation']

Example = tuple[np.ndarray, np.ndarray]
_log = logging.getLogger(__name__)
VOCABS = ('word', 'sentencepiece')


@dataclasses.dataclass
class TranslationData:
  """Encoded splits. Ids are int32, end with EOS_ID and have no BOS.

  valid_refs/test_refs are the stored target lines as `vocab.decode` prints
  text (lowercased if cfg.lowercase, subword-nmt '@@ ' removed for 'word');
  valid_srcs/test_srcs are the source lines. fingerprint == vocab.fingerprint.
  stats: counts (train_dropped_long, valid/test_truncated, ...) and load time.
  """
  vocab: Vocab
  train: list[Example]
  valid: list[Example]
  test: list[Example]
  valid_refs: list[str]
  test_refs: list[str]
  valid_srcs: list[str]
  test_srcs: list[str]
  fingerprint: str
  stats: dict[str, Any] = dataclasses.field(default_factory=dict)


def _data_fingerprint(src: list[str], tgt: list[str]) -> str:
  digest = hashlib.sha256()
  for line in (*src, *tgt):
    digest.update(line.encode('utf-8'))
    digest.update(b'\n')
  return digest.hexdigest()[:16]


def build_vocab(cfg: Any, src: list[str], tgt: list[str],
                cache_dir: str) -> Vocab:
  """The joint vocabulary of the train lines (see the module docstring)."""
  kind = sources.cfg_get(cfg, 'vocab', 'word')
  size = int(sources.cfg_get(cfg, 'vocab_size', 0) or 0)
  if size < 0:
    raise ValueError(f'cfg.vocab_size={size} must be >= 0.')
  if kind == 'word':
    return WordVocab.build([*src, *tgt], max_size=size)
  if kind == 'sentencepiece':
    if not cache_dir:
      raise ValueError("load_translation: cache_dir is required for "
                       "cfg.vocab='sentencepiece' (the model is cached "
                       'there).')
    return train_sentencepiece(
        [*src, *tgt], size, cache_dir, _data_fingerprint(src, tgt),
        model_type=sources.cfg_get(cfg, 'spm_model_type', 'unigram'),
        character_coverage=float(
            sources.cfg_get(cfg, 'spm_character_coverage', 1.0)),
        input_sentence_size=int(
            sources.cfg_get(cfg, 'spm_input_sentence_size', 1_000_000)))
  raise ValueError(f'cfg.vocab={kind!r} is unknown; use one of {VOCABS}.')


def _truncate(ids: np.ndarray, max_len: int) -> np.ndarray:
  out = ids[:max_len].copy()
  out[-1] = EOS_ID
  return out


def load_translation(cfg: Any, cache_dir: str) -> TranslationData:
  """Reads cfg.source, builds the joint vocabulary and encodes every split."""
  start = time.time()
  source = sources.cfg_get(cfg, 'source')
  if source not in sources.READERS:
    raise ValueError(f'cfg.source={source!r} is unknown; use one of '
                     f'{tuple(sources.READERS)}.')
  kind = sources.cfg_get(cfg, 'vocab', 'word')
  if kind not in VOCABS:  # fail before reading a large corpus
    raise ValueError(f'cfg.vocab={kind!r} is unknown; use one of {VOCABS}.')
  max_len = int(sources.cfg_get(cfg, 'max_len', 0) or 0)
  if max_len and max_len < 2:
    raise ValueError(f'cfg.max_len={max_len}: use 0 (no limit) or >= 2.')
  max_train = int(sources.cfg_get(cfg, 'max_train_examples', 0) or 0)
  stats: dict[str, Any] = {'source': source}
  if source == 'tfds':
    splits = sources.read_tfds(cfg, max_train_examples=max_train,
                               stats=stats)
  else:
    splits = sources.READERS[source](cfg)
  if max_train:
    splits['train'] = tuple(side[:max_train] for side in splits['train'])
  if sources.cfg_get(cfg, 'lowercase', False):
    splits = {k: tuple([line.lower() for line in side] for side in v)
              for k, v in splits.items()}
  stats['read_s'] = round(time.time() - start, 3)

  train_src, train_tgt = splits['train']
  if not train_src:
    raise ValueError(f'the train split of cfg.source={source!r} is empty; '
                     'check the data (or cfg.max_train_examples).')
  vocab = build_vocab(cfg, train_src, train_tgt, cache_dir)
  stats['vocab_s'] = round(time.time() - start - stats['read_s'], 3)

  encoded = {k: (vocab.encode_many(v[0]), vocab.encode_many(v[1]))
             for k, v in splits.items()}
  train = list(zip(*encoded['train']))
  if max_len:
    kept = [(s, t) for s, t in train if len(s) <= max_len and
            len(t) <= max_len]
    stats['train_dropped_long'] = len(train) - len(kept)
    train = kept
  if not train:
    raise ValueError(f'cfg.max_len={max_len} drops every train pair; raise '
                     'it.')
  evals = {}
  for split in ('valid', 'test'):
    pairs = list(zip(*encoded[split]))
    if max_len:
      long = [len(s) > max_len or len(t) > max_len for s, t in pairs]
      stats[f'{split}_truncated'] = int(sum(long))
      pairs = [(_truncate(s, max_len), _truncate(t, max_len)) if is_long
               else (s, t) for (s, t), is_long in zip(pairs, long)]
    evals[split] = pairs
  stats.update(
      train_examples=len(train), valid_examples=len(evals['valid']),
      test_examples=len(evals['test']), vocab_size=vocab.size,
      load_s=round(time.time() - start, 3))
  _log.info('translation data: %s', stats)
  return TranslationData(
      vocab=vocab, train=train, valid=evals['valid'], test=evals['test'],
      valid_refs=[vocab.reference(t) for t in splits['valid'][1]],
      test_refs=[vocab.reference(t) for t in splits['test'][1]],
      valid_srcs=list(splits['valid'][0]), test_srcs=list(splits['test'][0]),
      fingerprint=vocab.fingerprint, stats=stats)
