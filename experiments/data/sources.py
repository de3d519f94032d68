"""Raw parallel text: local files, tensorflow-datasets or the synthetic task.

Each reader returns {'train'|'valid'|'test': (src_lines, tgt_lines)} with
stripped, non-empty lines; user errors raise ValueError / FileNotFoundError
with a one-line message naming the file or config field and the fix.
"""

from __future__ import annotations

import gzip
import importlib
import os
from collections.abc import Mapping
from typing import Any

from experiments.data import synthetic

SPLITS = ('train', 'valid', 'test')
Splits = dict[str, tuple[list[str], list[str]]]

# tfds catalogue datasets are only registered once their module is imported
# (listing them all would need TensorFlow): dataset name -> builder module.
TFDS_MODULES = {
    'wmt13_translate': 'tensorflow_datasets.translate.wmt13',
    'wmt14_translate': 'tensorflow_datasets.translate.wmt14',
    'wmt15_translate': 'tensorflow_datasets.translate.wmt15',
    'wmt16_translate': 'tensorflow_datasets.translate.wmt16',
    'wmt17_translate': 'tensorflow_datasets.translate.wmt17',
    'wmt18_translate': 'tensorflow_datasets.translate.wmt18',
    'wmt19_translate': 'tensorflow_datasets.translate.wmt19',
    'wmt_t2t_translate': 'tensorflow_datasets.translate.wmt_t2t',
    'ted_hrlr_translate': 'tensorflow_datasets.translate.ted_hrlr',
    'ted_multi_translate': 'tensorflow_datasets.translate.ted_multi',
    'para_crawl': 'tensorflow_datasets.translate.para_crawl',
    'flores': 'tensorflow_datasets.translate.flores',
    'opus': 'tensorflow_datasets.translate.opus',
    'wikitext103': 'experiments.data.wikitext103',  # the project's builder
}


def cfg_get(cfg: Any, field: str, default: Any = None, required=False):
  """`cfg.field` for a ConfigDict, a dict or any attribute object."""
  if isinstance(cfg, Mapping):
    value = cfg.get(field, default)
  else:
    value = getattr(cfg, field, default)
  if required and (value is None or value == ''):
    raise ValueError(f'cfg.{field} is required for '
                     f"source={cfg_get(cfg, 'source')!r}; set it in the data "
                     'config.')
  return value


# ----------------------------------------------------------------- local files


def split_filename(cfg: Any, split: str, lang: str) -> str:
  """f'{prefix}{suffix}.{lang}', e.g. 'val.lc.norm.tok.de'."""
  prefix = cfg_get(cfg, f'{split}_prefix', split) or split
  return f"{prefix}{cfg_get(cfg, 'suffix', '') or ''}.{lang}"


def read_lines(path: str, allow_empty: bool = False) -> list[str]:
  """UTF-8 lines of a text file (or .gz), stripped; errors name file:line.

  Empty (or blank) lines are an error unless allow_empty: parallel text must
  not have them, a language-model corpus (WikiText) keeps them.
  """
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      data = f.read()
  except (OSError, EOFError) as e:  # e.g. a truncated or fake .gz
    raise ValueError(f'{path}: cannot read ({e}); check or re-create the '
                     'file.') from e
  try:
    text = data.decode('utf-8')
  except UnicodeDecodeError as e:
    line = data.count(b'\n', 0, e.start) + 1
    raise ValueError(f'{path}:{line}: not valid UTF-8 ({e.reason} at byte '
                     f'{e.start}); re-encode the file as UTF-8, e.g. with '
                     '`iconv -f latin1 -t utf-8`.') from None
  lines = text.split('\n')  # not splitlines(): keep fairseq's line alignment
  if lines and lines[-1] == '':
    lines.pop()
  lines = [line.strip() for line in lines]
  if allow_empty:
    return lines
  for number, line in enumerate(lines, 1):
    if not line:
      raise ValueError(f'{path}:{number}: empty line; remove it together '
                       'with the same line of the other language file.')
  return lines


def readable_directory(directory: str, setting: str, hint: str) -> str:
  """`directory` (user-expanded) if it is a directory this process may
  list; else FileNotFoundError or PermissionError naming `setting`."""
  directory = os.path.expanduser(directory)
  try:
    os.listdir(directory)
  except PermissionError:
    raise PermissionError(
        f'{setting}: permission denied listing data directory {directory} '
        f'(user {os.getuid()}); make it readable, or point {setting} at a '
        'copy.') from None
  except (FileNotFoundError, NotADirectoryError):
    raise FileNotFoundError(
        f'{setting}: data directory {directory} does not exist (cwd '
        f'{os.getcwd()}); {hint}') from None
  return directory


def _find_file(directory: str, name: str, split: str) -> str:
  for candidate in (name, name + '.gz'):
    path = os.path.join(directory, candidate)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
      f'{split} split: expected file {os.path.join(directory, name)} (or '
      f'{name}.gz) not found; set cfg.{split}_prefix / cfg.suffix so that '
      f"'{{prefix}}{{suffix}}.{{lang}}' names the files in {directory}.")


def read_local(cfg: Any) -> Splits:
  """fairseq layout: {path}/{prefix}{suffix}.{src_lang|tgt_lang}[.gz]."""
  directory = readable_directory(
      str(cfg_get(cfg, 'path', required=True)), 'cfg.path',
      'point cfg.path at a directory with train/valid/test.{src_lang,'
      'tgt_lang} files.')
  src_lang = cfg_get(cfg, 'src_lang', required=True)
  tgt_lang = cfg_get(cfg, 'tgt_lang', required=True)
  splits = {}
  for split in SPLITS:
    src_path = _find_file(directory, split_filename(cfg, split, src_lang),
                          split)
    tgt_path = _find_file(directory, split_filename(cfg, split, tgt_lang),
                          split)
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
      raise ValueError(f'{src_path} has {len(src)} lines but {tgt_path} has '
                       f'{len(tgt)}; the two files of a split must be '
                       'line-aligned translations.')
    splits[split] = (src, tgt)
  return splits


# --------------------------------------------------------- tensorflow-datasets


def _tfds_prepare_hint(name: str, data_dir: str) -> str:
  return ("prepare it on a machine with internet: python -c \"import "
          f"tensorflow_datasets as tfds, {_tfds_module(name)}; "
          f"tfds.builder('{name}', data_dir='DIR', "
          "file_format='array_record').download_and_prepare()\", then copy "
          f"DIR/{name.split('/')[0]} into {data_dir} here (or set "
          'cfg.tfds_data_dir); array_record is required because TensorFlow '
          'is not installed.')


def _tfds_module(name: str) -> str:
  family = name.split('/')[0].split(':')[0]
  return TFDS_MODULES.get(family, f'tensorflow_datasets.translate.{family}')


def read_tfds(cfg: Any, max_train_examples: int = 0,
              stats: dict | None = None) -> Splits:
  """`tfds.data_source` (array_record, no TensorFlow) for each split.

  Reads the first `max_train_examples` train examples (0 = all). Pairs with
  an empty side are skipped (web-crawled corpora have some); their count per
  split goes to stats[f'{split}_skipped_empty'].
  """
  name = cfg_get(cfg, 'tfds_name', required=True)
  data_dir = cfg_get(cfg, 'tfds_data_dir', '') or None
  module = import_tfds_module(cfg, name)
  src_lang = cfg_get(cfg, 'src_lang', required=True)
  tgt_lang = cfg_get(cfg, 'tgt_lang', required=True)
  split_names = cfg_get(cfg, 'tfds_splits', None) or {
      'train': 'train', 'valid': 'validation', 'test': 'test'}
  splits = {}
  for split in SPLITS:
    tfds_split = tfds_split_name(split_names, split)
    source = open_tfds_split(name, tfds_split, split, data_dir, module)
    count = len(source)
    if split == 'train' and max_train_examples:
      count = min(count, max_train_examples)
    src, tgt, skipped = _read_tfds_pairs(source, count, name, tfds_split,
                                         src_lang, tgt_lang)
    splits[split] = (src, tgt)
    if stats is not None:
      stats[f'{split}_skipped_empty'] = skipped
  return splits


def import_tfds_module(cfg: Any, name: str) -> str:
  """Imports cfg.tfds_module (or the guessed one) to register the builder."""
  module = cfg_get(cfg, 'tfds_module', '') or _tfds_module(name)
  try:
    importlib.import_module(module)
  except ImportError:
    pass  # a user-registered dataset needs no catalogue module
  return module


def tfds_split_name(split_names: Any, split: str) -> str:
  """cfg.tfds_splits[split], with an error naming the missing entry."""
  try:
    return split_names[split]
  except (KeyError, AttributeError):
    raise ValueError(f"cfg.tfds_splits has no '{split}' entry; set e.g. "
                     f"tfds_splits.{split}='validation'.") from None


def open_tfds_split(name: str, tfds_split: str, split: str,
                    data_dir: str | None, module: str):
  """`tfds.data_source` of a prepared split (array_record), or a user error.

  `split` is our name of it (for the cfg.tfds_splits field in messages),
  `module` the one imported to register the builder (for the messages).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  shown_dir = data_dir or os.environ.get('TFDS_DATA_DIR',
                                         '~/tensorflow_datasets')
  try:
    return tfds.data_source(name, split=tfds_split, data_dir=data_dir,
                            download=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
        f'cfg.tfds_name={name!r}: tensorflow-datasets does not know it '
        f'(imported {module}); check the name or set cfg.tfds_module to '
        'the module that defines its builder.') from None
  except (NotImplementedError, AssertionError, FileNotFoundError, OSError,
          KeyError) as e:  # KeyError: a data_dir without the prepared splits
    raise FileNotFoundError(
        f'tfds dataset {name} split {tfds_split!r} is not prepared in '
        f'data_dir {shown_dir} ({type(e).__name__}); this machine cannot '
        f'download it: {_tfds_prepare_hint(name, shown_dir)}') from None
  except ValueError as e:  # e.g. an unknown split name
    raise ValueError(f'cfg.tfds_splits.{split}={tfds_split!r} for {name}: '
                     f'{str(e).splitlines()[0]}') from None


def tfds_examples(source, indices: list[int]) -> list[dict]:
  """source[i] for i in indices; batched when the source supports it."""
  try:  # batched reads are much faster on array_record
    return list(source.__getitems__(indices))
  except (AttributeError, TypeError):  # tfds.testing.mock_data's is broken
    return [source[i] for i in indices]


def tfds_text(example: Mapping, field: str, name: str, split: str,
              index: int, fix: str) -> str:
  """The text of `example[field]` (bytes decoded as UTF-8); errors name the
  dataset, split, example and the config field to `fix`."""
  if field not in example:
    raise ValueError(f'tfds {name}: examples have fields {sorted(example)}, '
                     f'not {field!r}; fix {fix}.')
  text = example[field]
  if isinstance(text, bytes):
    try:
      text = text.decode('utf-8')
    except UnicodeDecodeError as e:
      raise ValueError(f'tfds {name} split {split!r} example {index} field '
                       f'{field!r}: not valid UTF-8 ({e.reason}); re-prepare '
                       'the dataset.') from None
  return str(text)


def _read_tfds_pairs(source, count, name, split, src_lang, tgt_lang):
  """(src, tgt, number skipped) from the first `count` examples."""
  src, tgt, skipped = [], [], 0
  chunk = 10_000
  for start in range(0, count, chunk):
    indices = list(range(start, min(count, start + chunk)))
    examples = tfds_examples(source, indices)
    for index, example in zip(indices, examples):
      pair = [' '.join(tfds_text(example, lang, name, split, index,
                                 'cfg.src_lang / cfg.tgt_lang').split())
              for lang in (src_lang, tgt_lang)]
      if pair[0] and pair[1]:
        src.append(pair[0])
        tgt.append(pair[1])
      else:
        skipped += 1
  return src, tgt, skipped


# -------------------------------------------------------------------- synthetic


def read_synthetic(cfg: Any) -> Splits:
  return synthetic.generate(
      int(cfg_get(cfg, 'synthetic_seed', 0)),
      int(cfg_get(cfg, 'synthetic_train', 20000)),
      int(cfg_get(cfg, 'synthetic_valid', 500)),
      int(cfg_get(cfg, 'synthetic_test', 500)))


READERS = {'synthetic': read_synthetic, 'local': read_local, 'tfds': read_tfds}
