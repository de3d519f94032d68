"""normjax: normalization for Transformers in JAX, with exact PowerNorm and UN.

    from normjax import functional as nf   # pure functions
    from normjax import linen as nnorm     # Flax modules
    from normjax import probes             # training-dynamics probes
    from normjax import folding            # inference-time folding
    from normjax import nnx                # Flax NNX modules
    from normjax import optim              # AdamP, NaP (optax)

Every norm is one `normjax.NormDefinition` (its math, options, state and
evaluation map); `normjax.register` adds a new one to all of the above.
"""

from normjax import folding
from normjax import functional
from normjax import linen
from normjax import nnx
from normjax import optim
from normjax import probes
from normjax._src.definition import EvalAffine
from normjax._src.definition import NormDefinition
from normjax._src.definition import Option
from normjax._src.definition import ParamSpec
from normjax._src.definition import register
from normjax._src.definition import unregister
from normjax._src.training import apply_backward_stats
from normjax._src.training import backward_stats
from normjax._src.training import value_and_grad
from normjax._src.training import with_backward_stats
from normjax._src.weight_standardization import weight_standardize

__version__ = '0.1.0'

__all__ = [
    'EvalAffine', 'NormDefinition', 'Option', 'ParamSpec',
    'apply_backward_stats', 'folding', 'functional', 'linen', 'nnx', 'optim',
    'probes',
    'register', 'unregister', 'backward_stats', 'value_and_grad',
    'weight_standardize', 'with_backward_stats',
]
