"""Word-level language modelling (PTB, WikiText-103) with a choice of norm.

    python -m experiments.lm --config=ptb_powernorm --config.data.path=data/ptb
    python -m experiments.lm --config=ptb_powernorm,small \
        --config.data.path=../shared/data/ptb          # small budget
    python -m experiments.lm --config=ptb_powernorm,demo   # embedded corpus
    python -m experiments.lm --config=ptb_powernorm --mode=eval --split=test

Presets and their paper perplexities: experiments/configs/lm.py.
"""

from experiments import configs
from experiments import language_model
from experiments import main_lib

_CONFIG = configs.define_config_flag('lm', default='ptb_layernorm')

if __name__ == '__main__':
  main_lib.run('lm', _CONFIG, language_model.train_and_evaluate,
               language_model.evaluate, default_checkpoint='latest')
