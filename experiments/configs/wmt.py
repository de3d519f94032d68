"""WMT14 English->German presets (PowerNorm paper Table 1, big model).

    python -m experiments.wmt --config=powernorm --workdir=runs/wmt_pn

transformer_wmt_en_de_big_t2t: 6+6 layers, d 1024, FFN 4096, 16 heads,
pre-norm, shared embeddings, dropout 0.3/0.1/0.1, Adam (0.9, 0.98) with no
weight decay, inverse-sqrt lr 3e-3 with 8k warmup, label smoothing 0.1, 4096
tokens per GPU, beam 4, length penalty 0.6, average of the last 10
checkpoints. Data through tensorflow-datasets `wmt14_translate/de-en`
(prepare it where the machine has the files). Paper BLEU (tokenized,
multi-bleu): LN 29.5, BN 28.1, PN-V 28.5, PN 30.1.
"""

from experiments import configs
from experiments.configs import common


def wmt_base():
  c = common.translation_base()
  c.model.update(dict(d_model=1024, num_heads=16, ffn_dim=4096, max_len=1024))
  c.data.update(dict(source='tfds', tfds_name='wmt14_translate/de-en',
                     src_lang='en', tgt_lang='de', vocab='sentencepiece',
                     vocab_size=32768, max_len=256, max_tokens=4096 * 128))
  c.optim.weight_decay = 0.0
  c.schedule.peak_lr = 3e-3
  c.train.update(dict(num_steps=100000, keep_checkpoints=10,
                      early_stop_patience=10))
  c.decode.update(dict(beam_size=4, length_penalty=0.6, average_last=10,
                       lowercase_bleu=False))
  return c


def _adjust(norm, c):
  if norm == 'unified':  # UN published no WMT recipe: keep WMT's schedule
    c.schedule.peak_lr, c.schedule.warmup_steps = 3e-3, 8000


PRESETS = common.make_presets(wmt_base, _adjust)


def get_config(arg: str = 'layernorm'):
  return configs.build(PRESETS, arg)
