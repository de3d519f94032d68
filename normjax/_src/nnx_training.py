"""The NNX train step for norms with backward-pass statistics."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from flax import nnx

from normjax._src.nnx_modules import BackwardStat
from normjax._src.training import apply_backward_stats


def value_and_grad(loss_fn: Callable[..., Any], *, has_aux: bool = False,
                   wrt: Any = nnx.Param) -> Callable[..., Any]:
  """`nnx.value_and_grad` of `loss_fn(model, *args)` that also folds in the
  backward-pass statistics.

  The returned `step(model, *args, **kwargs) -> (loss, grads)` differentiates
  `loss_fn` with respect to the model's `wrt` variables (default
  `nnx.Param`) and its `BackwardStat`s, adds the BackwardStat cotangents
  (the statistics' updates) to the model's BackwardStat variables in place,
  and returns the gradients of the `wrt` variables only, ready for
  `nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads)`: the
  statistics never reach the optimizer. With `has_aux`, `loss` is
  `(loss, aux)` as in `nnx.value_and_grad`.
  """
  grad_fn = nnx.value_and_grad(
      loss_fn, argnums=nnx.DiffState(0, nnx.Any(wrt, BackwardStat)),
      has_aux=has_aux)

  @functools.wraps(loss_fn)
  def step(model, *args, **kwargs):
    value, grads = grad_fn(model, *args, **kwargs)
    grads, updates = nnx.split_state(grads, wrt, BackwardStat)
    add_backward_stats(model, updates)
    return value, grads

  return step


def add_backward_stats(model: nnx.Module, updates: nnx.State) -> None:
  """Adds `updates` (BackwardStat cotangents) to `model`'s BackwardStats."""
  stats = nnx.state(model, BackwardStat)
  nnx.update(model, apply_backward_stats(stats, updates))
