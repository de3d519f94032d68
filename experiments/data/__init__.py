"""Input pipelines of the translation and language-model experiments.

Pure numpy, no JAX. Translation:

    from experiments.data import load_translation, TokenBatcher

    data = load_translation(config.data, cache_dir=workdir)
    train = TokenBatcher(data.train, max_tokens=4096, batch_multiple=devices)
    for batch in train: ...     # inputs/targets int32 [B, L], weights float32

Word-level language modelling (PTB, WikiText-2/103, the synthetic stories):

    from experiments.data import eval_batches, load_lm, StreamBatcher

    data = load_lm(config.data, cache_dir=workdir)   # int32 token streams
    train = StreamBatcher(data.train, batch_size=64, seq_len=256,
                          batch_multiple=devices)
    valid = eval_batches(data.valid, batch_size=64, seq_len=256,
                         batch_multiple=devices)  # every token once

Modules: synthetic (the embedded translation task), sources (local files /
tfds / synthetic text), vocab (word and sentencepiece vocabularies),
batching (TokenBatcher), pipeline (load_translation, TranslationData), lm
(load_lm, LMData, StreamBatcher, eval_batches, the synthetic stories),
wikitext103 (a tfds builder; imports tensorflow_datasets).
"""

from experiments.data.lm import eval_batches
from experiments.data.lm import LMData
from experiments.data.lm import load_lm
from experiments.data.lm import StreamBatcher
from experiments.data.pipeline import BOS_ID
from experiments.data.pipeline import EOS_ID
from experiments.data.pipeline import load_translation
from experiments.data.pipeline import PAD_ID
from experiments.data.pipeline import TokenBatcher
from experiments.data.pipeline import TranslationData
from experiments.data.pipeline import UNK_ID
from experiments.data.pipeline import Vocab

__all__ = ['BOS_ID', 'EOS_ID', 'PAD_ID', 'UNK_ID', 'LMData', 'StreamBatcher',
           'TokenBatcher', 'TranslationData', 'Vocab', 'eval_batches',
           'load_lm', 'load_translation']
