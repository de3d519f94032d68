"""Flax NNX modules of every norm, derived from the norm definitions.

`LayerNorm`, `RMSNorm`, `BatchNorm`, `PowerNorm`, `PNV`, `UnifiedNorm`,
`GroupScaling`, `DyT`, `CRMSNorm`, `GroupNorm`, `EvoNormS0`,
`LayerNormScaling` (one per registered norm, `MODULES[kind]`), `Identity`,
`make_norm`, the `BackwardStat` variable type and the train-step helper
`value_and_grad`:

    grad_fn = normjax.nnx.value_and_grad(loss_fn)
    loss, grads = grad_fn(model, x, mask)   # BackwardStats updated in place
    optimizer.update(model, grads)          # nnx.Optimizer(..., wrt=nnx.Param)
"""

from normjax._src.definition import REGISTRY as _REGISTRY
from normjax._src.nnx_modules import MODULES
from normjax._src.nnx_modules import BackwardStat
from normjax._src.nnx_modules import Identity
from normjax._src.nnx_modules import make_norm
from normjax._src.nnx_modules import nnx_module_for
from normjax._src.nnx_training import add_backward_stats
from normjax._src.nnx_training import value_and_grad
from normjax._src.weight_standardization import WSLinear

# One class per registered norm, under its module name (PowerNorm, ...).
globals().update({d.module: nnx_module_for(d) for d in _REGISTRY.values()})

__all__ = [  # noqa: PLE0604  (the module names are strings)
    'MODULES', 'BackwardStat', 'Identity', 'WSLinear', 'add_backward_stats',
    'make_norm',
    'nnx_module_for', 'value_and_grad',
    *sorted(d.module for d in _REGISTRY.values()),
]
