"""The task of `train_tiny.py` with Flax NNX modules from `normjax.nnx`.

    python examples/train_tiny_nnx.py [--norm=powernorm] [--steps=600]

Every norm site is `normjax.nnx.make_norm(kind, **options)(D, rngs=rngs)`.
The train step is the README's: `normjax.nnx.value_and_grad` returns the
parameter gradients and adds the backward statistics' updates (PowerNorm's
`ema_gz`, a `BackwardStat`) in place; `nnx.Optimizer(wrt=nnx.Param)` never
sees them.
"""

from flax import nnx
import optax

from normjax import nnx as nnorm
from train_tiny import D, HEADS, MAX_LEN, VOCAB
from train_tiny_jax import NORMS, masked_ce, parse_args, run


class Block(nnx.Module):
  """Pre-norm attention and feed-forward, each with its own norm."""

  def __init__(self, norm, rngs):
    self.attn_norm, self.ffn_norm = norm(D, rngs=rngs), norm(D, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(HEADS, D, decode=False, rngs=rngs)
    self.w1 = nnx.Linear(D, 4 * D, rngs=rngs)
    self.w2 = nnx.Linear(4 * D, D, rngs=rngs)

  def __call__(self, x, mask):
    h = self.attn_norm(x, mask=mask)
    x = x + self.attn(h, mask=nnx.make_attention_mask(mask, mask))
    return x + self.w2(nnx.relu(self.w1(self.ffn_norm(x, mask=mask))))


class TinyEncoder(nnx.Module):
  """Embedding, two blocks, a final norm and the output projection."""

  def __init__(self, kind, rngs):
    norm = nnorm.make_norm(kind, **NORMS[kind])
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.pos = nnx.Param(0.02 * rngs.params.normal((MAX_LEN, D)))
    self.blocks = nnx.List([Block(norm, rngs) for _ in range(2)])
    self.final_norm = norm(D, rngs=rngs)
    self.head = nnx.Linear(D, VOCAB, rngs=rngs)

  def __call__(self, tokens, mask):
    x = self.embed(tokens) + self.pos[None]
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.final_norm(x, mask=mask))


def loss_fn(model, tokens, mask, targets):
  return masked_ce(model(tokens, mask), targets, mask)


@nnx.jit
def train_step(model, optimizer, batch):
  loss, grads = nnorm.value_and_grad(loss_fn)(model, *batch)  # + ema_gz
  optimizer.update(model, grads)
  return loss


def main():
  args = parse_args()
  model = TinyEncoder(args.norm, nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
  run(args, lambda m, o, batch: (m, o, train_step(m, o, batch)),
      (model, optimizer), lambda carry: nnx.state(carry[0], nnorm.BackwardStat))


if __name__ == '__main__':
  main()
