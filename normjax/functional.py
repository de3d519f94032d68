"""Pure normalization functions: `f(x, params, state, *, mask, ...) -> (y, new_state)`.

Every function takes activations with features on the last axis, optional
`params = {'scale', 'bias'}`, a state (a NamedTuple, or `EmptyState()`/None
for stateless norms), a `mask` that is True for real tokens, and returns the
output in the dtype of `x` together with the new state.
"""

from normjax._src.batch_norm import BatchNormState
from normjax._src.batch_norm import batch_norm
from normjax._src.batch_norm import init_batch_norm_state
from normjax._src.common import EmptyState
from normjax._src.layer_norm import group_scaling
from normjax._src.layer_norm import layer_norm
from normjax._src.layer_norm import rms_norm
from normjax._src.power_norm import PNVState
from normjax._src.power_norm import PowerNormState
from normjax._src.power_norm import init_pn_v_state
from normjax._src.power_norm import init_power_norm_state
from normjax._src.power_norm import pn_v
from normjax._src.power_norm import power_norm
from normjax._src.registry import FUNCTIONS
from normjax._src.registry import get_norm
from normjax._src.registry import init_state
from normjax._src.unified_norm import UnifiedNormState
from normjax._src.unified_norm import init_unified_norm_state
from normjax._src.unified_norm import unified_norm

__all__ = [
    'BatchNormState', 'EmptyState', 'FUNCTIONS', 'PNVState', 'PowerNormState',
    'UnifiedNormState', 'batch_norm', 'get_norm', 'group_scaling',
    'init_batch_norm_state', 'init_pn_v_state', 'init_power_norm_state',
    'init_state', 'init_unified_norm_state', 'layer_norm', 'pn_v',
    'power_norm', 'rms_norm', 'unified_norm',
]
