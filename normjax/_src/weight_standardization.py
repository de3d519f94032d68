"""Weight Standardization (Qiao et al. 2019) of Dense kernels.

Zoo spec section 7: for each output unit j (a column of a flax kernel
[in, ..., out]: every axis but the last is reduced),

    W_hat[:, j] = (W[:, j] - mean(W[:, j])) / (std(W[:, j]) + eps)

with the population std (ddof=0) and eps = 1e-5 by default (the TF README
snippet of joe-siyuan-qiao/WeightStandardization@d81e50d0; the PyTorch
snippet uses ddof=1). Autodiff runs through the standardisation. Use it on
layers whose outputs are normalised (before BCN/GroupNorm, QK-norm).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen import dtypes as linen_dtypes

from normjax._src import rules

Array = jax.Array


def weight_standardize(kernel: Array, eps: float = 1e-5, ddof: int = 0
                       ) -> Array:
  """The standardised kernel: every column (last axis) has mean 0 and std
  sigma / (sigma + eps) ~ 1 over all other axes.

  Computed in float32 (float64 for a float64 kernel); returns the kernel's
  dtype. `ddof=1` gives the unbiased std (PyTorch README snippet).
  """
  fn = 'weight_standardize'
  kernel = jnp.asarray(kernel)
  if not jnp.issubdtype(kernel.dtype, jnp.floating):
    raise TypeError(f'{fn}: `kernel` must be floating-point, got dtype '
                    f'{kernel.dtype}.')
  if kernel.ndim < 2:
    raise ValueError(f'{fn}: `kernel` must have rank >= 2 ([in, ..., out]), '
                     f'got shape {tuple(kernel.shape)}.')
  if not rules.EPS.accepts(eps):
    raise ValueError(f'{fn}: `eps` must be {rules.EPS.expected}, got '
                     f'{eps!r}.')
  n = kernel.size // kernel.shape[-1]
  if not rules.integer(0).accepts(ddof) or ddof >= n:
    raise ValueError(f'{fn}: `ddof` must be an int in [0, {n - 1}] (the '
                     f'column has {n} entries), got {ddof!r}.')
  dtype = jnp.promote_types(kernel.dtype, jnp.float32)
  w = kernel.astype(dtype)
  axes = tuple(range(kernel.ndim - 1))
  centered = w - jnp.mean(w, axis=axes, keepdims=True)
  std = jnp.sqrt(jnp.sum(jnp.square(centered), axis=axes, keepdims=True)
                 / (n - ddof))
  return (centered / (std + eps)).astype(kernel.dtype)


class WSDense(nn.Module):
  """`nn.Dense` whose kernel is weight-standardised on every call.

  Same parameters (`kernel` [in, features], `bias`) and fields as
  nn.Dense, plus `ws_eps` and `ws_ddof` (see `weight_standardize`); the
  stored kernel is the raw one.

  Attributes:
    features: output width.
    use_bias: add a learned bias.
    dtype: computation dtype (None: promoted from the inputs).
    param_dtype: dtype of the params.
    precision: `jax.lax.dot_general` precision.
    kernel_init: init of the raw kernel.
    bias_init: init of the bias.
    ws_eps: epsilon of the standardisation.
    ws_ddof: degrees of freedom of its variance.
  """
  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros
  ws_eps: float = 1e-5
  ws_ddof: int = 0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param('kernel', self.kernel_init,
                        (jnp.shape(x)[-1], self.features), self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    kernel = weight_standardize(kernel, self.ws_eps, self.ws_ddof)
    x, kernel, bias = linen_dtypes.promote_dtype(x, kernel, bias,
                                              dtype=self.dtype)
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                            precision=self.precision)
    if bias is not None:
      y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


class WSLinear(nnx.Linear):
  """`nnx.Linear` whose kernel is weight-standardised on every call
  (`ws_eps`, `ws_ddof` as in `weight_standardize`; the stored kernel is the
  raw one)."""

  def __init__(self, in_features: int, out_features: int, *,
               ws_eps: float = 1e-5, ws_ddof: int = 0, **kwargs: Any):
    super().__init__(in_features, out_features, **kwargs)
    weight_standardize(jnp.zeros((max(ws_ddof + 1, 2), 1)), ws_eps, ws_ddof)
    self.ws_eps, self.ws_ddof = ws_eps, ws_ddof

  def __call__(self, inputs: Array) -> Array:
    kernel = weight_standardize(self.kernel[...], self.ws_eps, self.ws_ddof)
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias),
                                              dtype=self.dtype)
    y = self.dot_general(inputs, kernel,
                         (((inputs.ndim - 1,), (0,)), ((), ())),
                         precision=self.precision)
    if bias is not None:
      y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y
