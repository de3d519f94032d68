"""Inference-time folding of norms into the linear layers that read them.

Works on any model's variable tree given, per norm, where its variables are
and which Dense-like layers read it (`NormSite`); see
`normjax._src.folding` for the math. A pre-norm block

    h = norm(x); q, k, v = Dense(h) ...          # norm at ('block', 'norm')

folds with

    from normjax import folding
    site = folding.NormSite(('block', 'norm'), 'powernorm', {'num_groups': 4},
                            readers=(('block', 'query'), ('block', 'key'),
                                     ('block', 'value')))
    new_variables, replaced = folding.fold_norms(variables, [site])
    # replaced[('block', 'norm')].module_kwargs() -> make_norm(**...) of the
    # norm that stays: {'kind': 'group_scaling', 'num_groups': 4, ...}
"""

from normjax._src.folding import NormSite
from normjax._src.folding import Reader
from normjax._src.folding import Replacement
from normjax._src.folding import eval_affine
from normjax._src.folding import fold_into_reader
from normjax._src.folding import fold_norms
from normjax._src.folding import freeze_layernorm
from normjax._src.folding import layernorm_to_crmsnorm
from normjax._src.folding import layernorm_to_rmsnorm
from normjax._src.folding import recenter_writers
from normjax._src.freezing import calibrate_layernorm
from normjax._src.freezing import frozen_layernorm_interceptor

__all__ = [
    'NormSite', 'Reader', 'Replacement', 'calibrate_layernorm', 'eval_affine',
    'fold_into_reader', 'fold_norms', 'freeze_layernorm',
    'frozen_layernorm_interceptor', 'layernorm_to_crmsnorm',
    'layernorm_to_rmsnorm', 'recenter_writers',
]
