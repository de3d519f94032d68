"""Helpers for train steps that use norms with backward-pass statistics."""

from __future__ import annotations

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


def _is_state(node: Any) -> bool:
  return hasattr(type(node), 'BACKWARD_FIELDS')


def backward_stats(states: Any) -> Any:
  """The backward-pass statistics of a state or of any pytree of states.

  Each state whose type declares `BACKWARD_FIELDS` (PowerNorm's `ema_gz`,
  UN's `ema_gz` and `bwd_window`) becomes a dict of those fields; every
  other leaf becomes None (an empty subtree). The result is one argument
  to differentiate with respect to, without the integer counters:

      stats = normjax.backward_stats(states)
      grads, stat_updates = jax.grad(loss_fn, argnums=(0, 1))(params, stats)
      states = normjax.with_backward_stats(
          states, normjax.apply_backward_stats(stats, stat_updates))

  where `loss_fn(params, stats)` calls the norms with
  `with_backward_stats(states, stats)`.
  """
  return jax.tree.map(
      lambda s: ({f: getattr(s, f) for f in type(s).BACKWARD_FIELDS}
                 if _is_state(s) else None), states, is_leaf=_is_state)


def with_backward_stats(states: Any, stats: Any) -> Any:
  """`states` with the backward statistics of `stats` put in their places.

  The inverse of `backward_stats`: `with_backward_stats(states,
  backward_stats(states))` equals `states`, for one state or any pytree
  of states (a dict of per-layer states, an equinox module).
  """
  return jax.tree.map(
      lambda s, b: s._replace(**b) if _is_state(s) else s, states, stats,
      is_leaf=_is_state)
