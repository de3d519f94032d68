"""SeeDNorm: Self-Rescaled Dynamic Normalization (Cai, Zhu, Liu, Min, 2025).

ICLR 2026, https://arxiv.org/abs/2510.22777. No official code was found;
the initialisation of alpha and beta is not confirmed from the paper here
(see `SEEDNORM_DOC`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from normjax._src import common
from normjax._src import definition as nd
from normjax._src import rules

Array = jax.Array

# Our choice (unconfirmed in the paper): alpha = 1, beta = 0. At init
# tanh(x . 0) = 0, so SeeDNorm starts as RMSNorm exactly, and neither
# parameter is stuck (d/dbeta is proportional to alpha, which is not 0;
# alpha = beta = 0 would be a saddle with both gradients 0).
DEFAULT_ALPHA = 1.0
DEFAULT_BETA = 0.0

SEEDNORM_DOC = """SeeDNorm, RMSNorm with an input-dependent scale.

  Cai, Zhu, Liu, Min, ICLR 2026, https://arxiv.org/abs/2510.22777:

      y = [tanh(x . beta) * alpha + scale] * x / RMS(x),
      RMS(x) = sqrt(mean(x^2) + eps)

  per token, with per-feature `alpha`, `beta` and `scale` (gamma); x . beta
  is one scalar per token (a dot product over the features). alpha = 0 is
  RMSNorm exactly. Inits: scale 1; alpha 1 and beta 0 are normjax's choice
  (the paper's values are not confirmed here): the norm starts as RMSNorm
  and both alpha and beta receive gradient from the first step (alpha =
  beta = 0 would be a saddle). No bias by default (`use_bias=False`, as
  RMSNorm); `params['bias']` is added if given. The paper discusses
  instability fixes (initialisation, weight decay on alpha/beta): apply
  them in the optimizer. Per token: batch-independent and causal.

  Args:
    x: [..., features] activations.
    params: optional `{'alpha', 'beta', 'scale', 'bias'}` of shape
      [features]; without `alpha`/`beta` their inits are used (so the norm
      is RMSNorm).
    state: returned unchanged.
    mask: validated only: pads are normalised like any other token.
    use_running_average, axis_name: ignored (uniform signature).

  Returns:
    `(y, state)` with `y` in the dtype of `x`.
  """


def _seednorm(x, params, state, *, mask, use_running_average, axis_name,
              eps):
  del use_running_average, axis_name
  fn = 'seednorm'
  x = common.check_input(x, fn)
  features = x.shape[-1]
  params = common.check_named_params(
      params, fn, {name: (features,) for name in
                   ('alpha', 'beta', 'scale', 'bias')}, features)
  common.check_mask(mask, x, fn)
  dtype = common.stats_dtype(x)
  xs = x.astype(dtype)
  alpha = params.pop('alpha', None)
  beta = params.pop('beta', None)
  z = xs * jax.lax.rsqrt(jnp.mean(jnp.square(xs), -1, keepdims=True) + eps)
  gain = (common.feat(params.pop('scale').astype(dtype), x.ndim)
          if 'scale' in params else jnp.ones((1,) * x.ndim, dtype))
  if alpha is not None or beta is not None:
    alpha = jnp.full((features,), DEFAULT_ALPHA, dtype) if alpha is None \
        else alpha.astype(dtype)
    beta = jnp.full((features,), DEFAULT_BETA, dtype) if beta is None \
        else beta.astype(dtype)
    proj = jnp.sum(xs * common.feat(beta, x.ndim), -1, keepdims=True)
    gain = gain + jnp.tanh(proj) * common.feat(alpha, x.ndim)
  y = common.affine(z * gain, params, dtype)
  return y.astype(x.dtype), state


SEEDNORM = nd.register(nd.NormDefinition(
    kind='seednorm', name='seednorm', module='SeeDNorm',
    options=(nd.Option('eps', 1e-6, 'added to the mean square (as flax '
                       'RMSNorm, 1e-6).', field='epsilon',
                       check=rules.EPS),),
    doc=SEEDNORM_DOC, apply=_seednorm, use_bias=False,
    extra_params=(nd.ParamSpec('alpha', 'alpha_init', DEFAULT_ALPHA),
                  nd.ParamSpec('beta', 'beta_init', DEFAULT_BETA))))
seednorm = SEEDNORM.function
