"""The task of `train_tiny.py` with an equinox model holding normjax state.

    python examples/train_tiny_equinox.py [--norm=powernorm] [--steps=600]

`TinyEncoder` is an `eqx.Module` whose fields are the params and the norm
states of `train_tiny_jax.py`. The optimizer sees only the trainable leaves
(`trainable(model)`: the inexact arrays outside the norm states), so Adam and
weight decay never touch `ema_gz`; the backward statistics are differentiated
as a second argument and added with `normjax.apply_backward_stats`.
"""

import equinox as eqx
import jax
import optax

import normjax
from train_tiny_jax import forward, init, masked_ce, parse_args, run


class TinyEncoder(eqx.Module):
  """The two-block encoder; `__call__` returns (logits, new norm states)."""
  params: dict
  states: dict
  kind: str = eqx.field(static=True)

  def __call__(self, tokens, mask, train):
    return forward(self.params, self.states, tokens, mask, train, self.kind)


def trainable(model):
  """The filter of the optimizer's leaves: no norm state, so no `ema_gz`."""
  spec = jax.tree.map(eqx.is_inexact_array, model)
  return eqx.tree_at(lambda m: m.states, spec, replace=False)


def make_train_step(tx):
  """The jitted `(model, opt_state, batch) -> (model, opt_state, loss)`."""

  @eqx.filter_jit
  def train_step(model, opt_state, batch):
    tokens, mask, targets = batch
    params, rest = eqx.partition(model, trainable(model))
    stats = normjax.backward_stats(model.states)

    def loss_fn(params, stats):
      model = eqx.combine(params, rest)
      model = eqx.tree_at(lambda m: m.states, model,
                          normjax.with_backward_stats(model.states, stats))
      logits, states = model(tokens, mask, True)
      return masked_ce(logits, targets, mask), states

    (loss, states), (grads, stat_updates) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(params, stats)
    updates, opt_state = tx.update(grads, opt_state, params)
    states = normjax.with_backward_stats(
        states, normjax.apply_backward_stats(stats, stat_updates))
    model = eqx.tree_at(lambda m: m.states, eqx.apply_updates(model, updates),
                        states)
    return model, opt_state, loss

  return train_step


def main():
  args = parse_args()
  model = TinyEncoder(*init(jax.random.key(0), args.norm), args.norm)
  tx = optax.adamw(3e-3, weight_decay=1e-4)
  opt_state = tx.init(eqx.filter(model, trainable(model)))
  run(args, make_train_step(tx), (model, opt_state),
      lambda carry: carry[0].states)


if __name__ == '__main__':
  main()
