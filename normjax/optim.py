"""Optimizers for scale-invariant weights, as optax transforms (zoo spec §12).

    from normjax import optim
    tx = optim.adamp(1e-3, weight_decay=1e-2)            # AdamP (Heo et al.)
    tx = optax.chain(optax.adam(1e-3),                   # NaP (Lyle et al.)
                     optim.nap_project(optim.mask_by_path(r'query/kernel$')))

`adamp` removes the radial component of Adam's update for weights whose
gradient is nearly orthogonal to them (scale-invariant), `nap_project`
keeps chosen weights at their initial norm after every step. Both need
`params` in `update`. See `normjax._src.optimizers` for the rules.
"""

from normjax._src.optimizers import AdamPState
from normjax._src.optimizers import NaPState
from normjax._src.optimizers import adamp
from normjax._src.optimizers import adamp_projection
from normjax._src.optimizers import mask_by_path
from normjax._src.optimizers import nap_project

__all__ = ['AdamPState', 'NaPState', 'adamp', 'adamp_projection',
           'mask_by_path', 'nap_project']
