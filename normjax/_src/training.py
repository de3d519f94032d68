"""Helpers for train steps that use norms with backward-pass statistics."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax


def apply_backward_stats(grad_stats: Any, cotangents: Any) -> Any:
  """Folds the backward-pass statistics into the state: `stats + cotangents`.

  PowerNorm and Unified Normalization update statistics in their backward
  pass. normjax returns each update as the cotangent of the statistic, so a
  train step differentiates the loss with respect to the `grad_stats`
  collection (next to `params`) and calls this on the result:

      (loss, aux), (grads, stat_grads) = jax.value_and_grad(
          loss_fn, argnums=(0, 1), has_aux=True)(params, grad_stats)
      grad_stats = normjax.apply_backward_stats(grad_stats, stat_grads)

  The cotangents are *updates*, not gradients: never give them to the
  optimizer, and if the loss is scaled (mixed precision) unscale them exactly
  like the gradients. Under gradient accumulation over k micro-batches, add
  each micro-batch's updates (the official code ran one update per forward).
  Works for any pytree, including the Flax `grad_stats` collection and the
  functional `ema_gz` leaves.
  """
  return jax.tree.map(lambda s, d: s + d.astype(s.dtype), grad_stats,
                      cotangents)


# The flax.linen collection of the backward-pass statistics.
GRAD_STATS = 'grad_stats'


def _is_state(node: Any) -> bool:
  """A functional norm state, or a linen variables dict with GRAD_STATS."""
  return (hasattr(type(node), 'BACKWARD_FIELDS') or
          isinstance(node, Mapping) and GRAD_STATS in node)


def _stats_of(state: Any) -> Any:
  if isinstance(state, Mapping):
    return {GRAD_STATS: state[GRAD_STATS]}
  return {f: getattr(state, f) for f in type(state).BACKWARD_FIELDS}


def _with_stats(state: Any, stats: Any) -> Any:
  if isinstance(state, Mapping):
    return type(state)({**state, **stats})
  return state._replace(**stats)


def backward_stats(states: Any) -> Any:
  """The backward-pass statistics of a state or of any pytree of states.

  Each state whose type declares `BACKWARD_FIELDS` (PowerNorm's `ema_gz`,
  UN's `ema_gz` and `bwd_window`) becomes a dict of those fields, and each
  flax.linen variables dict its `'grad_stats'` collection; every other
  leaf becomes None (an empty subtree). The result is one argument to
  differentiate with respect to, without the integer counters:

      stats = normjax.backward_stats(states)
      grads, stat_updates = jax.grad(loss_fn, argnums=(0, 1))(params, stats)
      states = normjax.with_backward_stats(
          states, normjax.apply_backward_stats(stats, stat_updates))

  where `loss_fn(params, stats)` calls the norms with
  `with_backward_stats(states, stats)`.
  """
  return jax.tree.map(lambda s: _stats_of(s) if _is_state(s) else None,
                      states, is_leaf=_is_state)


def with_backward_stats(states: Any, stats: Any) -> Any:
  """`states` with the backward statistics of `stats` put in their places.

  The inverse of `backward_stats`: `with_backward_stats(states,
  backward_stats(states))` equals `states`, for one state or any pytree
  of states (a dict of per-layer states, an equinox module).
  """
  return jax.tree.map(lambda s, b: _with_stats(s, b) if _is_state(s) else s,
                      states, stats, is_leaf=_is_state)


def value_and_grad(fun: Callable[..., Any],
                   transform: Callable[..., Any] = jax.value_and_grad, *,
                   has_aux: bool = False) -> Callable[..., Any]:
  """`transform(fun)` over the params and the states' backward statistics.

  `fun(params, states, *args)` returns `(loss, new_states)`, or
  `(loss, (new_states, aux))` with `has_aux`. The returned
  `step(params, states, *args) -> ((loss, new_states[, aux]), grads)`
  differentiates `fun` with respect to `params` and
  `backward_stats(states)` together, returns the gradients of `params`
  only, and gives `new_states` with the statistics' updates added
  (`apply_backward_stats`): the train step of plain JAX and equinox in one
  call, the statistics never reaching the optimizer. For flax.linen,
  `states` is the variables dict without `'params'` (`{'batch_stats': ...,
  'grad_stats': ...}`): its `'grad_stats'` collection is differentiated.

  `transform(f, has_aux=True)` makes the value-and-grad of a one-argument
  function: `jax.value_and_grad` (the default) or, for an equinox model,
  `eqx.filter_value_and_grad`. A `params` that holds norm states itself
  (an equinox model with its states inside) is refused: the optimizer
  would take their updates for gradients.
  """

  def step(params, states, *args, **kwargs):
    check_params_hold_no_backward_stats(params)
    stats = backward_stats(states)

    def diff_fun(diff):
      return fun(diff[0], with_backward_stats(states, diff[1]), *args,
                 **kwargs)

    (loss, out), (grads, updates) = transform(diff_fun, has_aux=True)(
        (params, stats))
    new_states, *aux = out if has_aux else (out,)
    new_states = with_backward_stats(
        new_states, apply_backward_stats(stats, updates))
    return (loss, new_states, *aux), grads

  return step


def check_params_hold_no_backward_stats(params: Any) -> None:
  """Raises if `params` holds a norm state with backward statistics."""
  held = [jax.tree_util.keystr(path) for path, _ in
          jax.tree_util.tree_leaves_with_path(backward_stats(params))]
  if held:
    raise ValueError(
        f'normjax.value_and_grad: the differentiated params hold backward '
        f'statistics ({", ".join(held[:3])}); the optimizer would take their '
        f'updates for gradients. Keep the norm states beside the params or '
        f'model and pass them as the second argument, `step(params, states, '
        f'...)`, as equinox does with eqx.nn.State.')
