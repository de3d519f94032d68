"""WMT14 En->De translation with a choice of normalization.

    python -m experiments.wmt --config=powernorm --workdir=runs/wmt_pn
    python -m experiments.wmt --config=powernorm,demo   # embedded data, ~4 min
    python -m experiments.wmt --config=powernorm --mode=eval --checkpoint=averaged

Presets and their paper numbers: experiments/configs/wmt.py.
"""

from experiments import configs
from experiments import main_lib
from experiments import translation

_CONFIG = configs.define_config_flag('wmt')

if __name__ == '__main__':
  main_lib.run('wmt', _CONFIG, translation.train_and_evaluate,
               translation.evaluate)
