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
