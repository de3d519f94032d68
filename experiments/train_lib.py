"""What every experiment's training shares: state, optimizer, loss, the step.

The train step follows fairseq, whose semantics the PowerNorm results were
obtained with: the loss is *summed* over target tokens and differentiated,
then the parameter gradients are divided by the token count. PowerNorm's and
UN's backward-pass statistics therefore see the gradient of the summed loss,
as in the official code; they are folded into the state with
`normjax.apply_backward_stats` and never reach the optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import normjax
from experiments import sharding

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  step: Array         # int32 optimizer updates so far
  params: Any
  opt_state: Any
  batch_stats: Any    # the norms' forward running statistics
  grad_stats: Any     # the norms' backward-pass statistics (never optimized)
  rng: Array          # uint32[2] base key; dropout uses fold_in(rng, step)

  def variables(self) -> dict[str, Any]:
    """The model's variable collections, for `model.apply`."""
    return {'params': self.params, 'batch_stats': self.batch_stats,
            'grad_stats': self.grad_stats}


def make_schedule(cfg: Any) -> optax.Schedule:
  """fairseq's inverse_sqrt: linear warmup from `warmup_init_lr`, then
  peak * sqrt(warmup / step)."""
  if cfg.kind != 'inverse_sqrt':
    raise ValueError(f'config.schedule.kind={cfg.kind!r}: only '
                     "'inverse_sqrt' is implemented.")
  peak, warmup, init = cfg.peak_lr, max(int(cfg.warmup_steps), 1), \
      cfg.warmup_init_lr

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    warm = init + count * (peak - init) / warmup
    decay = peak * jnp.sqrt(warmup / jnp.maximum(count, 1.0))
    return jnp.where(count < warmup, warm, decay)
  return schedule


def make_optimizer(cfg: Any, schedule: optax.Schedule
                   ) -> optax.GradientTransformation:
  """Adam with decoupled weight decay (fairseq's Adam), optional clipping."""
  parts = []
  if cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay))
  return optax.chain(*parts)


def label_smoothed_loss(logits: Array, targets: Array, weights: Array,
                        smoothing: float) -> tuple[Array, Array, Array]:
  """fairseq's label_smoothed_cross_entropy, summed over real tokens.

  loss = (1 - eps - eps/V) * nll + (eps/V) * sum_v(-log p_v).
  Returns (loss_sum, nll_sum, num_tokens).
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  smooth = -jnp.sum(logp, axis=-1)
  eps_i = smoothing / logits.shape[-1]
  loss = (1.0 - smoothing - eps_i) * nll + eps_i * smooth
  return (jnp.sum(loss * weights), jnp.sum(nll * weights), jnp.sum(weights))


def init_state(init_variables: Callable[[Array], dict], tx, seed: int,
               mesh, logical_rules) -> tuple[TrainState, Any]:
  """Builds the state directly into its shardings; returns (state, shardings)."""
  def init(rng):
    variables = init_variables(rng)
    params = variables['params']
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        opt_state=tx.init(params),
        batch_stats=variables.get('batch_stats', {}),
        grad_stats=variables.get('grad_stats', {}), rng=rng)

  rng = jax.random.PRNGKey(seed)
  shardings = sharding.tree_shardings(jax.eval_shape(init, rng), mesh,
                                     logical_rules)
  state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
  return state, shardings


def make_train_step(logits_fn: Callable[..., tuple[Array, dict]], tx,
                    schedule: optax.Schedule, label_smoothing: float):
  """A train step for `logits_fn(variables, batch, rngs) -> (logits, updates)`.

  `batch` holds `targets` and `weights` (1 for real target tokens).
  """

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rngs = {'dropout': jax.random.fold_in(state.rng, state.step)}

    def loss_fn(params, grad_stats):
      variables = {'params': params, 'batch_stats': state.batch_stats,
                   'grad_stats': grad_stats}
      logits, updates = logits_fn(variables, batch, rngs)
      loss, nll, ntokens = label_smoothed_loss(
          logits, batch['targets'], batch['weights'], label_smoothing)
      return loss, (nll, ntokens, updates)

    (loss, (nll, ntokens, updates)), (grads, stat_updates) = (
        jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
            state.params, state.grad_stats))
    denom = jnp.maximum(ntokens, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)  # fairseq: sum, then /N
    param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, param_updates),
        opt_state=opt_state,
        batch_stats=updates.get('batch_stats', state.batch_stats),
        grad_stats=normjax.apply_backward_stats(state.grad_stats,
                                                stat_updates))
    metrics = dict(loss=loss / denom, nll=nll / denom, ntokens=ntokens,
                   grad_norm=optax.tree.norm(grads),
                   lr=schedule(state.step))
    return new_state, metrics

  return train_step


def make_eval_step(logits_fn: Callable[..., Array], label_smoothing: float):
  """Summed loss and nll of a batch in evaluation mode (running statistics)."""

  def eval_step(state: TrainState, batch: dict) -> dict:
    logits = logits_fn(state.variables(), batch)
    loss, nll, ntokens = label_smoothed_loss(
        logits, batch['targets'], batch['weights'], label_smoothing)
    return dict(loss=loss, nll=nll, ntokens=ntokens)

  return eval_step
