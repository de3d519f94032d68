"""Translation and language-model experiments, run from a checkout:
`python -m experiments.wmt`, `experiments.iwslt`, `experiments.lm`,
`experiments.sweep`. They need the `experiments` extra (checked here)."""

from experiments import _requirements

_requirements.check()
