"""Flax linen modules wrapping `normjax.functional`, and `make_norm`."""

from normjax._src.modules import BATCH_STATS
from normjax._src.modules import GRAD_STATS
from normjax._src.modules import MODULES
from normjax._src.modules import PNV
from normjax._src.modules import BatchNorm
from normjax._src.modules import GroupScaling
from normjax._src.modules import Identity
from normjax._src.modules import LayerNorm
from normjax._src.modules import PowerNorm
from normjax._src.modules import RMSNorm
from normjax._src.modules import UnifiedNorm
from normjax._src.modules import make_norm

__all__ = [
    'BATCH_STATS', 'GRAD_STATS', 'MODULES', 'PNV', 'BatchNorm', 'GroupScaling',
    'Identity', 'LayerNorm', 'PowerNorm', 'RMSNorm', 'UnifiedNorm',
    'make_norm',
]
