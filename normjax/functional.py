"""Pure normalization functions: `f(x, params, state, *, mask, ...) -> (y, new_state)`.

Every function takes activations with features on the last axis, optional
`params = {'scale', 'bias'}` (plus per-method names: DyT's `alpha`,
EvoNorm's `v`), a state (a NamedTuple, or `EmptyState()`/None for stateless
norms), a `mask` that is True for real tokens, and returns the output in the
dtype of `x` together with the new state.

`FUNCTIONS` holds the norms that fit that signature alone. The conditional
norms (`CONDITIONAL_FUNCTIONS`: adaLN-Zero, TD-LN, TD-RMSNorm) need a
conditioning keyword as well (`shift`/`scale`, `tau`). `qk_norm` normalises
queries and keys together and has its own signature.
"""

from normjax._src.batch_norm import BatchNormState
from normjax._src.batch_norm import PaperBatchNormState
from normjax._src.batch_norm import batch_norm
from normjax._src.batch_norm import init_batch_norm_state
from normjax._src.bcn import BCNState
from normjax._src.bcn import bcn
from normjax._src.bcn import init_bcn_state
from normjax._src.batch_norm import init_paper_batch_norm_state
from normjax._src.batch_norm import paper_batch_norm
from normjax._src.common import EmptyState
from normjax._src.conditional_norm import ada_ln_zero
from normjax._src.cpu_kernel import available as cpu_kernel_available  # noqa: F401
from normjax._src.cpu_kernel import use_cpu_kernel  # noqa: F401
from normjax._src.conditional_norm import adaln_modulation
from normjax._src.conditional_norm import dimr_tau
from normjax._src.conditional_norm import gated_residual
from normjax._src.conditional_norm import init_td_params
from normjax._src.conditional_norm import modulate
from normjax._src.conditional_norm import td_layer_norm
from normjax._src.conditional_norm import td_parameter
from normjax._src.conditional_norm import td_rms_norm
from normjax._src.dyt import dyt
from normjax._src.derf import derf
from normjax._src.dyt import dyt_alpha_init
from normjax._src.evonorm_b0 import EvoNormB0State
from normjax._src.evonorm_b0 import evonorm_b0
from normjax._src.evonorm_b0 import init_evonorm_b0_state
from normjax._src.group_norm import evonorm_num_groups
from normjax._src.group_norm import evonorm_s0
from normjax._src.group_norm import group_norm
from normjax._src.layer_norm import crms_norm
from normjax._src.layer_norm import group_scaling
from normjax._src.layer_norm import layer_norm
from normjax._src.layer_norm import layer_norm_scaling
from normjax._src.layer_norm import layer_norm_scaling_factor
from normjax._src.layer_norm import rms_norm
from normjax._src.power_norm import PNVState
from normjax._src.power_norm import PowerNormState
from normjax._src.power_norm import init_pn_v_state
from normjax._src.power_norm import init_power_norm_state
from normjax._src.power_norm import pn_v
from normjax._src.power_norm import power_norm
from normjax._src.power_norm import power_norm_autodiff
from normjax._src.qk_norm import qk_norm
from normjax._src.registry import CONDITIONAL_FUNCTIONS
from normjax._src.registry import FUNCTIONS
from normjax._src.registry import get_definition
from normjax._src.registry import get_norm
from normjax._src.registry import init_state
from normjax._src.seednorm import seednorm
from normjax._src.training import apply_backward_stats
from normjax._src.training import backward_stats
from normjax._src.training import with_backward_stats
from normjax._src.unified_norm import UnifiedNormState
from normjax._src.unified_norm import init_unified_norm_state
from normjax._src.unified_norm import unified_norm
from normjax._src.weight_standardization import weight_standardize

__all__ = [
    'BatchNormState', 'CONDITIONAL_FUNCTIONS', 'EmptyState', 'FUNCTIONS',
    'PNVState', 'PaperBatchNormState', 'PowerNormState', 'UnifiedNormState', 'ada_ln_zero',
    'adaln_modulation', 'apply_backward_stats', 'backward_stats',
    'batch_norm', 'crms_norm', 'dimr_tau', 'dyt',
    'dyt_alpha_init', 'evonorm_num_groups', 'evonorm_s0', 'gated_residual',
    'get_definition', 'get_norm', 'group_norm', 'group_scaling', 'init_batch_norm_state',
    'init_paper_batch_norm_state', 'init_pn_v_state',
    'init_power_norm_state', 'init_state',
    'init_td_params', 'init_unified_norm_state', 'layer_norm',
    'layer_norm_scaling', 'layer_norm_scaling_factor', 'modulate',
    'paper_batch_norm', 'pn_v',
    'power_norm', 'power_norm_autodiff', 'qk_norm', 'rms_norm',
    'td_layer_norm', 'td_parameter',
    'td_rms_norm', 'unified_norm', 'with_backward_stats',
    # The family additions.
    'BCNState', 'EvoNormB0State', 'bcn', 'derf', 'evonorm_b0',
    'init_bcn_state', 'init_evonorm_b0_state', 'seednorm',
    'weight_standardize',
]
