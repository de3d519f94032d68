"""Trains a tiny Transformer encoder with PowerNorm and prints its loss falling.

    python examples/train_tiny.py [--norm=powernorm] [--steps=600]

The task: reverse a padded batch of variable-length token sequences, which
needs attention over positions. Every norm site is a `normjax` norm built by
`make_norm`, and the train step is the idiom of the README:
`normjax.value_and_grad` differentiates `params` and the `grad_stats`
collection, adds the backward-pass statistics' updates to `grad_stats`, and
`batch_stats` comes from the forward pass.
"""

import argparse
from collections.abc import Callable
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import normjax
from normjax import linen as nnorm

VOCAB, MAX_LEN, D, HEADS = 16, 12, 64, 4


class Block(nn.Module):
  norm: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x, mask, train):
    attn_mask = nn.make_attention_mask(mask, mask)
    h = self.norm(name='attn_norm')(x, not train, mask=mask)
    x = x + nn.MultiHeadDotProductAttention(HEADS)(h, mask=attn_mask)
    h = self.norm(name='ffn_norm')(x, not train, mask=mask)
    return x + nn.Dense(D)(nn.relu(nn.Dense(4 * D)(h)))


class TinyEncoder(nn.Module):
  norm: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, tokens, mask, train):
    x = nn.Embed(VOCAB, D)(tokens) + self.param(
        'pos', nn.initializers.normal(0.02), (MAX_LEN, D))
    for _ in range(2):
      x = Block(self.norm)(x, mask, train)
    x = self.norm(name='final_norm')(x, not train, mask=mask)
    return nn.Dense(VOCAB)(x)


def make_batch(rng, batch_size=32):
  lengths = rng.integers(3, MAX_LEN + 1, size=batch_size)
  mask = np.arange(MAX_LEN)[None] < lengths[:, None]
  tokens = np.where(mask, rng.integers(1, VOCAB, (batch_size, MAX_LEN)), 0)
  idx = np.clip(lengths[:, None] - 1 - np.arange(MAX_LEN)[None], 0, None)
  targets = np.where(mask, np.take_along_axis(tokens, idx, 1), 0)
  return jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(targets)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--norm', default='powernorm',
                      choices=sorted(nnorm.MODULES))
  parser.add_argument('--steps', type=int, default=600)
  args = parser.parse_args()
  options = {'powernorm': dict(num_groups=HEADS, warmup_steps=100),
             'unified': dict(warmup_steps=100, compensation_delay=100),
             'pn_v': dict(num_groups=HEADS),
             'groupnorm': dict(num_groups=HEADS),
             'evonorm_s0': dict(num_groups=HEADS),
             'layernorm_scaling': dict(layer_index=1)}.get(args.norm, {})
  model = TinyEncoder(nnorm.make_norm(args.norm, **options))
  rng = np.random.default_rng(0)
  tokens, mask, _ = make_batch(rng)
  variables = nn.unbox(model.init(jax.random.key(0), tokens, mask, False))
  params = variables['params']
  state = {k: v for k, v in variables.items() if k != 'params'}
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, state, opt_state, batch):
    tokens, mask, targets = batch

    def loss_fn(params, state):
      logits, updates = model.apply({'params': params, **state}, tokens, mask,
                                    True, mutable=['batch_stats'])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
      return jnp.sum(ce * mask) / jnp.sum(mask), {**state, **updates}

    (loss, state), grads = normjax.value_and_grad(loss_fn)(params, state)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state, loss

  start = time.time()
  first = None
  for step in range(1, args.steps + 1):
    params, state, opt_state, loss = train_step(params, state, opt_state,
                                                make_batch(rng))
    first = float(loss) if first is None else first
    if step % 50 == 0 or step == 1:
      print(f'step {step:4d}  loss {float(loss):.4f}', flush=True)
  tokens, mask, targets = make_batch(np.random.default_rng(123), 256)
  logits = model.apply({'params': params, **state}, tokens, mask, False)
  accuracy = jnp.sum((logits.argmax(-1) == targets) * mask) / jnp.sum(mask)
  print(f'{args.norm}: loss {first:.3f} -> {float(loss):.3f}, held-out '
        f'token accuracy (eval mode) {float(accuracy):.3f}, '
        f'{time.time() - start:.1f} s')


if __name__ == '__main__':
  main()
