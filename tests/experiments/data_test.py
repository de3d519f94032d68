"""Tests of the translation input pipeline (experiments/data; no JAX used)."""

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
from experiments.data import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from experiments.data import load_translation, TokenBatcher, TranslationData
from experiments.data import synthetic
from experiments.data.vocab import SentencePieceVocab, Vocab, WordVocab

SHARED_DATA = Path(__file__).parents[2] / '..' / 'shared' / 'data'
MULTI30K = SHARED_DATA / 'multi30k_de_en' / 'task1' / 'tok'


def make_cfg(**overrides) -> ml_collections.ConfigDict:
  """The data config fields of experiments/configs (synthetic by default)."""
  cfg = ml_collections.ConfigDict(dict(
      source='synthetic', path='', src_lang='de', tgt_lang='en',
      train_prefix='train', valid_prefix='valid', test_prefix='test',
      suffix='', tfds_name='', tfds_data_dir='',
      tfds_splits=ml_collections.ConfigDict(
          dict(train='train', valid='validation', test='test')),
      vocab='word', vocab_size=0, max_len=64, lowercase=False,
      synthetic_train=300, synthetic_valid=20, synthetic_test=20,
      synthetic_seed=0, max_train_examples=0))
  cfg.update(overrides)
  return cfg


# ------------------------------------------------------------------ synthetic


def test_synthetic_deterministic_sizes_and_fast():
  start = time.time()
  a = synthetic.generate(0, 20000, 500, 500)
  elapsed = time.time() - start
  assert elapsed < 2.0, elapsed
  assert a == synthetic.generate(0, 20000, 500, 500)
  assert a['train'][0][:50] != synthetic.generate(1, 50, 1, 1)['train'][0]
  for split, n in (('train', 20000), ('valid', 500), ('test', 500)):
    src, tgt = a[split]
    assert len(src) == len(tgt) == n
  src, tgt = a['train']
  src_words = {w for line in src for w in line.split()}
  tgt_words = {w for line in tgt for w in line.split()}
  assert 150 <= len(src_words) <= 300 and 150 <= len(tgt_words) <= 300
  for line in src + tgt:
    assert 4 <= len(line.split()) <= 20 and line == line.lower()


def test_synthetic_no_overlap():
  data = synthetic.generate(3, 5000, 300, 300)
  train = set(data['train'][0])
  assert len(train) == 5000
  assert not train & set(data['valid'][0])
  assert not train & set(data['test'][0])
  assert not set(data['valid'][0]) & set(data['test'][0])


def test_synthetic_reordering_and_agreement():
  lex = synthetic.lexicon()
  categories = [set(lex.nouns), set(lex.verbs), set(lex.adjectives),
                set(lex.prepositions)]
  assert sum(map(len, categories)) == len(set().union(*categories))
  target_verb_forms = {
      form for verb in lex.verbs for gender in synthetic.GENDERS
      for form in lex.target_verb(verb, gender)[-1:]}
  noun_heads = {tokens[0]: gender for _, gender, tokens in lex.nouns.values()}
  det_gender = {det: key[2] for key, det in lex.determiners.items()}
  noun_tokens = {tok for _, _, toks in lex.nouns.values() for tok in toks}
  target_adjectives = set(lex.adjectives.values())
  src, tgt = synthetic.generate(0, 2000, 0, 0)['train']
  with_pp = with_relative = differs = 0
  for s, t in zip(src, tgt):
    s, t = s.split(), t.split()
    # SVO -> SOV: the source ends with a noun, the target with a verb.
    assert s[-1] in lex.nouns and t[-1] in target_verb_forms
    differs += s != t
    # Verb agreement: the main (last) source verb, inflected for the subject.
    subject = next(w for w in s if w in lex.nouns)
    main_verb = [w for w in s if w in lex.verbs][-1]
    _, gender, _ = lex.nouns[subject]
    assert t[-1] == lex.target_verb(main_verb, gender)[-1]
    assert lex.verbs[main_verb][0] == lex.nouns[subject][0]  # English agrees
    # Determiner agreement: every determiner precedes a noun of its gender.
    for i, word in enumerate(t):
      if word in det_gender:
        assert det_gender[word] == noun_heads[t[i + 1]], (s, t)
    # The PP moves to the front: the target's 3rd or 4th word is a postposition.
    if any(w in lex.prepositions for w in s):
      with_pp += 1
      post = lex.prepositions[next(w for w in s if w in lex.prepositions)]
      assert post in t[:8] and t[0] in det_gender
    with_relative += synthetic.RELATIVE[0] in s
    # Adjectives precede the noun in the source and follow it in the target.
    for i, word in enumerate(s):
      if word in lex.adjectives:
        assert s[i + 1] in lex.nouns or s[i + 1] in lex.adjectives
    for i, word in enumerate(t):
      if word in target_adjectives:
        assert t[i - 1] in noun_tokens or t[i - 1] in target_adjectives
  assert differs == len(src)
  assert 0.3 < with_pp / len(src) < 0.5
  assert 0.15 < with_relative / len(src) < 0.35
  two_token = [n for n, (_, _, toks) in lex.nouns.items() if len(toks) == 2]
  assert two_token and any(lex.verbs[v][1] for v in lex.verbs)


# ---------------------------------------------------------------- local files


def write(path: Path, lines, compress=False, raw: bytes | None = None):
  data = raw if raw is not None else ''.join(f'{l}\n' for l in lines).encode()
  if compress:
    path = path.with_name(path.name + '.gz')
    data = gzip.compress(data)
  path.write_bytes(data)
  return path


PAIRS = [('ein hund', 'a dog'), ('zwei katzen', 'two cats'),
         ('der ne@@ ue hund', 'the ne@@ w dog'), ('Eine Maus', 'A mouse')]


def write_corpus(directory: Path, names=('train', 'valid', 'test'),
                 suffix='', compress=()):
  directory.mkdir(parents=True, exist_ok=True)
  for split in names:
    for lang, col in (('de', 0), ('en', 1)):
      write(directory / f'{split}{suffix}.{lang}', [p[col] for p in PAIRS],
            compress=compress == 'all' or (split, lang) in compress)


def test_local_plain(tmp_path):
  write_corpus(tmp_path)
  data = load_translation(make_cfg(source='local', path=str(tmp_path)),
                          str(tmp_path / 'cache'))
  assert isinstance(data, TranslationData)
  assert len(data.train) == len(data.valid) == len(data.test) == 4
  for src, tgt in data.train + data.valid + data.test:
    assert src.dtype == tgt.dtype == np.int32
    assert src[-1] == tgt[-1] == EOS_ID and BOS_ID not in src
  assert data.valid_srcs == [p[0] for p in PAIRS]
  # references are printed like decode: BPE joined.
  assert data.valid_refs == ['a dog', 'two cats', 'the new dog', 'A mouse']
  assert [data.vocab.decode(t) for _, t in data.valid] == data.valid_refs
  assert data.fingerprint == data.vocab.fingerprint


def test_local_gzip_prefix_suffix_lowercase(tmp_path):
  write_corpus(tmp_path, names=('train', 'val', 'test_2016_flickr'),
               suffix='.lc.norm.tok', compress='all')
  cfg = make_cfg(source='local', path=str(tmp_path), valid_prefix='val',
                 test_prefix='test_2016_flickr', suffix='.lc.norm.tok',
                 lowercase=True, max_train_examples=3)
  data = load_translation(cfg, str(tmp_path / 'cache'))
  assert len(data.train) == 3 and len(data.test) == 4
  assert data.test_srcs[3] == 'eine maus' and data.test_refs[3] == 'a mouse'


def test_max_len_drops_train_truncates_eval(tmp_path):
  write_corpus(tmp_path)
  data = load_translation(
      make_cfg(source='local', path=str(tmp_path), max_len=3),
      str(tmp_path / 'cache'))
  # 'der ne@@ ue hund' has 4 words + EOS: dropped from train, cut in valid.
  assert len(data.train) == 3 and data.stats['train_dropped_long'] == 1
  assert len(data.valid) == 4 and data.stats['valid_truncated'] == 1
  src, tgt = data.valid[2]
  assert len(src) == len(tgt) == 3 and src[-1] == tgt[-1] == EOS_ID


# ----------------------------------------------------------------- errors


def error_message(exc_type, cfg, cache_dir) -> str:
  with pytest.raises(exc_type) as info:
    load_translation(cfg, str(cache_dir))
  message = str(info.value)
  assert '\n' not in message, message
  return message


def test_error_missing_directory(tmp_path):
  missing = tmp_path / 'nope'
  message = error_message(FileNotFoundError,
                          make_cfg(source='local', path=str(missing)),
                          tmp_path)
  assert 'cfg.path' in message and str(missing) in message


def test_error_missing_split_file(tmp_path):
  write_corpus(tmp_path, names=('train', 'val', 'test'))
  message = error_message(FileNotFoundError,
                          make_cfg(source='local', path=str(tmp_path)),
                          tmp_path)
  assert 'valid.de' in message and 'cfg.valid_prefix' in message


def test_error_line_count_mismatch(tmp_path):
  write_corpus(tmp_path)
  write(tmp_path / 'test.en', ['only one line'])
  message = error_message(ValueError,
                          make_cfg(source='local', path=str(tmp_path)),
                          tmp_path)
  assert str(tmp_path / 'test.de') in message and '4 lines' in message
  assert str(tmp_path / 'test.en') in message and '1' in message


def test_error_empty_line(tmp_path):
  write_corpus(tmp_path)
  write(tmp_path / 'train.en', ['a', 'b', '   ', 'd'])
  message = error_message(ValueError,
                          make_cfg(source='local', path=str(tmp_path)),
                          tmp_path)
  assert f"{tmp_path / 'train.en'}:3" in message and 'empty' in message


@pytest.mark.parametrize('compress', [False, True])
def test_error_undecodable_bytes(tmp_path, compress):
  write_corpus(tmp_path)
  (tmp_path / 'valid.de').unlink()
  name = write(tmp_path / 'valid.de', None, compress=compress,
               raw='eins\nzwei\ndrei\n'.encode() + b'gr\xfc\xdfe\n')
  message = error_message(ValueError,
                          make_cfg(source='local', path=str(tmp_path)),
                          tmp_path)
  assert f'{name}:4' in message and 'UTF-8' in message


def test_error_unknown_source_and_vocab(tmp_path):
  message = error_message(ValueError, make_cfg(source='s3'), tmp_path)
  assert 'cfg.source' in message and 'synthetic' in message
  message = error_message(ValueError, make_cfg(vocab='bpe'), tmp_path)
  assert 'cfg.vocab' in message and 'sentencepiece' in message


def test_error_tfds_not_prepared(tmp_path):
  data_dir = tmp_path / 'tfds'
  cfg = make_cfg(source='tfds', tfds_name='wmt14_translate/de-en',
                 tfds_data_dir=str(data_dir))
  message = error_message(FileNotFoundError, cfg, tmp_path)
  assert 'wmt14_translate/de-en' in message and str(data_dir) in message
  assert 'download_and_prepare' in message and 'array_record' in message


def test_error_tfds_unknown_dataset(tmp_path):
  cfg = make_cfg(source='tfds', tfds_name='no_such_dataset_xyz',
                 tfds_data_dir=str(tmp_path))
  message = error_message(ValueError, cfg, tmp_path)
  assert 'cfg.tfds_name' in message and 'no_such_dataset_xyz' in message


# ------------------------------------------------------------- vocabularies


def test_word_vocab_bpe_decode_and_save(tmp_path):
  vocab = WordVocab.build(['ne@@ w york', 'a ne@@ w dog', 'a cat'],
                          max_size=8)
  assert vocab.size == 8 and vocab.tokens[:4] == ['<pad>', '<s>', '</s>',
                                                   '<unk>']
  ids = vocab.encode('a ne@@ w zebra')
  assert ids.dtype == np.int32 and ids[-1] == EOS_ID and UNK_ID in ids
  assert vocab.decode(ids) == 'a new <unk>'
  assert vocab.decode(vocab.encode('ne@@ w cat')) == 'new cat'
  padded = np.concatenate([[BOS_ID], vocab.encode('a ne@@ w'), [PAD_ID] * 3,
                           vocab.encode('cat')])
  assert vocab.decode(padded) == 'a new'  # stops at the first EOS
  vocab.save(tmp_path / 'v.json')
  loaded = Vocab.load(tmp_path / 'v.json')
  assert isinstance(loaded, WordVocab)
  assert loaded.tokens == vocab.tokens
  assert loaded.fingerprint == vocab.fingerprint
  assert WordVocab.build(['a b']).fingerprint != vocab.fingerprint


def test_sentencepiece_trains_caches_round_trips(tmp_path, monkeypatch):
  import sentencepiece as spm
  calls = []
  train = spm.SentencePieceTrainer.train

  def counting_train(*args, **kwargs):
    calls.append(1)
    return train(*args, **kwargs)

  monkeypatch.setattr(spm.SentencePieceTrainer, 'train', counting_train)
  cfg = make_cfg(vocab='sentencepiece', vocab_size=200,
                 synthetic_train=2000)
  cache = tmp_path / 'cache'
  first = load_translation(cfg, str(cache))
  assert len(calls) == 1 and isinstance(first.vocab, SentencePieceVocab)
  (cached,) = list(cache.glob('spm_*.json'))
  mtime = cached.stat().st_mtime_ns
  second = load_translation(cfg, str(cache))
  assert len(calls) == 1 and cached.stat().st_mtime_ns == mtime
  assert second.fingerprint == first.fingerprint
  assert all(np.array_equal(a[1], b[1])
             for a, b in zip(first.train, second.train))
  vocab = first.vocab
  assert vocab.size <= 200
  assert [vocab.decode(t) for _, t in first.valid] == first.valid_refs
  assert [vocab.decode(s) for s, _ in first.test] == first.test_srcs
  vocab.save(tmp_path / 'spm.json')
  loaded = Vocab.load(tmp_path / 'spm.json')
  assert isinstance(loaded, SentencePieceVocab)
  assert loaded.fingerprint == vocab.fingerprint
  np.testing.assert_array_equal(loaded.encode(first.test_srcs[0]),
                                first.test[0][0])
  # other settings -> another cache entry, trained again
  load_translation(make_cfg(vocab='sentencepiece', vocab_size=150,
                            synthetic_train=2000), str(cache))
  assert len(calls) == 2 and len(list(cache.glob('spm_*.json'))) == 2


# ---------------------------------------------------------------- batching


def fake_examples(n=300, seed=0, max_len=40):
  """Unique examples: the source's first token identifies the example."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    src = rng.integers(4, 100, size=rng.integers(2, max_len + 1))
    tgt = rng.integers(4, 100, size=rng.integers(2, max_len + 1))
    src[0], src[-1], tgt[-1] = 1000 + i, EOS_ID, EOS_ID
    out.append((src.astype(np.int32), tgt.astype(np.int32)))
  return out


def example_ids(batch):
  return [int(r[0]) - 1000 for r in batch['inputs'] if r[0] != PAD_ID]


def take(iterator, k):
  return [next(iterator) for _ in range(k)]


def test_batcher_shapes_and_epoch_coverage():
  examples = fake_examples()
  batcher = TokenBatcher(examples, max_tokens=512, batch_multiple=4, seed=1)
  lengths = batcher.bucket_lengths
  assert len(lengths) <= 8 and all(b % 8 == 0 for b in lengths)
  assert lengths[-1] >= max(max(len(s), len(t)) for s, t in examples)
  per_epoch = batcher.batches_per_epoch()
  assert per_epoch > 5
  batches = take(iter(batcher), per_epoch)
  assert batcher.state() == {'epoch': 1, 'position': 0, 'seed': 1}
  seen = []
  for batch in batches:
    b, length = batch['inputs'].shape
    assert length in lengths and b == batcher.batch_sizes[length]
    assert b % 4 == 0 and b * length <= 512
    assert batch['inputs'].dtype == batch['targets'].dtype == np.int32
    assert batch['weights'].dtype == np.float32
    np.testing.assert_array_equal(batch['weights'],
                                  batch['targets'] != PAD_ID)
    ids = example_ids(batch)
    assert len(ids) == b  # train batches are full
    for row, i in enumerate(ids):
      src, tgt = examples[i]
      np.testing.assert_array_equal(batch['inputs'][row, :len(src)], src)
      np.testing.assert_array_equal(batch['targets'][row, :len(tgt)], tgt)
      assert not batch['inputs'][row, len(src):].any()
      size = max(len(src), len(tgt))  # the smallest bucket that fits
      assert size <= length and all(b < size for b in lengths
                                    if b < length)
    seen += ids
  assert len(seen) == len(set(seen))  # at most once per epoch
  assert len(seen) > 0.75 * len(examples)


def test_batcher_deterministic_and_seeded():
  examples = fake_examples()
  def first_batches(seed):
    return take(iter(TokenBatcher(examples, max_tokens=512, seed=seed)), 30)
  a, b, c = first_batches(0), first_batches(0), first_batches(1)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert any(x['inputs'].shape != y['inputs'].shape or
             not np.array_equal(x['inputs'], y['inputs'])
             for x, y in zip(a, c))
  # epochs differ from each other (re-shuffled)
  batcher = TokenBatcher(examples, max_tokens=512, seed=0)
  n = batcher.batches_per_epoch()
  two = take(iter(batcher), 2 * n)
  assert [example_ids(x) for x in two[:n]] != [example_ids(x)
                                                for x in two[n:]]


def test_batcher_exact_resume_across_epoch_boundary():
  examples = fake_examples()
  original = TokenBatcher(examples, max_tokens=700, batch_multiple=2, seed=7)
  per_epoch = original.batches_per_epoch()
  assert 5 < per_epoch < 20
  it = iter(original)
  consumed = per_epoch + per_epoch - 5  # second epoch, 5 before its end
  take(it, consumed)
  state = json.loads(json.dumps(original.state()))
  assert state == {'epoch': 1, 'position': per_epoch - 5, 'seed': 7}
  restored = TokenBatcher(examples, max_tokens=700, batch_multiple=2, seed=7)
  restored.restore(state)
  expected, got = take(it, 20), take(iter(restored), 20)
  for x, y in zip(expected, got):
    assert x.keys() == y.keys()
    for key in x:
      assert x[key].dtype == y[key].dtype
      np.testing.assert_array_equal(x[key], y[key])
  assert original.state() == restored.state()
  with pytest.raises(ValueError, match='seed'):
    TokenBatcher(examples, max_tokens=700, seed=8).restore(state)


def test_batcher_no_shuffle_is_one_pass():
  examples = fake_examples(100)
  batcher = TokenBatcher(examples, max_tokens=256, shuffle=False)
  batches = list(batcher)
  assert len(batches) == batcher.batches_per_epoch()
  shapes = [b['inputs'].shape[1] for b in batches]
  assert shapes == sorted(shapes)
  assert list(batcher) == []


def test_eval_batches_cover_everything_once():
  examples = fake_examples(203)
  batcher = TokenBatcher(examples, max_tokens=300, batch_multiple=4,
                         bucket_lengths=[16, 32, 48], shuffle=False)
  batches = batcher.eval_batches()
  indices = np.concatenate([b['index'] for b in batches])
  assert sorted(indices[indices >= 0].tolist()) == list(range(203))
  assert (indices == -1).sum() > 0
  for batch in batches:
    b, length = batch['inputs'].shape
    assert batch['index'].dtype == np.int32 and b % 4 == 0
    real = int((batch['index'] >= 0).sum())
    full = batcher.batch_sizes[length]
    # Full batches, or the fewest 4 * 2**j rows that hold the rest.
    assert real <= b and (b == full or b == 4 or (
        b < 2 * real and (b // 4) & (b // 4 - 1) == 0))
    for row, index in enumerate(batch['index']):
      if index < 0:
        assert not batch['inputs'][row].any()
        assert not batch['weights'][row].any()
      else:
        src, tgt = examples[index]
        np.testing.assert_array_equal(batch['inputs'][row, :len(src)], src)
        assert batch['weights'][row].sum() == len(tgt)


def test_max_buckets_bounds_the_shapes():
  examples = fake_examples(200)
  shapes = {n: {b['inputs'].shape for b in TokenBatcher(
      examples, max_tokens=512, max_buckets=n, shuffle=False)}
      for n in (1, 8)}
  assert len(shapes[1]) == 1 < len(shapes[8]) <= 8
  longest = max(max(len(s), len(t)) for s, t in examples)
  (length,) = {shape[1] for shape in shapes[1]}
  assert longest <= length < longest + 8  # the longest, rounded up to 8


def test_batcher_errors():
  examples = fake_examples(20, max_len=40)
  with pytest.raises(ValueError, match='max_buckets must be positive'):
    TokenBatcher(examples, max_tokens=512, max_buckets=0)
  with pytest.raises(ValueError, match='largest bucket'):
    TokenBatcher(examples, max_tokens=512, bucket_lengths=[8, 16])
  with pytest.raises(ValueError, match='no bucket has a full batch'):
    next(iter(TokenBatcher(examples[:2], max_tokens=4096)))


# ----------------------------------------------------------- tfds (mocked)


def test_tfds_source_with_mock_data(tmp_path):
  import tensorflow_datasets as tfds
  cfg = make_cfg(source='tfds', tfds_name='wmt14_translate/de-en',
                 src_lang='de', tgt_lang='en', max_len=0,
                 max_train_examples=12)
  with tfds.testing.mock_data(num_examples=16,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    data = load_translation(cfg, str(tmp_path))
  assert len(data.train) == 12 and len(data.valid) == len(data.test) == 16
  assert all(s[-1] == EOS_ID for s, _ in data.train)
  # mock splits repeat the same examples; the first 12 are in the vocab
  assert data.valid_refs[:12] == [data.vocab.decode(t)
                                  for _, t in data.valid[:12]]
  assert all(set(ref) <= set('abcdefghij ') for ref in data.test_refs)


# -------------------------------------------------------- real data (opt-in)


@pytest.mark.data
def test_multi30k_sentencepiece(tmp_path):
  if not MULTI30K.is_dir():
    pytest.skip(f'{MULTI30K} is absent')
  cfg = make_cfg(source='local', path=str(MULTI30K), train_prefix='train',
                 valid_prefix='val', test_prefix='test_2016_flickr',
                 suffix='.lc.norm.tok', vocab='sentencepiece',
                 vocab_size=8000, max_len=128)
  start = time.time()
  data = load_translation(cfg, str(tmp_path))
  assert time.time() - start < 30
  assert (len(data.train), len(data.valid), len(data.test)) == (29000, 1014,
                                                               1000)
  assert data.vocab.size == 8000
  decoded = [data.vocab.decode(t) for _, t in data.valid]
  assert np.mean([d == r for d, r in zip(decoded, data.valid_refs)]) > 0.99
  start = time.time()
  again = load_translation(cfg, str(tmp_path))
  assert time.time() - start < 5 and again.fingerprint == data.fingerprint
  batcher = TokenBatcher(data.train, max_tokens=4096, batch_multiple=8)
  batch = next(iter(batcher))
  assert batch['inputs'].shape[0] % 8 == 0


def test_tfds_folder_without_prepared_splits_is_a_user_error(tmp_path):
  """An empty version folder (a half-copied dataset) made tfds raise a raw
  KeyError; it is now the 'not prepared' message with the fix."""
  from experiments.data import sources  # pylint: disable=g-import-not-at-top
  import importlib  # pylint: disable=g-import-not-at-top
  module = 'tensorflow_datasets.translate.wmt14'
  importlib.import_module(module)  # registers the builder
  (tmp_path / 'wmt14_translate' / 'de-en' / '1.0.0').mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match='not prepared in data_dir'):
    sources.open_tfds_split('wmt14_translate/de-en', 'train', 'train',
                            str(tmp_path), module)
