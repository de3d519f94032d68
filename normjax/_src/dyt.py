"""DyT: Dynamic Tanh (Zhu, Chen, He, LeCun, Liu, CVPR 2025).

"Transformers without Normalization", https://arxiv.org/abs/2503.10622;
official code jiachenzhu/DyT (`dynamic_tanh.py`,
`other_tasks/LLaMA/fms_fsdp/models/llama.py`). Zoo spec section 5.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from normjax._src import common
from normjax._src import definition as nd
from normjax._src import rules

Array = jax.Array

# alpha_0 of the non-LLM recipes (ViT, ConvNeXt, MAE, DINO, DiT, wav2vec 2.0,
# DNA models): one value everywhere.
DEFAULT_ALPHA = 0.5

# The LLaMA recipe (other_tasks/LLaMA/README.md), one row per LLaMA 2 size:
# (model, d_model, attention-input alpha_0, FFN-input alpha_0, final alpha_0).
# The README lists the sizes; the widths are those of the LLaMA 2
# architectures (34B and 70B share 8192 and their alpha_0).
LLAMA_ALPHA = (
    ('7B', 4096, 0.8, 0.2, 0.2),
    ('13B', 5120, 0.6, 0.15, 0.15),
    ('34B', 8192, 0.2, 0.05, 0.05),
    ('70B', 8192, 0.2, 0.05, 0.05),
)
SITES = ('default', 'attention', 'ffn', 'final')

DYT_DOC = """Dynamic Tanh, a statistics-free drop-in for LayerNorm/RMSNorm.

      y = scale * tanh(alpha * x) + bias

  elementwise, with one learnable scalar `alpha` per layer (shape (1,) as
  in the official code) and per-feature `scale` (init 1) and `bias` (init
  0). The LLaMA variant has no bias; the DiT variant without affine is
  tanh(alpha x). Backward is plain autodiff.

  Args:
    x: [..., features] activations.
    params: optional `{'alpha': (1,) or (), 'scale': [features],
      'bias': [features]}`.
    state: returned unchanged.
    mask: validated only. DyT uses no statistics: pad tokens are transformed
      like any other token and cannot affect real ones.
    use_running_average, axis_name: ignored (uniform signature).

  Returns:
    `(y, state)` with `y` in the dtype of `x`, computed in float32 (float64
    for float64 input).
  """


def dyt_alpha_init(site: str = 'default', width: int | None = None, *,
                   strict: bool = False) -> float:
  """alpha_0 of a DyT layer by its site and the model width (spec section 5c).

  * `site='default'`: 0.5, the value of every non-LLM recipe (width unused).
  * `site` in 'attention' (the attention-input norm), 'ffn' (the FFN-input
    norm), 'final' (the norm before the head): the LLaMA 2 table,
    attention 0.8 / 0.6 / 0.2 and FFN = final 0.2 / 0.15 / 0.05 for
    d_model 4096 (7B) / 5120 (13B) / 8192 (34B, 70B).

  The table has three widths only. For another width the row of the
  smallest listed width >= `width` is used (so any width <= 4096 gets the 7B
  row, and widths > 8192 the 8192 row): an extrapolation the paper does not
  make. `strict=True` raises for a width that is not in the table instead.
  """
  fn = 'dyt_alpha_init'
  common.check_choice(site, 'site', SITES, fn)
  if site == 'default':
    return DEFAULT_ALPHA
  if isinstance(width, bool) or not isinstance(width, int) or width < 1:
    raise ValueError(
        f'{fn}: site {site!r} needs `width` (d_model, a positive int): the '
        f'LLaMA alpha_0 depends on it. Got {width!r}.')
  widths = sorted({row[1] for row in LLAMA_ALPHA})
  if strict and width not in widths:
    raise ValueError(
        f'{fn}: `width`={width} is not in the LLaMA 2 table (widths '
        f'{widths}); pass strict=False to use the nearest wider row.')
  row = next((r for r in LLAMA_ALPHA if width <= r[1]), LLAMA_ALPHA[-1])
  return {'attention': row[2], 'ffn': row[3], 'final': row[4]}[site]


def _dyt(x, params, state, *, mask, use_running_average, axis_name, alpha):
  del use_running_average, axis_name
  fn = 'dyt'
  x = common.check_input(x, fn)
  features = x.shape[-1]
  params = common.check_named_params(
      params, fn, {'alpha': ((1,), ()), 'scale': (features,),
                   'bias': (features,)}, features)
  common.check_mask(mask, x, fn)
  dtype = common.stats_dtype(x)
  a = params.pop('alpha', _alpha_value(alpha, features))
  a = jnp.reshape(jnp.asarray(a, dtype), (1,) * x.ndim)
  y = common.affine(jnp.tanh(a * x.astype(dtype)), params, dtype)
  return y.astype(x.dtype), state


def _alpha_value(alpha_init: float | str, features: int) -> float:
  """alpha_0: a float, or a site name of `dyt_alpha_init` with the width."""
  if isinstance(alpha_init, str):
    return dyt_alpha_init(alpha_init, features)
  return alpha_init


DYT = nd.register(nd.NormDefinition(
    kind='dyt', name='dyt', module='DyT',
    options=(nd.Option(
        'alpha', DEFAULT_ALPHA,
        "alpha_0: the fixed alpha when `params` holds none, and the module's "
        "initial alpha; a float or a site name of `dyt_alpha_init` "
        "('default', 'attention', 'ffn', 'final', resolved with the width of "
        '`x`, the LLaMA recipe). The LLaMA variant has no bias: '
        '`use_bias=False`.', field='alpha_init',
        check=rules.either(rules.number(-math.inf, math.inf, low_open=True,
                                        high_open=True),
                           rules.one_of(*SITES))),),
    doc=DYT_DOC, apply=_dyt,
    extra_params=(nd.ParamSpec('alpha', 'alpha_init', DEFAULT_ALPHA,
                               shape='one', to_value=_alpha_value),)))
dyt = DYT.function
