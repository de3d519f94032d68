"""QK-norm: LayerNorm or RMSNorm of the attention queries and keys.

Dehghani et al. 2023 (ViT-22B, https://arxiv.org/abs/2302.05442) and OLMo 2
(https://arxiv.org/abs/2501.00656); zoo spec section 11.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from normjax._src import common
from normjax._src import layer_norm as ln_lib

Array = jax.Array

KINDS = ('rmsnorm', 'layernorm')


def _check(t: Any, name: str, fn: str) -> Array:
  if not hasattr(t, 'dtype') or not hasattr(t, 'shape'):
    t = jnp.asarray(t)
  if not jnp.issubdtype(t.dtype, jnp.floating):
    raise TypeError(f'{fn}: `{name}` must be a floating-point array, got '
                    f'dtype {t.dtype}.')
  if t.ndim < 2 or 0 in t.shape[-2:]:
    raise ValueError(
        f'{fn}: `{name}` must have shape [..., heads, head_dim], got '
        f'{tuple(t.shape)}.')
  return t


def _norm_one(t, params, name, fn, kind, eps, per_head):
  heads, head_dim = t.shape[-2:]
  shapes = ((head_dim,), (heads, head_dim))
  params = common.check_named_params(
      params, fn, {'scale': shapes, 'bias': shapes}, None,
      path=f'params_{name}')
  dtype = common.stats_dtype(t)
  v = t.astype(dtype)
  if not per_head:  # over the full projected width heads * head_dim
    v = v.reshape(t.shape[:-2] + (heads * head_dim,))
  values, moment = ln_lib._centered_and_var(  # pylint: disable=protected-access
      v, (v.ndim - 1,), None, None, kind == 'layernorm')
  z = (values * jax.lax.rsqrt(moment + eps)).reshape(t.shape)
  for key in ('scale', 'bias'):
    if key in params:
      p = params[key].astype(dtype)
      p = p.reshape((1,) * (t.ndim - p.ndim) + p.shape)
      z = z * p if key == 'scale' else z + p
  return z.astype(t.dtype)


def qk_norm(
    q: Array,
    k: Array,
    params_q: Any = None,
    params_k: Any = None,
    *,
    kind: str = 'rmsnorm',
    eps: float = 1e-6,
    per_head: bool = True,
) -> tuple[Array, Array]:
  """Normalises queries and keys before the attention logits.

      logits = N_q(q) . N_k(k) / sqrt(head_dim)

  N is RMSNorm (`kind='rmsnorm'`) or LayerNorm (`'layernorm'`, the flax
  `normalize_qk=True` / ViT-22B form, LN without bias), eps 1e-6 in both
  references.

  * `per_head=True`: statistics over head_dim, per head (ViT-22B, flax).
  * `per_head=False`: statistics over the full projected width
    heads * head_dim of each token (OLMo 2, which normalises before the
    split into heads and before RoPE; apply this before RoPE as well).

  Each of `params_q` and `params_k` may hold `scale` (and `bias`) of shape
  (head_dim,) shared across heads (flax, ViT-22B) or (heads, head_dim) per
  head (OLMo 2's full-width affine); q and k have their own parameters, so
  k may have fewer heads (grouped-query attention).

  Args:
    q: [..., heads, head_dim] queries.
    k: [..., kv_heads, head_dim] keys.
    params_q, params_k: optional `{'scale', 'bias'}`.
    kind: 'rmsnorm' or 'layernorm'.
    eps: added to the mean square / variance.
    per_head: see above.

  Returns:
    `(q, k)` normalised, each in its input dtype.
  """
  fn = 'qk_norm'
  common.check_choice(kind, 'kind', KINDS, fn)
  q = _check(q, 'q', fn)
  k = _check(k, 'k', fn)
  if q.shape[-1] != k.shape[-1]:
    raise ValueError(
        f'{fn}: `q` and `k` must have the same head_dim (last axis), got '
        f'shapes {tuple(q.shape)} and {tuple(k.shape)}.')
  return (_norm_one(q, params_q, 'q', fn, kind, eps, per_head),
          _norm_one(k, params_k, 'k', fn, kind, eps, per_head))
