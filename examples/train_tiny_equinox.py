"""The task of `train_tiny.py` with an equinox model and normjax state.

    python examples/train_tiny_equinox.py [--norm=powernorm] [--steps=600]

`TinyEncoder` is an `eqx.Module` holding the params of `train_tiny_jax.py`;
the norm states travel beside it, as equinox's own `eqx.nn.State` does
(`model(tokens, mask, train, states) -> (logits, states)`). So the optimizer
(`eqx.filter(model, eqx.is_inexact_array)`) never holds `ema_gz`: Adam and
weight decay cannot touch it. `normjax.value_and_grad(loss_fn,
eqx.filter_value_and_grad)` differentiates the model and the states'
backward statistics and returns the model's gradients and the updated
states.
"""

import equinox as eqx
import jax
import optax

import normjax
from train_tiny_jax import forward, init, masked_ce, parse_args, run


class TinyEncoder(eqx.Module):
  """The two-block encoder of `train_tiny_jax.py` as an equinox module."""
  params: dict
  kind: str = eqx.field(static=True)

  def __call__(self, tokens, mask, train, states):
    return forward(self.params, states, tokens, mask, train, self.kind)


def make_train_step(tx):
  """The jitted `(model, states, opt_state, batch) -> (..., loss)`."""

  @eqx.filter_jit
  def train_step(model, states, opt_state, batch):
    tokens, mask, targets = batch

    def loss_fn(model, states):
      logits, states = model(tokens, mask, True, states)
      return masked_ce(logits, targets, mask), states

    (loss, states), grads = normjax.value_and_grad(
        loss_fn, eqx.filter_value_and_grad)(model, states)
    updates, opt_state = tx.update(
        grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
    return eqx.apply_updates(model, updates), states, opt_state, loss

  return train_step


def main():
  args = parse_args()
  params, states = init(jax.random.key(0), args.norm)
  model = TinyEncoder(params, args.norm)
  tx = optax.adamw(3e-3, weight_decay=1e-4)
  opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
  run(args, make_train_step(tx), (model, states, opt_state),
      lambda carry: carry[1])


if __name__ == '__main__':
  main()
