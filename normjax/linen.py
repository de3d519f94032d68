"""Flax linen modules wrapping `normjax.functional`, and `make_norm`."""

from normjax._src.modules import BATCH_STATS
from normjax._src.modules import CONDITIONAL_MODULES
from normjax._src.modules import GRAD_STATS
from normjax._src.modules import MODULES
from normjax._src.modules import PNV
from normjax._src.modules import AdaLNZero
from normjax._src.modules import BatchNorm
from normjax._src.modules import CRMSNorm
from normjax._src.modules import DyT
from normjax._src.modules import EvoNormS0
from normjax._src.modules import GroupNorm
from normjax._src.modules import GroupScaling
from normjax._src.modules import Identity
from normjax._src.modules import LayerNorm
from normjax._src.modules import LayerNormScaling
from normjax._src.modules import PowerNorm
from normjax._src.modules import QKNorm
from normjax._src.modules import RMSNorm
from normjax._src.modules import TDLayerNorm
from normjax._src.modules import TDRMSNorm
from normjax._src.modules import TimeDependentParameter
from normjax._src.modules import UnifiedNorm
from normjax._src.modules import make_norm

__all__ = [
    'BATCH_STATS', 'CONDITIONAL_MODULES', 'GRAD_STATS', 'MODULES', 'PNV',
    'AdaLNZero', 'BatchNorm', 'CRMSNorm', 'DyT', 'EvoNormS0', 'GroupNorm',
    'GroupScaling', 'Identity', 'LayerNorm', 'LayerNormScaling', 'PowerNorm',
    'QKNorm', 'RMSNorm', 'TDLayerNorm', 'TDRMSNorm', 'TimeDependentParameter',
    'UnifiedNorm', 'make_norm',
]
