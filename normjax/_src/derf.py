"""Derf: Dynamic erf (Chen, Lu, Zhu, Sun, Liu, 2025).

"Stronger Normalization-Free Transformers", https://arxiv.org/abs/2512.10938;
official code zlab-princeton/Derf@6e1d81c1 (`ViT/dynamic_erf.py`: alpha and
shift are (1,) parameters, initialised to 0.5 and 0; weight ones, bias
zeros).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from normjax._src import common
from normjax._src import definition as nd
from normjax._src import rules

Array = jax.Array

# The official defaults (`alpha_init_value=0.5`, `shift_init_value=0.0`).
DEFAULT_ALPHA = 0.5
DEFAULT_SHIFT = 0.0

DERF_DOC = """Dynamic erf, a statistics-free drop-in for LayerNorm/RMSNorm.

      y = scale * erf(alpha * x + shift) + bias

  elementwise, with two learnable scalars per layer, `alpha` and `shift`
  (shape (1,), as in the official code; init 0.5 and 0) and per-feature
  `scale` (init 1) and `bias` (init 0). Chen et al. 2025,
  https://arxiv.org/abs/2512.10938 (zlab-princeton/Derf). Backward is plain
  autodiff. Like DyT it looks at no other feature, token or example; with
  shift = 0 and bias = 0 it is odd in x, and |y| <= |scale| + |bias|.
  Not an affine map: it does not fold.

  Args:
    x: [..., features] activations.
    params: optional `{'alpha': (1,) or (), 'shift': (1,) or (),
      'scale': [features], 'bias': [features]}`; a missing alpha or shift
      takes the option's value.
    state: returned unchanged.
    mask: validated only: pads are transformed like any other token and
      cannot affect real ones.
    use_running_average, axis_name: ignored (uniform signature).

  Returns:
    `(y, state)` with `y` in the dtype of `x`, computed in float32 (float64
    for float64 input).
  """


def _derf(x, params, state, *, mask, use_running_average, axis_name, alpha,
          shift):
  del use_running_average, axis_name
  fn = 'derf'
  x = common.check_input(x, fn)
  features = x.shape[-1]
  params = common.check_named_params(
      params, fn, {'alpha': ((1,), ()), 'shift': ((1,), ()),
                   'scale': (features,), 'bias': (features,)}, features)
  common.check_mask(mask, x, fn)
  dtype = common.stats_dtype(x)
  one = (1,) * x.ndim
  a = jnp.reshape(jnp.asarray(params.pop('alpha', alpha), dtype), one)
  s = jnp.reshape(jnp.asarray(params.pop('shift', shift), dtype), one)
  y = common.affine(jax.lax.erf(a * x.astype(dtype) + s), params, dtype)
  return y.astype(x.dtype), state


_REAL = rules.number(-math.inf, math.inf, low_open=True, high_open=True)

DERF = nd.register(nd.NormDefinition(
    kind='derf', name='derf', module='Derf',
    options=(
        nd.Option('alpha', DEFAULT_ALPHA,
                  "alpha_0: the fixed alpha when `params` holds none, and the "
                  "module's initial alpha (official 0.5).",
                  field='alpha_init', check=_REAL),
        nd.Option('shift', DEFAULT_SHIFT,
                  "s_0: the fixed shift when `params` holds none, and the "
                  "module's initial shift (official 0).",
                  field='shift_init', check=_REAL)),
    doc=DERF_DOC, apply=_derf,
    extra_params=(nd.ParamSpec('alpha', 'alpha_init', DEFAULT_ALPHA,
                               shape='one'),
                  nd.ParamSpec('shift', 'shift_init', DEFAULT_SHIFT,
                               shape='one'))))
derf = DERF.function
