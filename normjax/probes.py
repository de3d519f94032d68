"""Training-dynamics probes of the norm modules (see `normjax._src.probes`).

    y, out = model.apply(variables, x, train=True,
                         mutable=['batch_stats', 'probes'])
    normjax.probes.flatten(out['probes'])  # {'layer_0/ffn_norm/act_var': ...}
"""

from normjax._src.probes import PROBES
from normjax._src.probes import activation_probes
from normjax._src.probes import flatten
from normjax._src.probes import nonfinite_probes
from normjax._src.probes import record
from normjax._src.probes import statistic_distances

__all__ = ['PROBES', 'activation_probes', 'flatten', 'nonfinite_probes',
           'record', 'statistic_distances']
