"""Per-token group statistics: GroupNorm and EvoNorm-S0.

For sequences [..., tokens, C] both norms split the C features of every token
into G equal groups and take statistics over one group of one token; neither
looks at other tokens, so both are batch-independent and causal.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from normjax._src import common
from normjax._src import definition as nd
from normjax._src import layer_norm as ln_lib
from normjax._src import rules

Array = jax.Array


GROUP_NORM_DOC = """GroupNorm over the features of each token.

  Wu & He, ECCV 2018, https://arxiv.org/abs/1803.08494:

      y[n, k] = (x[n, k] - mean_g(n)) / sqrt(var_g(n) + eps) * scale[k]
                + bias[k]

  where g is the group of feature k: the C features are split into
  `num_groups` contiguous groups of C / G, and mean_g / var_g (biased) are
  taken over the features of group g of token n only. This is
  `flax.linen.GroupNorm(reduction_axes=-1)` (flax's default reduces over
  every non-batch axis, i.e. also over the tokens of a sequence, which a
  Transformer must not do), with a two-pass variance. G = 1 is LayerNorm;
  G = C normalises every feature on its own (each output is then 0, or the
  bias).

  Args:
    x: [..., features] activations.
    params: optional `{'scale', 'bias'}` of shape [features].
    state: returned unchanged.
    mask: validated only; pads are normalised like any other token.
    use_running_average, axis_name: ignored (uniform signature).
  """

EVONORM_S0_DOC = """EvoNorm-S0, per token.

  Liu, Brock, Simonyan, Le, "Evolving Normalization-Activation Layers",
  NeurIPS 2020, https://arxiv.org/abs/2004.02967:

      y = x * sigmoid(v * x) / sqrt(s2_group(x) + eps) * scale + bias

  with per-feature v (init 1), scale (init 1) and bias (init 0), and
  s2_group the biased variance of the feature group of x (zoo spec
  section 6). Sequence adaptation (the spec's mapping, a design choice): the
  CNN's spatial axes become the token axis, but the group statistics are
  taken **per token** over the features of the group only, so the norm is
  batch-independent and causal. The numerator is not centred; only s2_group
  is. As in the official code (tensorflow/tpu `resnet_model.py`,
  `_group_std`), G starts at `num_groups` and is decremented until it
  divides the features (`evonorm_num_groups`). `nonlinearity=False` gives
  the official pure affine map y = scale * x + bias (no normalisation).

  Limits: v = 0 gives x / (2 sqrt(s2 + eps)) * scale + bias (scale-
  invariant as eps -> 0); v -> +inf gives relu(x) / sqrt(s2 + eps) * scale
  + bias.

  Args:
    x: [..., features] activations.
    params: optional `{'v', 'scale', 'bias'}` of shape [features]; without
      `v` the norm uses v = 1 (its init).
    state: returned unchanged.
    mask: validated only; pads are normalised like any other token.
    use_running_average, axis_name: ignored (uniform signature).
  """


def check_group_count(num_groups: Any, features: int, fn: str) -> None:
  if not rules.COUNT.accepts(num_groups):
    raise ValueError(f'{fn}: `num_groups` must be a positive int, got '
                     f'{num_groups!r}.')
  if features % num_groups:
    divisors = [g for g in range(1, features + 1) if features % g == 0]
    raise ValueError(
        f'{fn}: `num_groups`={num_groups} must divide the number of features '
        f'{features} of `x`; choose one of {divisors}.')


def grouped_centered_var(x: Array, num_groups: int) -> tuple[Array, Array]:
  """(x - group mean [..., G, C // G], group variance [..., G, 1]).

  Two passes over pivot-shifted values per (token, group), like `layer_norm`,
  so a large mean does not cost precision. `x` is in the statistics dtype.
  """
  c = x.shape[-1]
  xg = x.reshape(x.shape[:-1] + (num_groups, c // num_groups))
  # pylint: disable-next=protected-access
  return ln_lib._centered_and_var(xg, (xg.ndim - 1,), None, None, True)


def _group_norm(x, params, state, *, mask, use_running_average, axis_name,
                num_groups, eps):
  del use_running_average, axis_name
  fn = 'group_norm'
  x = common.check_input(x, fn)
  params = common.check_params(params, x.shape[-1], fn)
  common.check_mask(mask, x, fn)
  check_group_count(num_groups, x.shape[-1], fn)
  dtype = common.stats_dtype(x)
  centered, var = grouped_centered_var(x.astype(dtype), num_groups)
  z = (centered * jax.lax.rsqrt(var + eps)).reshape(x.shape)
  return common.affine(z, params, dtype).astype(x.dtype), state


GROUP_NORM = nd.register(nd.NormDefinition(
    kind='groupnorm', name='group_norm', module='GroupNorm',
    options=(nd.Option('num_groups', 32, 'G, must divide the features '
                       "(flax's default 32).", check=rules.COUNT),
             nd.Option('eps', 1e-6, "added to the variance (flax's GroupNorm "
                       'default 1e-6).', field='epsilon', check=rules.EPS)),
    doc=GROUP_NORM_DOC, apply=_group_norm))
group_norm = GROUP_NORM.function


def evonorm_num_groups(features: int, num_groups: int) -> int:
  """The official rule: decrement G from `num_groups` until it divides C."""
  g = num_groups
  while g > 1 and features % g:
    g -= 1
  return g


def _evonorm_s0(x, params, state, *, mask, use_running_average, axis_name,
                num_groups, nonlinearity, eps):
  del use_running_average, axis_name
  fn = 'evonorm_s0'
  x = common.check_input(x, fn)
  features = x.shape[-1]
  params = common.check_named_params(
      params, fn, {'v': (features,), 'scale': (features,),
                   'bias': (features,)}, features)
  common.check_mask(mask, x, fn)
  dtype = common.stats_dtype(x)
  xs = x.astype(dtype)
  v = params.pop('v', None)
  if not nonlinearity:
    return common.affine(xs, params, dtype).astype(x.dtype), state
  g = evonorm_num_groups(features, num_groups)
  _, var = grouped_centered_var(xs, g)  # var: [..., G, 1]
  inv_std = jnp.broadcast_to(jax.lax.rsqrt(var + eps),
                             var.shape[:-1] + (features // g,))
  inv_std = inv_std.reshape(x.shape)
  vx = xs if v is None else xs * common.feat(v.astype(dtype), x.ndim)
  z = xs * jax.nn.sigmoid(vx) * inv_std
  return common.affine(z, params, dtype).astype(x.dtype), state


EVONORM_S0 = nd.register(nd.NormDefinition(
    kind='evonorm_s0', name='evonorm_s0', module='EvoNormS0',
    options=(nd.Option('num_groups', 32, 'starting G (official 32).',
                       check=rules.COUNT),
             nd.Option('nonlinearity', True, 'False for the official '
                       'affine-only variant.', check=rules.FLAG),
             nd.Option('eps', 1e-5, 'added to the group variance (official '
                       '1e-5).', field='epsilon', check=rules.EPS)),
    doc=EVONORM_S0_DOC, apply=_evonorm_s0,
    extra_params=(nd.ParamSpec('v', 'v_init', 1.0,
                               enabled_by='nonlinearity'),)))
evonorm_s0 = EVONORM_S0.function
