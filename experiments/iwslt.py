"""IWSLT14 De->En translation with a choice of normalization.

    python -m experiments.iwslt --config=powernorm --config.data.path=data/iwslt14.tokenized.de-en
    python -m experiments.iwslt --config=layernorm,multi30k   # real data, ~30 min on 2 cores

Presets and their paper numbers: experiments/configs/iwslt.py.
"""

from experiments import configs
from experiments import main_lib
from experiments import translation

_CONFIG = configs.define_config_flag('iwslt')

if __name__ == '__main__':
  main_lib.run('iwslt', _CONFIG, translation.train_and_evaluate,
               translation.evaluate)
