"""WikiText-103 (Merity et al., 2016) as a tensorflow-datasets builder.

tensorflow-datasets has no WikiText-103 builder; importing this module
registers one named 'wikitext103'. It downloads the standard tokenized
release (wikitext-103-v1.zip: wiki.{train,valid,test}.tokens, 103M / 218k /
246k words, a 267,735-type vocabulary with `<unk>` already applied) and
stores one example {'text': line} per raw line of each file, in file order:

  split        file               example i
  train        wiki.train.tokens  line i (without its '\\n'; may be empty)
  validation   wiki.valid.tokens
  test         wiki.test.tokens

Empty lines (between paragraphs) are kept, because a language-model stream
appends one `<eos>` per line, empty or not (Transformer-XL's convention).
`disable_shuffling` keeps the examples in file order, which a stream needs.

Prepare it once on a machine with internet (array_record: TensorFlow is not
needed), from the repository root:

    python -c "import tensorflow_datasets as tfds, \\
      experiments.data.wikitext103; tfds.builder('wikitext103', \\
      data_dir='DIR', file_format='array_record').download_and_prepare()"

then read it with `experiments.data.load_lm` (cfg.source='tfds',
cfg.tfds_name='wikitext103', cfg.tfds_data_dir='DIR').
"""

from __future__ import annotations

import tensorflow_datasets as tfds

_URL = ('https://s3.amazonaws.com/research.metamind.io/wikitext/'
        'wikitext-103-v1.zip')
_FILES = {'train': 'wiki.train.tokens', 'validation': 'wiki.valid.tokens',
          'test': 'wiki.test.tokens'}
_CITATION = """\
@inproceedings{merity2017pointer,
  title={Pointer Sentinel Mixture Models},
  author={Merity, Stephen and Xiong, Caiming and Bradbury, James and
          Socher, Richard},
  booktitle={International Conference on Learning Representations},
  year={2017}
}
"""


class Wikitext103(tfds.core.GeneratorBasedBuilder):
  """WikiText-103 (tokenized, v1): one example per line, in file order."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'One example per raw line of wiki.*.tokens.'}
  disable_shuffling = True

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=('WikiText-103: 28k Wikipedia Good/Featured articles, '
                     'tokenized; one example per line of the release.'),
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        homepage=('https://www.salesforce.com/blog/'
                  'the-wikitext-long-term-dependency-language-modeling-'
                  'dataset/'),
        citation=_CITATION,
        disable_shuffling=self.disable_shuffling)  # what the writer reads

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    directory = dl_manager.download_and_extract(_URL) / 'wikitext-103'
    return {split: self._generate_examples(directory / name)
            for split, name in _FILES.items()}

  def _generate_examples(self, path):
    """(line index, {'text': line}) for every line of `path`."""
    with path.open('rb') as f:
      for index, raw in enumerate(f):
        if raw.endswith(b'\n'):
          raw = raw[:-1]
        try:
          text = raw.decode('utf-8')
        except UnicodeDecodeError as e:
          raise ValueError(f'{path}:{index + 1}: not valid UTF-8 '
                           f'({e.reason}); re-download the file.') from None
        yield index, {'text': text}
