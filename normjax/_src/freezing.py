"""LayerNorm freezing for flax.linen models: calibration and the FakeLN model.

`calibrate_layernorm` measures, for every normjax `LayerNorm` module of a
model, s = mean over real tokens of sqrt(var(x) + eps) (zoo spec §9's
sigma_avg, a plain mean instead of its EMA); `normjax.folding.
freeze_layernorm` folds FakeLN(x) = scale (x - mean x) / s + bias into the
readers, and `frozen_layernorm_interceptor` runs the unfolded FakeLN model
(the model the folded one equals to rounding).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from normjax._src import common
from normjax._src import definition as nd
from normjax._src import modules

Path = tuple[str, ...]


def _is_layer_norm_call(context: Any) -> bool:
  layer_norm = modules.module_for(nd.REGISTRY['layernorm'])
  return (isinstance(context.module, layer_norm)
          and context.method_name == '__call__')


def _sigma(module: nn.Module, x: jax.Array) -> jax.Array:
  """sqrt(var(x) + eps) per token, in the statistics dtype."""
  xf = x.astype(common.stats_dtype(x))
  centred = xf - jnp.mean(xf, axis=-1, keepdims=True)
  return jnp.sqrt(jnp.mean(jnp.square(centred), axis=-1) + module.epsilon)


def calibrate_layernorm(apply_fn: Callable[..., Any], variables: Mapping,
                        batches: Iterable[tuple[Any, ...]]
                        ) -> dict[Path, float]:
  """{LayerNorm module path: s}, s = mean over real tokens of sqrt(var+eps).

  `apply_fn(variables, *batch)` runs the model in evaluation mode (e.g.
  `lambda v, x: model.apply(v, x, train=False)`); `batches` are its
  positional arguments. Real tokens are those each norm's mask marks.
  """
  @jax.jit
  def stats(variables, args):
    found = {}

    def interceptor(next_fun, fargs, kwargs, context):
      if _is_layer_norm_call(context):
        sigma = _sigma(context.module, fargs[0])
        mask = kwargs.get('mask')
        mask = (jnp.ones(sigma.shape, sigma.dtype) if mask is None else
                jnp.broadcast_to(mask, sigma.shape).astype(sigma.dtype))
        found['/'.join(context.module.path)] = (jnp.sum(sigma * mask),
                                                jnp.sum(mask))
      return next_fun(*fargs, **kwargs)

    with nn.intercept_methods(interceptor):
      apply_fn(variables, *args)
    return found

  totals: dict[str, list[float]] = {}
  for batch in batches:
    for name, (s, n) in stats(variables, tuple(batch)).items():
      t = totals.setdefault(name, [0.0, 0.0])
      t[0] += float(s)
      t[1] += float(n)
  if not totals:
    raise ValueError('calibrate_layernorm: no calibration batch, or no '
                     'LayerNorm in the model.')
  empty = [k for k, (_, n) in totals.items() if n == 0]
  if empty:
    raise ValueError(f'calibrate_layernorm: no real token reached {empty}.')
  return {tuple(k.split('/')): s / n for k, (s, n) in totals.items()}


def frozen_layernorm_interceptor(sigmas: Mapping[Path, float]):
  """For `nn.intercept_methods`: the LayerNorms at `sigmas`' paths compute
  scale * (x - mean(x)) / s + bias (FakeLN, zoo spec §9), the model that
  `freeze_layernorm` folds."""
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    path = tuple(module.path)
    if not _is_layer_norm_call(context) or path not in sigmas:
      return next_fun(*args, **kwargs)
    x = args[0]
    dtype = common.stats_dtype(x)
    xf = x.astype(dtype)
    z = (xf - jnp.mean(xf, axis=-1, keepdims=True)) / jnp.asarray(
        sigmas[path], dtype)
    params = nd.effective_params(
        module.variables.get('params', {}),
        getattr(module, nd.ZERO_CENTERED_SCALE.name, False), dtype)
    y = common.affine(z, params, dtype)
    return y.astype(x.dtype if module.dtype is None else module.dtype)
  return interceptor
