"""Tests of the language-model input pipeline (experiments/data/lm.py)."""

import gzip
import json
import sys
import time
from pathlib import Path

import ml_collections
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))
if getattr(sys.modules.get('experiments'), '__file__', 0) is None:
  # Under plain `pytest tests` (repo root not on sys.path) an earlier test
  # module may have imported tests/experiments as a namespace package.
  del sys.modules['experiments']

# pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.data import EOS_ID, PAD_ID, UNK_ID
from experiments.data import eval_batches, LMData, load_lm, StreamBatcher
from experiments.data import lm
from experiments.data.vocab import Vocab

PTB = REPO.parent / 'shared' / 'data' / 'ptb'


def make_cfg(**overrides) -> ml_collections.ConfigDict:
  """The fields of a language-model data config (synthetic, small)."""
  cfg = ml_collections.ConfigDict(dict(
      source='synthetic', path='', train_file='', valid_file='',
      test_file='', lowercase=False, vocab_size=0, tfds_name='wikitext103',
      tfds_data_dir='',
      tfds_splits=ml_collections.ConfigDict(
          dict(train='train', valid='validation', test='test')),
      text_field='text', synthetic_seed=0, synthetic_train_lines=2000,
      synthetic_valid_lines=200, synthetic_test_lines=100))
  cfg.update(overrides)
  return cfg


def write(path: Path, lines, compress=False, raw: bytes | None = None):
  data = raw if raw is not None else ''.join(f'{l}\n' for l in lines).encode()
  if compress:
    path = path.with_name(path.name + '.gz')
    data = gzip.compress(data)
  path.write_bytes(data)
  return path


# Mikolov PTB style: a space before and after every line, `<unk>` in train.
PTB_SPLITS = {'train': [' the cat sat ', ' the dog <unk> ran ', ' a cat '],
              'valid': [' the bird sat ', ' a dog '],
              'test': [' the cat ']}
# train counts: cat 2, the 2, then a dog ran sat (1 each, alphabetical).
PTB_IDS = {'cat': 4, 'the': 5, 'a': 6, 'dog': 7, 'ran': 8, 'sat': 9}
PTB_STREAMS = {
    'train': [5, 4, 9, EOS_ID, 5, 7, UNK_ID, 8, EOS_ID, 6, 4, EOS_ID],
    'valid': [5, UNK_ID, 9, EOS_ID, 6, 7, EOS_ID],  # 'bird' is OOV
    'test': [5, 4, EOS_ID]}

# WikiText style: empty lines around headings and paragraphs.
WIKI_SPLITS = {'train': ['', ' = A = ', '', ' b a <unk> a ', ''],
               'valid': ['', ' a c ', ''],
               'test': [' = b = ']}
# train counts: = 2, a 2 ('=' < 'a'), then A, b.
WIKI_STREAMS = {
    'train': [EOS_ID, 4, 6, 4, EOS_ID, EOS_ID, 7, 5, UNK_ID, 5, EOS_ID,
              EOS_ID],
    'valid': [EOS_ID, 5, UNK_ID, EOS_ID, EOS_ID],
    'test': [4, 7, 4, EOS_ID]}


def write_splits(directory: Path, splits, pattern: str, compress=()):
  directory.mkdir(parents=True, exist_ok=True)
  for split, lines in splits.items():
    write(directory / pattern.format(split), lines,
          compress=split in compress)


def assert_streams(data: LMData, expected):
  for split in ('train', 'valid', 'test'):
    stream = getattr(data, split)
    assert stream.dtype == np.int32 and stream.ndim == 1
    assert stream.tolist() == expected[split], split


# ---------------------------------------------------------------- local files


def test_ptb_layout_exact_ids_and_oov(tmp_path):
  write_splits(tmp_path, PTB_SPLITS, 'ptb.{}.txt')
  data = load_lm(make_cfg(source='local', path=str(tmp_path)),
                 cache_dir=str(tmp_path / 'cache'))
  assert isinstance(data, LMData)
  assert data.vocab.tokens[4:] == sorted(PTB_IDS, key=PTB_IDS.get)
  assert_streams(data, PTB_STREAMS)
  stats = data.stats
  assert stats['train_lines'] == 3 and stats['train_tokens'] == 12
  assert stats['train_unk'] == 1 and stats['train_oov'] == 0  # literal <unk>
  assert stats['valid_unk'] == 1 and stats['valid_oov'] == 1  # 'bird'
  assert stats['test_oov'] == 0 and stats['vocab_size'] == 10
  assert stats['valid_file'] == str(tmp_path / 'ptb.valid.txt')
  assert stats['valid_unigram_ppl'] > 1
  # the vocabulary is cached and identifies the data
  loaded = Vocab.load(tmp_path / 'cache' / 'vocab.json')
  assert loaded.tokens == data.vocab.tokens
  assert data.fingerprint == data.vocab.fingerprint == loaded.fingerprint
  # streams are vocab.encode of every line
  for split, lines in PTB_SPLITS.items():
    np.testing.assert_array_equal(
        getattr(data, split), np.concatenate(data.vocab.encode_many(lines)))


def test_wikitext_layout_keeps_empty_lines(tmp_path):
  write_splits(tmp_path, WIKI_SPLITS, 'wiki.{}.tokens')
  data = load_lm(make_cfg(source='local', path=str(tmp_path)))
  assert data.vocab.tokens[4:] == ['=', 'a', 'A', 'b']
  assert_streams(data, WIKI_STREAMS)
  assert data.stats['train_empty_lines'] == 3
  assert data.stats['valid_lines'] == 3 and data.stats['valid_oov'] == 1
  # every line gives exactly one EOS, empty or not
  for split, lines in WIKI_SPLITS.items():
    assert (getattr(data, split) == EOS_ID).sum() == len(lines)


def test_lowercase_and_vocab_size_cap(tmp_path):
  write_splits(tmp_path, WIKI_SPLITS, 'wiki.{}.tokens')
  data = load_lm(make_cfg(source='local', path=str(tmp_path),
                          lowercase=True))
  assert data.vocab.tokens[4:] == ['a', '=', 'b']  # 'A' -> 'a' (3 times)
  assert data.train.tolist()[:5] == [EOS_ID, 5, 4, 5, EOS_ID]
  capped = load_lm(make_cfg(source='local', path=str(tmp_path),
                            vocab_size=5))
  assert capped.vocab.tokens[4:] == ['=']
  assert capped.stats['train_oov'] == 4  # A, b, a, a; <unk> is no OOV
  assert capped.stats['train_unk'] == 5


def test_generic_layout_and_gzip(tmp_path):
  write_splits(tmp_path, PTB_SPLITS, '{}.txt', compress=('valid', 'test'))
  assert (tmp_path / 'valid.txt.gz').exists()
  data = load_lm(make_cfg(source='local', path=str(tmp_path)))
  assert_streams(data, PTB_STREAMS)
  assert data.stats['test_file'] == str(tmp_path / 'test.txt.gz')


def test_layout_precedence_and_explicit_names(tmp_path):
  write_splits(tmp_path, PTB_SPLITS, 'ptb.{}.txt')
  write_splits(tmp_path, WIKI_SPLITS, '{}.txt')
  assert_streams(load_lm(make_cfg(source='local', path=str(tmp_path))),
                 PTB_STREAMS)  # ptb.* comes first
  write(tmp_path / 'my_valid.txt', WIKI_SPLITS['valid'], compress=True)
  data = load_lm(make_cfg(source='local', path=str(tmp_path),
                          train_file='train.txt', valid_file='my_valid.txt',
                          test_file='test.txt'))
  assert_streams(data, WIKI_STREAMS)
  assert data.stats['valid_file'] == str(tmp_path / 'my_valid.txt.gz')
  # only some names given: the others come from the detected layout
  data = load_lm(make_cfg(source='local', path=str(tmp_path),
                          valid_file='my_valid.txt'))
  assert data.stats['train_file'] == str(tmp_path / 'ptb.train.txt')
  assert data.valid.tolist() == [EOS_ID, 6, UNK_ID, EOS_ID, EOS_ID]


# --------------------------------------------------------------------- errors


def error_message(exc_type, cfg) -> str:
  with pytest.raises(exc_type) as info:
    load_lm(cfg)
  message = str(info.value)
  assert '\n' not in message, message
  return message


def test_error_missing_directory(tmp_path):
  missing = tmp_path / 'nope'
  message = error_message(FileNotFoundError,
                          make_cfg(source='local', path=str(missing)))
  assert 'cfg.path' in message and str(missing) in message


def test_error_missing_split_file(tmp_path):
  write_splits(tmp_path, PTB_SPLITS, 'ptb.{}.txt')
  (tmp_path / 'ptb.test.txt').unlink()
  message = error_message(FileNotFoundError,
                          make_cfg(source='local', path=str(tmp_path)))
  assert str(tmp_path / 'ptb.test.txt') in message
  assert 'cfg.test_file' in message


def test_error_no_layout_or_missing_explicit_file(tmp_path):
  message = error_message(FileNotFoundError,
                          make_cfg(source='local', path=str(tmp_path)))
  assert 'cfg.train_file' in message and 'wiki.train.tokens' in message
  write_splits(tmp_path, PTB_SPLITS, 'ptb.{}.txt')
  message = error_message(
      FileNotFoundError,
      make_cfg(source='local', path=str(tmp_path), valid_file='val.txt'))
  assert str(tmp_path / 'val.txt') in message
  assert 'cfg.valid_file' in message


@pytest.mark.parametrize('compress', [False, True])
def test_error_invalid_utf8(tmp_path, compress):
  write_splits(tmp_path, WIKI_SPLITS, 'wiki.{}.tokens')
  (tmp_path / 'wiki.valid.tokens').unlink()
  path = write(tmp_path / 'wiki.valid.tokens', None, compress=compress,
               raw=b' \n gr\xfc\xdfe \n')
  message = error_message(ValueError,
                          make_cfg(source='local', path=str(tmp_path)))
  assert f'{path}:2' in message and 'UTF-8' in message


def test_error_unknown_source_and_empty_train(tmp_path):
  message = error_message(ValueError, make_cfg(source='s3'))
  assert 'cfg.source' in message and 'synthetic' in message
  write_splits(tmp_path, {**WIKI_SPLITS, 'train': ['', '  ']},
               'wiki.{}.tokens')
  message = error_message(ValueError,
                          make_cfg(source='local', path=str(tmp_path)))
  assert 'train' in message and 'no words' in message


# ---------------------------------------------------------------- batching


def position_stream(n=2000, base=100):
  """A stream whose token at position p is base + p (identifies slices)."""
  return np.arange(base, base + n, dtype=np.int32)


def take(iterator, k):
  return [next(iterator) for _ in range(k)]


def row_starts(batch, base=100):
  """Stream position of each row, after checking it is a true slice."""
  inputs, targets = batch['inputs'], batch['targets']
  length = inputs.shape[1]
  starts = inputs[:, 0] - base
  for row, start in enumerate(starts):
    np.testing.assert_array_equal(inputs[row],
                                  base + start + np.arange(length))
    np.testing.assert_array_equal(targets[row], inputs[row] + 1)
  return starts.tolist()


def test_stream_batcher_shapes_slices_and_epoch_coverage():
  stream = position_stream(2000)
  batcher = StreamBatcher(stream, batch_size=4, seq_len=16, seed=3,
                          batch_multiple=2)
  assert iter(batcher) is batcher
  per_epoch = batcher.batches_per_epoch
  assert per_epoch == ((2000 - 16) // 16) // 4 == 31
  offsets = set()
  for epoch in range(4):
    starts = []
    for batch in take(batcher, per_epoch):
      assert batch['inputs'].shape == batch['targets'].shape == (4, 16)
      assert batch['inputs'].dtype == batch['targets'].dtype == np.int32
      assert batch['weights'].dtype == np.float32
      assert (batch['weights'] == 1).all()
      starts += row_starts(batch)
    assert batcher.state() == {'epoch': epoch + 1, 'position': 0, 'seed': 3}
    assert len(starts) == len(set(starts)) == per_epoch * 4  # at most once
    assert len({s % 16 for s in starts}) == 1  # one offset per epoch
    assert max(starts) + 16 < 2000  # every target exists
    assert starts != sorted(starts)  # shuffled
    offsets.add(starts[0] % 16)
  assert len(offsets) > 1  # the offset (and the dropped tail) varies


def test_stream_batcher_deterministic_and_epochs_differ():
  stream = position_stream(3000)

  def first(seed, k=40):
    return take(StreamBatcher(stream, batch_size=8, seq_len=8, seed=seed),
                k)

  a, b, c = first(0), first(0), first(1)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert any(not np.array_equal(x['inputs'], y['inputs'])
             for x, y in zip(a, c))
  batcher = StreamBatcher(stream, batch_size=8, seq_len=8, seed=0)
  n = batcher.batches_per_epoch
  two = take(batcher, 2 * n)
  first_epoch = [s for x in two[:n] for s in row_starts(x)]
  second_epoch = [s for x in two[n:] for s in row_starts(x)]
  assert first_epoch != second_epoch


def test_stream_batcher_exact_resume_mid_epoch():
  stream = position_stream(5000)
  original = StreamBatcher(stream, batch_size=4, seq_len=32, seed=7)
  per_epoch = original.batches_per_epoch
  take(original, per_epoch + 5)  # into the second epoch
  state = json.loads(json.dumps(original.state()))
  assert state == {'epoch': 1, 'position': 5, 'seed': 7}
  restored = StreamBatcher(stream, batch_size=4, seq_len=32, seed=7)
  restored.restore(state)
  for x, y in zip(take(original, 2 * per_epoch),
                  take(restored, 2 * per_epoch)):
    assert x.keys() == y.keys()
    for key in x:
      assert x[key].dtype == y[key].dtype
      np.testing.assert_array_equal(x[key], y[key])
  assert original.state() == restored.state()
  with pytest.raises(ValueError, match='seed'):
    StreamBatcher(stream, batch_size=4, seq_len=32, seed=8).restore(state)
  with pytest.raises(ValueError, match='out of range'):
    restored.restore({'epoch': 0, 'position': per_epoch + 1, 'seed': 7})


def test_stream_batcher_no_shuffle_is_in_order():
  batcher = StreamBatcher(position_stream(1000), batch_size=2, seq_len=10,
                          shuffle=False)
  starts = [s for x in take(batcher, batcher.batches_per_epoch)
            for s in row_starts(x)]
  assert starts == list(range(starts[0], starts[0] + 10 * len(starts), 10))


def test_stream_batcher_errors():
  stream = position_stream(1000)
  with pytest.raises(ValueError) as info:
    StreamBatcher(stream, batch_size=6, seq_len=8, batch_multiple=4)
  message = str(info.value)
  assert 'config.data.batch_size=6' in message and '4' in message
  with pytest.raises(ValueError) as info:
    StreamBatcher(stream[:39], batch_size=4, seq_len=8)
  message = str(info.value)
  assert '39 tokens' in message and '40' in message  # (B + 1) * L needed
  assert 'config.data.batch_size' in message and '\n' not in message
  assert StreamBatcher(stream[:40], batch_size=4,
                       seq_len=8).batches_per_epoch == 1
  with pytest.raises(ValueError, match='seq_len'):
    StreamBatcher(stream, batch_size=4, seq_len=0)


@pytest.mark.parametrize('n,batch_size,multiple', [(103, 3, 2), (64, 4, 1),
                                                   (5, 4, 4)])
def test_eval_batches_cover_every_token_once(n, batch_size, multiple):
  rng = np.random.default_rng(n)
  stream = rng.integers(4, 50, size=n).astype(np.int32)
  length = 8
  batches = eval_batches(stream, batch_size=batch_size, seq_len=length,
                         batch_multiple=multiple)
  rows = -(-batch_size // multiple) * multiple
  assert sum(float(b['weights'].sum()) for b in batches) == n
  full_inputs = np.concatenate([[EOS_ID], stream[:-1]])
  pairs, position = [], 0
  for batch in batches:
    assert batch['inputs'].shape == (rows, length) and rows % multiple == 0
    assert batch['inputs'].dtype == batch['targets'].dtype == np.int32
    assert batch['weights'].dtype == np.float32
    for inputs, targets, weights in zip(batch['inputs'], batch['targets'],
                                        batch['weights']):
      real = int(weights.sum())
      assert (weights[:real] == 1).all() and not weights[real:].any()
      assert (inputs[real:] == PAD_ID).all()
      assert (targets[real:] == PAD_ID).all()
      if not real:  # a filler row
        continue
      # a fresh context: the row is the stream's next segment
      np.testing.assert_array_equal(inputs[:real],
                                    full_inputs[position:position + real])
      for j in range(real):
        pairs.append((tuple(inputs[:j + 1].tolist()), int(targets[j])))
      position += real
  assert position == n
  # the (context, target) pairs give back the stream exactly
  assert [t for _, t in pairs] == stream.tolist()
  for index, (context, target) in enumerate(pairs):
    start = index - len(context) + 1
    assert context == tuple(full_inputs[start:index + 1].tolist())
    assert target == stream[index]
  assert eval_batches(stream[:0], batch_size=4, seq_len=8) == []


# ------------------------------------------------------------------ synthetic


def test_synthetic_deterministic_sizes_and_fast():
  start = time.time()
  data = load_lm({'source': 'synthetic'})  # the defaults
  assert time.time() - start < 2.0
  stats = data.stats
  assert stats['train_lines'] == 30000 and stats['valid_lines'] == 2500
  assert 200_000 < stats['train_tokens'] < 500_000
  assert 150 < data.vocab.size < 400
  assert stats['valid_oov'] == stats['test_oov'] == 0
  # a model with context can do far better than unigram statistics
  assert stats['valid_unigram_ppl'] > 20 * stats['valid_oracle_ppl']
  cfg = make_cfg(synthetic_train_lines=500, synthetic_valid_lines=70,
                 synthetic_test_lines=0)
  a, b = load_lm(cfg), load_lm(cfg)
  assert a.fingerprint == b.fingerprint
  for split in ('train', 'valid', 'test'):
    np.testing.assert_array_equal(getattr(a, split), getattr(b, split))
    assert (getattr(a, split) == EOS_ID).sum() == cfg[f'synthetic_{split}_'
                                                      'lines']
  assert a.test.size == 0
  c = load_lm(make_cfg(synthetic_train_lines=500, synthetic_valid_lines=70,
                       synthetic_test_lines=0, synthetic_seed=1))
  assert not np.array_equal(a.train[:500], c.train[:500])
  assert not np.array_equal(a.valid[:100], a.train[:100])  # own streams


def test_synthetic_long_range_structure():
  lines, _ = lm.synthetic_lines(0, 5000, 'train')
  stories, current = [], []
  for line in lines:
    current.append(line.split())
    if not line:
      stories.append(current)
      current = []
  assert len(stories) > 300
  # pylint: disable=protected-access
  genders = dict(lm._NAMES)
  counts = lm._COUNTS
  plural_nouns = {p for _, p in lm._NOUNS}
  singular_forms = {s for s, _ in lm._VERBS_AGREE} | {'was'}
  plural_forms = {p for _, p in lm._VERBS_AGREE} | {'were'}
  checked = set()
  for story in stories:
    title, intro, *body, end, empty = story
    assert title[0] == title[-1] == '=' and not empty
    name, adjective, key = title[1], title[4], title[5]
    place, count, pets = intro[4], intro[6], intro[7]
    friend = intro[11]
    pronoun, possessive = lm._PRONOUN[genders[name]]
    assert intro[9] == possessive and friend != name
    assert end == ['and', 'so', name, 'and', 'the', adjective, key,
                   'stayed', 'in', 'the', place, '.']
    for words in body:
      if 'counted' in words:  # counting stops at the introduced number
        assert words[2:4] == [possessive, pets]
        assert words[5:-1] == list(counts[:counts.index(count) + 1])
        checked.add('count')
      elif 'said' in words:  # the second quote copies the first
        quotes = [i for i, w in enumerate(words) if w == '"']
        assert len(quotes) == 4
        assert (words[quotes[0] + 1:quotes[1]] ==
                words[quotes[2] + 1:quotes[3]])
        assert words[0] == friend and words[quotes[1] + 2] == name
        checked.add('copy')
      elif words[0] == 'then':  # coreference, the title's object
        assert words[1] in (name, pronoun)
        assert words[3:6] == [possessive, adjective, key]
        checked.add('coreference')
      elif words[:2] == ['at', 'night']:
        assert words[2] in (name, pronoun) and words[-2] == place
      elif words[0] == 'the':  # agreement with the head, not the attractor
        verb = words[-2] if words[-3] not in ('was', 'were') else words[-3]
        expected = plural_forms if words[1] in plural_nouns else singular_forms
        assert verb in expected, words
        assert words.count('(') == words.count(')') <= 1
        checked.add('agreement')
  assert checked == {'count', 'copy', 'coreference', 'agreement'}


# ----------------------------------------------------------------------- tfds


def test_tfds_with_mock_data(tmp_path):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=7,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    data = load_lm(make_cfg(source='tfds'), cache_dir=str(tmp_path))
    source = tfds.data_source('wikitext103', split='validation',
                              download=False)
    valid_lines = [source[i]['text'] for i in range(len(source))]
  for split in ('train', 'valid', 'test'):
    stream = getattr(data, split)
    assert data.stats[f'{split}_lines'] == 7
    assert stream.dtype == np.int32 and stream[-1] == EOS_ID
    assert (stream == EOS_ID).sum() == 7  # one EOS per example
  assert data.stats['valid_tfds_split'] == 'validation'
  # examples are read in index order
  valid_lines = [t.decode() if isinstance(t, bytes) else t
                 for t in valid_lines]
  np.testing.assert_array_equal(
      data.valid, np.concatenate(data.vocab.encode_many(valid_lines)))
  with tfds.testing.mock_data(num_examples=3,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    message = error_message(ValueError,
                            make_cfg(source='tfds', text_field='line'))
  assert 'cfg.text_field' in message and "'text'" in message


def test_tfds_not_prepared(tmp_path):
  data_dir = tmp_path / 'tfds'
  message = error_message(FileNotFoundError,
                          make_cfg(source='tfds', tfds_data_dir=str(data_dir)))
  assert 'wikitext103' in message and str(data_dir) in message
  assert 'download_and_prepare' in message and 'array_record' in message
  assert 'experiments.data.wikitext103' in message


def test_wikitext103_builder_prepares_in_file_order(tmp_path, monkeypatch):
  """download_and_prepare on local files (no network) -> the local streams."""
  import tensorflow_datasets as tfds
  from etils import epath
  from experiments.data import wikitext103
  extracted = tmp_path / 'extracted'
  # 101 lines, empty ones included: a hashed (shuffled) order would show
  splits = {'train': [*WIKI_SPLITS['train'] * 20, ' z y x '],
            'valid': WIKI_SPLITS['valid'], 'test': WIKI_SPLITS['test']}
  write_splits(extracted / 'wikitext-103', splits, 'wiki.{}.tokens')
  urls = []

  def fake_download(self, url):
    del self
    urls.append(url)
    return epath.Path(extracted)

  monkeypatch.setattr(tfds.download.DownloadManager, 'download_and_extract',
                      fake_download)
  data_dir = tmp_path / 'tfds'
  builder = tfds.builder('wikitext103', data_dir=str(data_dir),
                         file_format='array_record')
  assert isinstance(builder, wikitext103.Wikitext103)
  builder.download_and_prepare()
  assert urls == ['https://s3.amazonaws.com/research.metamind.io/wikitext/'
                  'wikitext-103-v1.zip']
  from_tfds = load_lm(make_cfg(source='tfds', tfds_data_dir=str(data_dir)))
  from_files = load_lm(make_cfg(source='local',
                                path=str(extracted / 'wikitext-103')))
  assert from_tfds.fingerprint == from_files.fingerprint
  for split in ('train', 'valid', 'test'):
    np.testing.assert_array_equal(getattr(from_tfds, split),
                                  getattr(from_files, split))
  assert from_tfds.stats['train_lines'] == 101


# -------------------------------------------------------- real data (opt-in)


@pytest.mark.data
def test_ptb_real_data():
  if not PTB.is_dir():
    pytest.skip(f'{PTB} is absent')
  counts, types = {}, set()
  for split in ('train', 'valid', 'test'):
    lines = words = 0
    with open(PTB / f'ptb.{split}.txt', encoding='utf-8') as f:
      for line in f:
        lines += 1
        words += len(line.split())
        if split == 'train':
          types.update(line.split())
    counts[split] = (lines, words)
  # Mikolov's 10k vocabulary: 9,998 words + <unk> in the text, and <eos>.
  assert len(types) == 9999 and '<unk>' in types
  start = time.time()
  data = load_lm(make_cfg(source='local', path=str(PTB)))
  assert time.time() - start < 30
  assert data.vocab.size == 4 + len(types) - 1 == 10002  # <unk> is special
  assert data.vocab.tokens[:4] == ['<pad>', '<s>', '</s>', '<unk>']
  for split, (lines, words) in counts.items():
    stream = getattr(data, split)
    assert stream.size == words + lines
    assert (stream == EOS_ID).sum() == lines
    assert data.stats[f'{split}_oov'] == 0  # a closed vocabulary
  assert (data.train.size, data.valid.size, data.test.size) == (
      929_589, 73_760, 82_430)
  assert data.vocab.decode(data.valid[:20]).startswith(
      'consumers may want to move their telephones')
