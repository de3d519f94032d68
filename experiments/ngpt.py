"""nGPT: the normalized Transformer (Loshchilov, Hsieh, Sun, Ginsburg 2024,
arXiv 2410.01131; zoo spec §10), a causal language model.

Every hidden vector lies on the unit sphere, and there is no LayerNorm, no
RMSNorm and no final norm. With Norm(v) = v / ||v||, a block is

    h <- Norm(h + |alpha_A| * (Norm(Attn(h)) - h))
    h <- Norm(h + |alpha_M| * (Norm(MLP(h)) - h))

(h is re-normalised before mixing, as the official code does). Attention:
q and k are rotated (RoPE), normalised per head and multiplied by s_qk; the
softmax scale is sqrt(d_k) (not 1/sqrt(d_k)); no biases. MLP: u, v = x W_uv
scaled by s_uv * sqrt(d), u * SiLU(v), then W_down. Logits: s_z * (h E_out^T)
with an untied output matrix. The token embedding is the sequence's first
hidden state (unit rows, no position table: positions enter through RoPE).

Learned scalings use the paper's trick: a parameter stored at `scale` and
used as param * (value / scale), so Adam sees it at the scale of the other
weights. alpha_A, alpha_M: value 0.05, scale 1/sqrt(d) (per feature); s_qk:
value 1, scale 1/sqrt(d) (per head feature); s_uv: value 1, scale 1 (then
times sqrt(d)); s_z: value 1, scale 1/sqrt(d) (per vocabulary entry).

The matrices are initialised normal (std 1/sqrt(d)) and normalised along
the embedding dimension, and `NGPT.project_params` renormalises them after
every optimizer step (`train_lib.Experiment.project_params`): rows of the
input and output embeddings; the query, key, value and W_uv kernels per
output unit (over the d inputs); the attention output and W_down kernels
per input unit (the vector each writes into the d-dimensional space).

Dropout is not used (model.*dropout are ignored); model.norms are ignored
(the `ngpt` modifier sets them to 'none'). `NGPT` takes the
`TransformerConfig` of the other models: vocab_size, d_model, num_heads,
head_dim, ffn_dim, num_decoder_layers, max_len, dtype. The official code
is NVIDIA/ngpt (`model.py`, `train.py` normalize_matrices); its RoPE pairs
features differently, here it is the usual rotation of (x_2i, x_2i+1).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.data.vocab import PAD_ID
from experiments.models import TransformerConfig

ALPHA_INIT = 0.05   # alpha_A, alpha_M
EPSILON = 1e-12     # Norm(v) = v * rsqrt(max(||v||^2, EPSILON))

# Which axes of a kernel are the embedding dimension (normalised over):
# module name -> axis. Embeddings (vocab, d): the rows.
NORMALISED_AXES = {
    'embedding': -1, 'query': 0, 'key': 0, 'value': 0, 'out': -1,
    'uv': 0, 'down': -1, 'output': 0,
}


def justnorm(x: jax.Array, axis=-1) -> jax.Array:
  """x / ||x|| along `axis`, computed in float32, in x's dtype."""
  xf = x.astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.maximum(
      jnp.sum(xf * xf, axis=axis, keepdims=True), EPSILON))
  return (xf * inv).astype(x.dtype)


def _normalised_init(axis, std):
  def init(key, shape, dtype=jnp.float32):
    return justnorm(jax.random.normal(key, shape, dtype) * std, axis)
  return init


def _scaling(module: nn.Module, name: str, shape, init_value: float,
             init_scaling: float, axes) -> jax.Array:
  """The paper's scaled parameter: stored at `init_scaling`, returned at
  `init_value` (param * init_value / init_scaling)."""
  param = module.param(
      name, nn.with_logical_partitioning(
          nn.initializers.constant(init_scaling), axes), shape, jnp.float32)
  return param * (init_value / init_scaling)


def rope(x: jax.Array, positions: jax.Array) -> jax.Array:
  """Rotary positions: x [B, L, H, K] (K even), positions [B, L]."""
  half = x.shape[-1] // 2
  freqs = 10000.0 ** (-np.arange(half, dtype=np.float32) / half)
  angles = (positions[..., None].astype(jnp.float32)
            * jnp.asarray(freqs)[None, None])  # [B, L, K/2]
  sin, cos = jnp.sin(angles)[:, :, None], jnp.cos(angles)[:, :, None]
  xf = x.astype(jnp.float32)
  even, odd = xf[..., 0::2], xf[..., 1::2]
  rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], -1)
  return rotated.reshape(x.shape).astype(x.dtype)


class NGPTBlock(nn.Module):
  """One nGPT block: normalised attention and MLP updates of h."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, h, positions, attention_mask):
    cfg = self.config
    d, heads, k = cfg.d_model, cfg.num_heads, cfg.attention_head_dim
    base = d ** -0.5
    dtype = cfg.dtype

    def kernel(name, shape, axes):
      return self.param(name, nn.with_logical_partitioning(
          _normalised_init(NORMALISED_AXES[name], base), axes), shape,
                        jnp.float32).astype(dtype)

    # Attention.
    proj = {name: jnp.einsum('bld,dhk->blhk', h,
                             kernel(name, (d, heads, k),
                                    ('embed', 'heads', 'kv')))
            for name in ('query', 'key', 'value')}
    s_qk = _scaling(self, 's_qk', (heads, k), 1.0, base,
                    ('heads', 'kv')).astype(dtype)[None, None]
    q = s_qk * justnorm(rope(proj['query'], positions))
    key = s_qk * justnorm(rope(proj['key'], positions))
    # dot_product_attention divides by sqrt(k): the softmax scale sqrt(k)
    # is q * k there.
    y = nn.dot_product_attention(q * jnp.asarray(k, dtype), key,
                                 proj['value'], mask=attention_mask,
                                 dtype=dtype, force_fp32_for_softmax=True)
    h_att = jnp.einsum('blhk,hkd->bld', y.astype(dtype),
                       kernel('out', (heads, k, d), ('heads', 'kv', 'embed')))
    alpha_a = jnp.abs(_scaling(self, 'alpha_attention', (d,), ALPHA_INIT,
                               base, ('embed',)))
    a, b = justnorm(h), justnorm(h_att)
    h = justnorm(a + alpha_a.astype(dtype)[None, None] * (b - a))

    # MLP.
    uv = h @ kernel('uv', (d, 2 * cfg.ffn_dim), ('embed', 'mlp'))
    s_uv = _scaling(self, 's_uv', (2 * cfg.ffn_dim,), 1.0, 1.0, ('mlp',))
    uv = uv * (s_uv * math.sqrt(d)).astype(dtype)[None, None]
    u, v = jnp.split(uv, 2, axis=-1)
    h_mlp = (u * nn.silu(v)) @ kernel('down', (cfg.ffn_dim, d),
                                      ('mlp', 'embed'))
    alpha_m = jnp.abs(_scaling(self, 'alpha_mlp', (d,), ALPHA_INIT, base,
                               ('embed',)))
    a, b = justnorm(h), justnorm(h_mlp)
    return justnorm(a + alpha_m.astype(dtype)[None, None] * (b - a))


class NGPT(nn.Module):
  """The nGPT language model: `(inputs [B, L] int, *, train) -> logits
  [B, L, vocab] float32`, position t seeing inputs[:, :t + 1] only (PAD
  keys are masked). Params: 'embedding', 'layer_<i>', 'output' (kernel
  (d, vocab)), 's_z'; no norm parameters and no other variables."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, inputs, *, train: bool):
    del train  # no dropout, no batch statistics
    cfg = self.config
    inputs = jnp.asarray(inputs)
    if inputs.shape[1] > cfg.max_len:
      raise ValueError(f'inputs has length {inputs.shape[1]} > '
                       f'config.max_len={cfg.max_len}.')
    d, base = cfg.d_model, cfg.d_model ** -0.5
    table = self.param('embedding', nn.with_logical_partitioning(
        _normalised_init(-1, base), ('vocab', 'embed')),
                       (cfg.vocab_size, d), jnp.float32)
    h = jnp.take(table, inputs, axis=0).astype(cfg.dtype)
    mask = inputs != PAD_ID
    attention_mask = nn.combine_masks(
        nn.make_causal_mask(inputs, dtype=jnp.bool_),
        nn.make_attention_mask(jnp.ones_like(mask), mask, dtype=jnp.bool_),
        dtype=jnp.bool_)
    positions = jnp.broadcast_to(
        jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
    for i in range(cfg.num_decoder_layers):
      h = NGPTBlock(cfg, name=f'layer_{i}')(h, positions, attention_mask)
    output = self.param('output', nn.with_logical_partitioning(
        _normalised_init(0, base), ('embed', 'vocab')),
                        (d, cfg.vocab_size), jnp.float32)
    s_z = _scaling(self, 's_z', (cfg.vocab_size,), 1.0, base, ('vocab',))
    logits = h @ output.astype(cfg.dtype)
    return logits.astype(jnp.float32) * s_z[None, None]

  @staticmethod
  def project_params(params: Any) -> Any:
    """`params` with every matrix renormalised along the embedding
    dimension (`NORMALISED_AXES`); the scalings are left as they are."""
    def project(path, x):
      name = path[-1].key if hasattr(path[-1], 'key') else str(path[-1])
      axis = NORMALISED_AXES.get(name)
      if axis is None or jnp.ndim(x) < 2:
        return x
      return justnorm(x, axis)
    return jax.tree_util.tree_map_with_path(project, params)
