"""The task of `train_tiny.py` in plain JAX: `normjax.functional` and optax.

    python examples/train_tiny_jax.py [--norm=powernorm] [--steps=600]

The model is a params dict and a dict of norm states (one per norm site).
`normjax.value_and_grad` differentiates the loss with respect to the params
and the states' backward-pass statistics (PowerNorm's `ema_gz`), returns
the params' gradients for optax and the states with the statistics' updates
added.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import normjax
from normjax import functional as nf
from train_tiny import D, HEADS, MAX_LEN, VOCAB, make_batch

NORMS = {'layernorm': {}, 'rmsnorm': {},
         'powernorm': dict(num_groups=HEADS, warmup_steps=100),
         'unified': dict(warmup_steps=100, compensation_delay=100)}
SITES = ('attn_norm_0', 'ffn_norm_0', 'attn_norm_1', 'ffn_norm_1',
         'final_norm')


def init(key, kind):
  """(params, states) of the two-block encoder with norm `kind`."""
  keys = iter(jax.random.split(key, 16))
  dense = lambda n, m: jax.random.normal(next(keys), (n, m)) / np.sqrt(n)
  params = {'embed': jax.random.normal(next(keys), (VOCAB, D)),
            'pos': 0.02 * jax.random.normal(next(keys), (MAX_LEN, D)),
            'head': dense(D, VOCAB)}
  for i in range(2):
    params[f'block_{i}'] = {'qkv': dense(D, 3 * D), 'out': dense(D, D),
                            'w1': dense(D, 4 * D), 'w2': dense(4 * D, D)}
  for site in SITES:
    params[site] = {'scale': jnp.ones(D), 'bias': jnp.zeros(D)}
  states = {s: nf.init_state(kind, D, **NORMS[kind]) for s in SITES}
  return params, states


def attention(p, h, mask):
  q, k, v = (t.reshape(*h.shape[:2], HEADS, -1)
             for t in jnp.split(h @ p['qkv'], 3, -1))
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(D // HEADS)
  scores = jnp.where(mask[:, None, None, :], scores, -1e9)
  out = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(scores), v)
  return out.reshape(h.shape) @ p['out']


def forward(params, states, tokens, mask, train, kind):
  """(logits, new_states); every norm is `nf.get_norm(kind)`."""
  new_states = {}

  def norm(site, x):
    y, new_states[site] = nf.get_norm(kind)(
        x, params[site], states[site], mask=mask,
        use_running_average=not train, **NORMS[kind])
    return y

  x = params['embed'][tokens] + params['pos'][None]
  for i in range(2):
    p = params[f'block_{i}']
    x = x + attention(p, norm(f'attn_norm_{i}', x), mask)
    h = norm(f'ffn_norm_{i}', x)
    x = x + jax.nn.relu(h @ p['w1']) @ p['w2']
  return norm('final_norm', x) @ params['head'], new_states


def masked_ce(logits, targets, mask):
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(ce * mask) / jnp.sum(mask)


def ema_gz_mean(tree):
  """Mean |ema_gz| over every `ema_gz` leaf of `tree` (0.0 if none)."""
  leaves = [jnp.abs(leaf).mean()
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if 'ema_gz' in jax.tree_util.keystr(path)]
  return float(np.mean(leaves)) if leaves else 0.0


def make_train_step(kind, tx):
  """The jitted `(params, states, opt_state, batch) -> (..., loss)`."""

  @jax.jit
  def train_step(params, states, opt_state, batch):
    tokens, mask, targets = batch

    def loss_fn(params, states):
      logits, states = forward(params, states, tokens, mask, True, kind)
      return masked_ce(logits, targets, mask), states

    (loss, states), grads = normjax.value_and_grad(loss_fn)(params, states)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), states, opt_state, loss

  return train_step


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--norm', default='powernorm', choices=sorted(NORMS))
  parser.add_argument('--steps', type=int, default=600)
  return parser.parse_args()


def run(args, train_step, carry, states_of):
  """Runs `*carry, loss = train_step(*carry, batch)` for `args.steps` steps
  and prints the loss and the mean |ema_gz| of `states_of(carry)`."""
  rng, start, first = np.random.default_rng(0), time.time(), None
  ema_start = ema_gz_mean(states_of(carry))
  for step in range(1, args.steps + 1):
    *carry, loss = train_step(*carry, make_batch(rng))
    first = float(loss) if first is None else first
    if step % 50 == 0 or step == 1:
      print(f'step {step:4d}  loss {float(loss):.4f}', flush=True)
  print(f'ema_gz |mean| {ema_start:.3g} -> {ema_gz_mean(states_of(carry)):.3g}')
  print(f'{args.norm}: loss {first:.3f} -> {float(loss):.3f}, '
        f'{time.time() - start:.1f} s')
  return carry


def main():
  args = parse_args()
  params, states = init(jax.random.key(0), args.norm)
  tx = optax.adam(3e-3)
  run(args, make_train_step(args.norm, tx), (params, states, tx.init(params)),
      lambda carry: carry[1])


if __name__ == '__main__':
  main()
