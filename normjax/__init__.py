"""normjax: normalization for Transformers in JAX, with exact PowerNorm and UN.

    from normjax import functional as nf   # pure functions
    from normjax import linen as nnorm     # Flax modules
    from normjax import probes             # training-dynamics probes
"""

from normjax import functional
from normjax import linen
from normjax import probes
from normjax._src.training import apply_backward_stats

__version__ = '0.1.0'

__all__ = ['apply_backward_stats', 'functional', 'linen', 'probes']
