"""IWSLT14 German->English presets (PowerNorm paper Table 1, small model).

    python -m experiments.iwslt --config=powernorm --workdir=runs/iwslt_pn

Data: the fairseq-prepared IWSLT14 (Moses-tokenized, lowercased, 10k joint
BPE) in `data/iwslt14.tokenized.de-en/{train,valid,test}.{de,en}`
(`--config.data.path=...`). Paper BLEU (tokenized, fairseq generate):
LN 35.5, BN 34.4, PN-V 35.5, PN 35.9; UN repository: UN 35.4 (LN 35.3).
"""

from experiments import configs
from experiments.configs import common


PRESETS = common.make_presets(common.translation_base)


def get_config(arg: str = 'layernorm'):
  return configs.build(PRESETS, arg)
