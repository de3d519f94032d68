"""Input pipeline of the translation experiments (pure numpy, no JAX).

    from experiments.data import load_translation, TokenBatcher

    data = load_translation(config.data, cache_dir=workdir)
    train = TokenBatcher(data.train, max_tokens=4096, batch_multiple=devices)
    for batch in train: ...     # inputs/targets int32 [B, L], weights float32

Modules: synthetic (the embedded task), sources (local files / tfds /
synthetic text), vocab (word and sentencepiece vocabularies), batching
(TokenBatcher), pipeline (load_translation, TranslationData).
"""

from experiments.data.pipeline import BOS_ID
from experiments.data.pipeline import EOS_ID
from experiments.data.pipeline import load_translation
from experiments.data.pipeline import PAD_ID
from experiments.data.pipeline import TokenBatcher
from experiments.data.pipeline import TranslationData
from experiments.data.pipeline import UNK_ID
from experiments.data.pipeline import Vocab

__all__ = ['BOS_ID', 'EOS_ID', 'PAD_ID', 'UNK_ID', 'TokenBatcher',
           'TranslationData', 'Vocab', 'load_translation']
