"""Flax linen modules of every norm, derived from the norm definitions.

`LayerNorm`, `RMSNorm`, `BatchNorm`, `PowerNorm`, `PNV`, `UnifiedNorm`,
`GroupScaling`, `DyT`, `CRMSNorm`, `GroupNorm`, `EvoNormS0`,
`LayerNormScaling` (one per registered norm, `MODULES[kind]`), `Identity`,
the conditional `AdaLNZero`, `TDLayerNorm`, `TDRMSNorm`, `QKNorm`, and
`make_norm`.
"""

from normjax._src.conditional_modules import CONDITIONAL_MODULES
from normjax._src.conditional_modules import AdaLNZero
from normjax._src.conditional_modules import QKNorm
from normjax._src.conditional_modules import TDLayerNorm
from normjax._src.conditional_modules import TDRMSNorm
from normjax._src.conditional_modules import TimeDependentParameter
from normjax._src.definition import REGISTRY as _REGISTRY
from normjax._src.modules import BATCH_STATS
from normjax._src.modules import GRAD_STATS
from normjax._src.modules import MODULES
from normjax._src.modules import Identity
from normjax._src.modules import make_norm
from normjax._src.modules import module_fields
from normjax._src.modules import module_for
from normjax._src.weight_standardization import WSDense

# One class per registered norm, under its module name (PowerNorm, ...).
globals().update({d.module: module_for(d) for d in _REGISTRY.values()})

__all__ = [  # noqa: PLE0604  (the module names are strings)
    'BATCH_STATS', 'CONDITIONAL_MODULES', 'GRAD_STATS', 'MODULES',
    'AdaLNZero', 'Identity', 'QKNorm', 'TDLayerNorm', 'TDRMSNorm',
    'TimeDependentParameter', 'WSDense', 'make_norm', 'module_fields', 'module_for',
    *sorted(d.module for d in _REGISTRY.values()),
]
