"""The fairseq Transformer of the PowerNorm translation experiments, in Flax.

`transformer_iwslt_de_en_v2` / `transformer_wmt_en_de_big_t2t` of the official
PowerNorm code (spec §1.1, §1.11): sinusoidal positions, embeddings scaled by
sqrt(d_model), ReLU FFN, dropout / attention dropout / activation dropout,
optionally one embedding table shared by source, target and output projection
(`--share-all-embeddings`), fairseq initialisation.

Every norm comes from `normjax.linen.make_norm(**config.norms[site])` and is
called as `norm(x, not train, mask=token_mask)`, with the token mask of its
stream (True = real token): the source mask in the encoder, the target mask in
the decoder, an all-True mask in incremental decoding. Batch-statistic norms
(BatchNorm, PowerNorm, PN-V, UN) therefore see real tokens only.

Where the norms sit relative to the residual is a pluggable *placement*
(`PLACEMENTS`, zoo spec §3): 'pre' x + F(N(x)); 'post' N(x + F(x)) without
final stack norms; 'peri' x + N_out(F(N_in(x))), and by default a norm on
the embeddings too (`embed_norm`); 'mix' (Mix-LN) post-norm for the first
floor(mix_alpha * L) layers of a stack and pre-norm for the rest; 'lns'
(LayerNorm Scaling) x + F(N(x) / sqrt(l)) for layer l = 1..L, the final norm
unscaled; 'reordered' (OLMo 2) x + N(F(x)), no norm on the sublayer input,
with QK-norm by default; 'hybrid' (HybridNorm) x + Attn(x) with per-head
norms of Q, K and V inside the attention, and a post-norm N(x + F(x)) on
the FFN; 'normformer' pre-norm plus a norm of the self-attention output, a
norm after the FFN activation and learned per-head scales of the
self-attention output. Adding one is a function `(x, sublayer, norm, *,
mask, train, layer_index, num_layers, config) -> x` and an entry
`Placement(fn, final_norm=...)`, whose flags switch on the norms inside the
sublayers; those norms have sites of their own (`PLACEMENT_SITES`).

Token ids: PAD = 0, BOS = 1, EOS = 2. Structure follows flax's
examples/wmt/models.py (Apache-2.0).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

from experiments.data.vocab import BOS_ID, EOS_ID, PAD_ID  # noqa: F401  (models.EOS_ID)
from normjax import linen as nnorm

# Where the norms sit: the keys of TransformerConfig.norms (and of
# config.model.norms); the LanguageModel uses the decoder's.
SITES = ('encoder_attention', 'encoder_ffn', 'encoder_final',
         'decoder_attention', 'decoder_ffn', 'decoder_final')
# Sites of the norms inside the sublayers, read only by the placements that
# have them (every preset carries `SITES`; a placement modifier adds these):
# '<stack>_qkv' the per-head norms of Q, K and V ('hybrid'; features
# head_dim, rows token x head, so a batch norm's channels are shared by the
# heads); '<stack>_attention_out' the norm of the self-attention output and
# '<stack>_ffn_mid' the norm after the FFN activation (features ffn_dim)
# ('normformer').
PLACEMENT_SITES = ('encoder_qkv', 'encoder_attention_out', 'encoder_ffn_mid',
                   'decoder_qkv', 'decoder_attention_out', 'decoder_ffn_mid')
ALL_SITES = SITES + PLACEMENT_SITES
# config.model.architecture of a language model: this module's
# LanguageModel, or experiments.ngpt.NGPT.
ARCHITECTURES = ('transformer', 'ngpt')

ACTIVATION_AXES = ('batch', 'length', 'embed')
NORM_PARAM_AXES = ('embed',)  # the logical axis of every norm's params


# ----------------------------------------------------------------------------
# Placements: where the norm sits around one residual sublayer.
# ----------------------------------------------------------------------------

# `sublayer(h)` is the attention or FFN branch, residual dropout included.
# `norm(suffix='')` creates this site's norm module (named '<site>_norm' +
# suffix; call it once per suffix), to be called as
# `norm()(x, not train, mask=mask)`. `layer_index` counts from 0 within the
# stack (encoder or decoder) of `num_layers` layers.
ResidualFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Placement:
  """A residual-block function, whether the stacks end with a norm, and the
  norms inside the sublayers.

  `ffn`: the FFN sublayers' residual function (None: `residual`).
  `qkv_norm`: per-head norms of Q, K and V in every attention
  ('<stack>_qkv'). `head_scale`, `attention_out_norm`, `ffn_mid_norm`:
  NormFormer's learned per-head scales of the self-attention output (init
  1), its norm of the self-attention output before the residual dropout and
  add ('<stack>_attention_out'), its norm after the FFN activation
  ('<stack>_ffn_mid'). `qk_norm`: the default of TransformerConfig.qk_norm.
  """
  residual: ResidualFn
  final_norm: bool
  ffn: ResidualFn | None = None
  qkv_norm: bool = False
  head_scale: bool = False
  attention_out_norm: bool = False
  ffn_mid_norm: bool = False
  qk_norm: str = ''

  @property
  def sites(self) -> tuple[str, ...]:
    """The suffixes of the `PLACEMENT_SITES` it reads ('qkv', ...)."""
    return tuple(name for name, used in (
        ('qkv', self.qkv_norm), ('attention_out', self.attention_out_norm),
        ('ffn_mid', self.ffn_mid_norm)) if used)

  def __call__(self, x, sublayer, norm, *, mask, train, layer_index,
               num_layers, config, ffn: bool = False):
    residual = self.ffn if ffn and self.ffn is not None else self.residual
    return residual(x, sublayer, norm, mask=mask, train=train,
                    layer_index=layer_index, num_layers=num_layers,
                    config=config)


def pre_norm(x, sublayer, norm, *, mask, train, layer_index, num_layers,
             config):
  """x + F(N(x)) (fairseq `normalize_before=True`)."""
  del layer_index, num_layers, config
  return x + sublayer(norm()(x, not train, mask=mask))


def post_norm(x, sublayer, norm, *, mask, train, layer_index, num_layers,
              config):
  """N(x + F(x)) (the original Transformer)."""
  del layer_index, num_layers, config
  return norm()(x + sublayer(x), not train, mask=mask)


def peri_norm(x, sublayer, norm, *, mask, train, layer_index, num_layers,
              config):
  """x + N_out(F(N_in(x))) (Peri-LN, Kim et al. 2025): two norms per
  sublayer, each with its own parameters ('<site>_norm', '<site>_norm_out')."""
  del layer_index, num_layers, config
  h = sublayer(norm()(x, not train, mask=mask))
  return x + norm('_out')(h, not train, mask=mask)


def mix_norm(x, sublayer, norm, *, mask, train, layer_index, num_layers,
             config):
  """Mix-LN (Li, Yin, Liu, ICLR 2025): layer l (0-based) is post-norm if
  l < floor(mix_alpha * num_layers), else pre-norm; the stack ends with a
  norm either way. mix_alpha 0 is 'pre', 1 is 'post' plus final norms."""
  kwargs = dict(mask=mask, train=train, layer_index=layer_index,
                num_layers=num_layers, config=config)
  if layer_index < math.floor(config.mix_alpha * num_layers):
    return post_norm(x, sublayer, norm, **kwargs)
  return pre_norm(x, sublayer, norm, **kwargs)


def layer_norm_scaling(x, sublayer, norm, *, mask, train, layer_index,
                       num_layers, config):
  """x + F(N(x) / sqrt(l)), l = layer_index + 1 (LayerNorm Scaling, Sun et
  al. 2025, "The Curse of Depth"): both norms of a layer get the factor; it
  is not an initialisation, so gradients see it at every step."""
  del num_layers, config
  h = norm()(x, not train, mask=mask)
  scale = jnp.asarray(1.0 / math.sqrt(layer_index + 1), h.dtype)
  return x + sublayer(h * scale)


def reordered_norm(x, sublayer, norm, *, mask, train, layer_index,
                   num_layers, config):
  """x + N(F(x)) (OLMo 2's `norm_after`): the norm ('<site>_norm_out') on
  the sublayer output before the residual add, none on its input."""
  del layer_index, num_layers, config
  return x + norm('_out')(sublayer(x), not train, mask=mask)


def no_norm(x, sublayer, norm, *, mask, train, layer_index, num_layers,
            config):
  """x + F(x): no norm around the sublayer (HybridNorm's attention, whose
  norms are on Q, K and V inside it)."""
  del norm, mask, train, layer_index, num_layers, config
  return x + sublayer(x)


PLACEMENTS: dict[str, Placement] = {
    'pre': Placement(pre_norm, final_norm=True),
    'post': Placement(post_norm, final_norm=False),
    'peri': Placement(peri_norm, final_norm=True),
    'mix': Placement(mix_norm, final_norm=True),
    'lns': Placement(layer_norm_scaling, final_norm=True),
    # OLMo 2: reordered norms plus QK-norm (RMSNorm per head by default).
    'reordered': Placement(reordered_norm, final_norm=True,
                           qk_norm='rmsnorm'),
    # HybridNorm (Zhuo et al. 2025): QKV-norm in the attention, Post-Norm on
    # the FFN; the stream ends with the FFN's norm, so no final norm.
    'hybrid': Placement(no_norm, final_norm=False, ffn=post_norm,
                        qkv_norm=True),
    # NormFormer (fairseq scale_attn, scale_fc, scale_heads): pre-norm plus.
    'normformer': Placement(pre_norm, final_norm=True, head_scale=True,
                            attention_out_norm=True, ffn_mid_norm=True),
}


# ----------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------

def default_norms() -> dict[str, dict[str, Any]]:
  """fairseq's LayerNorm (eps 1e-5) at every site (`ALL_SITES`)."""
  return {site: {'kind': 'layernorm', 'epsilon': 1e-5} for site in ALL_SITES}


def _freeze(value: Any) -> Any:
  """Nested mappings/lists -> FrozenDict/tuples, so the config is hashable."""
  if hasattr(value, 'to_dict'):  # ml_collections.ConfigDict
    value = value.to_dict()
  if isinstance(value, Mapping):
    return FrozenDict({k: _freeze(v) for k, v in value.items()})
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyperparameters. Hashable, so a model can be a static jit argument.

  `norms` maps a site to `dict(kind=..., **options)` for
  `normjax.linen.make_norm`. Sites left out keep the default LayerNorm;
  'decoder_attention' also serves the decoder's cross-attention norm (as in
  fairseq) and, with `embed_norm`, the '<stack>_attention' norm kinds serve
  the embedding norms. The `PLACEMENT_SITES` serve only the placements that
  read them. Unknown sites, kinds and options raise at construction.
  """
  vocab_size: int
  d_model: int = 512
  num_heads: int = 4
  ffn_dim: int = 1024
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  dropout: float = 0.3
  attention_dropout: float = 0.1
  activation_dropout: float = 0.1
  share_embeddings: bool = True
  placement: str = 'pre'
  mix_alpha: float = 0.25   # 'mix': the fraction of post-norm layers
  # '' | 'rmsnorm' | 'layernorm': QK-norm in attention; None: the
  # placement's default ('rmsnorm' for 'reordered', else '').
  qk_norm: str | None = None
  embed_norm: bool | None = None  # norm the embeddings; None: only 'peri'
  norms: Mapping[str, Mapping[str, Any]] = dataclasses.field(
      default_factory=default_norms)
  max_len: int = 256
  head_dim: int = 0  # 0: d_model // num_heads
  adaptive_softmax_cutoffs: tuple[int, ...] = ()  # LanguageModel only
  # Set by experiments.fold (off by default, which is the models as trained):
  # `untie_output` gives the output layer a kernel and a bias of its own
  # ('output_projection'; with an adaptive softmax its own 'kernel') even
  # when `share_embeddings` ties the input embeddings; `center_positions`
  # subtracts each position's mean over the features from the sinusoidal
  # table (a writer of the residual stream, zoo spec §4.2); with
  # `compressed_stream` the residual stream keeps only its first
  # d_model - 1 coordinates (Pre-CRMSNorm, §4.5), which needs
  # `center_positions`.
  untie_output: bool = False
  center_positions: bool = False
  compressed_stream: bool = False
  # The compute dtype (activations, matmuls; config.model.dtype): params stay
  # float32, the norms compute their statistics in float32 and return this
  # dtype, the logits come back float32.
  dtype: Any = jnp.float32
  deterministic: bool = False
  decode: bool = False

  @classmethod
  def from_config(cls, model_cfg: Any, vocab_size: int,
                  **overrides) -> TransformerConfig:
    """From an experiment's `config.model` (extra keys are ignored; `dtype`
    may be a name, 'bfloat16')."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in model_cfg.to_dict().items() if k in fields}
    if 'dtype' in kwargs:
      kwargs['dtype'] = jnp.dtype(kwargs['dtype'])
    kwargs['norms'] = {site: dict(norm) for site, norm in
                       model_cfg.norms.to_dict().items()}
    if 'adaptive_softmax_cutoffs' in kwargs:
      kwargs['adaptive_softmax_cutoffs'] = tuple(
          kwargs['adaptive_softmax_cutoffs'])
    return cls(vocab_size=vocab_size, **{**kwargs, **overrides})

  @property
  def attention_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def stream_width(self) -> int:
    """Features of the residual stream: d_model, d_model - 1 compressed."""
    return self.d_model - 1 if self.compressed_stream else self.d_model

  def __post_init__(self):
    norms = _freeze(self.norms)
    unknown = set(norms) - set(ALL_SITES)
    if unknown:
      raise ValueError(f'TransformerConfig.norms: unknown sites '
                       f'{sorted(unknown)}; the sites are {list(ALL_SITES)}.')
    merged = dict(_freeze(default_norms()))
    merged.update(norms)
    for site, cfg in merged.items():
      if 'kind' not in cfg:
        raise ValueError(f'TransformerConfig.norms[{site!r}] needs a kind.')
      nnorm.make_norm(**cfg)  # raises on an unknown kind or option
    object.__setattr__(self, 'norms', FrozenDict(
        {site: merged[site] for site in ALL_SITES}))
    if self.placement not in PLACEMENTS:
      raise ValueError(f'TransformerConfig.placement: unknown '
                       f'{self.placement!r}; choose from {sorted(PLACEMENTS)}.')
    if self.qk_norm is None:
      object.__setattr__(self, 'qk_norm', PLACEMENTS[self.placement].qk_norm)
    if self.qk_norm not in ('', 'rmsnorm', 'layernorm'):
      raise ValueError(f"TransformerConfig.qk_norm={self.qk_norm!r}: choose "
                       "'' (none), 'rmsnorm' or 'layernorm'.")
    if not 0.0 <= self.mix_alpha <= 1.0:
      raise ValueError(f'TransformerConfig.mix_alpha={self.mix_alpha}: the '
                       'fraction of post-norm layers must be in [0, 1].')
    if self.embed_norm is None:
      object.__setattr__(self, 'embed_norm', self.placement == 'peri')
    if not self.head_dim and self.d_model % self.num_heads:
      raise ValueError(f'd_model={self.d_model} is not divisible by '
                       f'num_heads={self.num_heads}; change one, or set '
                       'head_dim.')
    cutoffs = tuple(self.adaptive_softmax_cutoffs)
    if cutoffs and (list(cutoffs) != sorted(set(cutoffs)) or cutoffs[0] <= 0
                    or cutoffs[-1] >= self.vocab_size):
      raise ValueError(
          f'adaptive_softmax_cutoffs={cutoffs}: need increasing cutoffs '
          f'between 0 and the vocabulary size {self.vocab_size} (exclusive); '
          'use () for a full softmax.')
    object.__setattr__(self, 'adaptive_softmax_cutoffs', cutoffs)
    if self.compressed_stream and not self.center_positions:
      raise ValueError('compressed_stream=True drops the last coordinate of '
                       'a zero-mean residual stream: it needs '
                       'center_positions=True.')


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------

def shift_right(targets: jax.Array, bos_id: int = BOS_ID,
                pad_id: int = PAD_ID) -> jax.Array:
  """Decoder inputs: targets shifted right with BOS first, PAD where targets
  are PAD, so that `decoder_inputs != PAD` is exactly the target mask."""
  targets = jnp.asarray(targets)
  bos = jnp.full((targets.shape[0], 1), bos_id, targets.dtype)
  shifted = jnp.concatenate([bos, targets[:, :-1]], axis=1)
  return jnp.where(targets != pad_id, shifted, jnp.asarray(pad_id,
                                                           targets.dtype))


def sinusoidal_table(max_len: int, features: int) -> np.ndarray:
  """fairseq's SinusoidalPositionalEmbedding table: [sin | cos] halves."""
  half = features // 2
  scale = math.log(10000.0) / max(half - 1, 1)
  freqs = np.exp(np.arange(half, dtype=np.float64) * -scale)
  angles = np.arange(max_len, dtype=np.float64)[:, None] * freqs[None, :]
  table = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
  if features % 2:
    table = np.concatenate([table, np.zeros((max_len, 1))], axis=1)
  return table.astype(np.float32)


def position_table(config: TransformerConfig) -> np.ndarray:
  """The [max_len, stream_width] position table the model adds.

  Without `center_positions` the float32 `sinusoidal_table`; with it that
  table recentred per position in float64 (exact for a float64 model) and
  cut to the stream's width.
  """
  table = sinusoidal_table(config.max_len, config.d_model)
  if not config.center_positions:
    return table
  centred = table.astype(np.float64)
  centred -= centred.mean(axis=-1, keepdims=True)
  dtype = (np.float64 if jnp.dtype(config.dtype) == jnp.float64
           else np.float32)
  return centred[:, :config.stream_width].astype(dtype)


def embedding_init(pad_id: int = PAD_ID):
  """N(0, d^-0.5) with the PAD row zeroed (fairseq `Embedding`)."""
  def init(key, shape, dtype=jnp.float32):
    table = jax.random.normal(key, shape, dtype) * (shape[-1] ** -0.5)
    return table.at[pad_id].set(0)
  return init


def _partitioned(init, axes):
  return nn.with_logical_partitioning(init, axes)


def _constrain(x):
  return nn.with_logical_constraint(x, ACTIVATION_AXES)


def _norm_factory(cfg, param_axes=NORM_PARAM_AXES) -> Any:
  """`make_norm(**cfg)` with the params on the logical axes `param_axes`
  (default 'embed'; the sharding rules need it; normjax annotates nothing
  by default) where the module has `param_axes` and the config does not
  set it."""
  factory = nnorm.make_norm(**cfg)
  if ('param_axes' in cfg or
      'param_axes' not in nnorm.module_fields(factory.func)):
    return factory
  return functools.partial(factory, param_axes=param_axes)


def _site_norm(config: TransformerConfig, site: str, name: str,
               param_axes=NORM_PARAM_AXES):
  """`make(suffix='')` -> the norm module of `site`, named `name + suffix`."""
  factory = _norm_factory(config.norms[site], param_axes)

  def make(suffix: str = ''):
    return factory(name=f'{name}{suffix}')
  return make


def _deterministic(config: TransformerConfig, train: bool) -> bool:
  """Dropout is on only when training and not disabled in the config."""
  return config.deterministic or not train


def project_heads(x, kernel, bias, dtype):
  """x [..., d] -> [..., heads, head_dim] with kernel (d, heads, head_dim)."""
  y = jnp.einsum('...d,dhk->...hk', x.astype(dtype), kernel.astype(dtype))
  return y + bias.astype(dtype).reshape((1,) * (y.ndim - 2) + bias.shape)


class _HeadsProjection(nn.Module):
  """[..., d] -> [..., heads, head_dim]: kernel (embed, heads, kv), bias."""
  num_heads: int
  head_dim: int
  kernel_init: Callable[..., jax.Array]
  dtype: Any

  @nn.compact
  def __call__(self, x):
    # Parameters are created in their final 3-D shape (flax's DenseGeneral
    # initialises a flattened 2-D kernel, which breaks 3-D logical
    # constraints under a mesh).
    kernel = self.param(
        'kernel', _partitioned(self.kernel_init, ('embed', 'heads', 'kv')),
        (x.shape[-1], self.num_heads, self.head_dim), jnp.float32)
    bias = self.param(
        'bias', _partitioned(nn.initializers.zeros, ('heads', 'kv')),
        (self.num_heads, self.head_dim), jnp.float32)
    return project_heads(x, kernel, bias, self.dtype)


class _OutputProjection(nn.Module):
  """[..., heads, head_dim] -> [..., d]: kernel (heads, kv, embed), bias."""
  features: int
  kernel_init: Callable[..., jax.Array]
  dtype: Any

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
        'kernel', _partitioned(self.kernel_init, ('heads', 'kv', 'embed')),
        x.shape[-2:] + (self.features,), jnp.float32)
    bias = self.param(
        'bias', _partitioned(nn.initializers.zeros, ('embed',)),
        (self.features,), jnp.float32)
    y = jnp.einsum('...hk,hkd->...d', x, kernel.astype(self.dtype))
    return y + bias.astype(self.dtype).reshape((1,) * (y.ndim - 1) +
                                               bias.shape)


class MultiHeadAttention(nn.Module):
  """fairseq's MultiheadAttention, with flax's autoregressive cache.

  Biases everywhere; xavier_uniform init, with gain 1/sqrt(2) for q/k/v
  (fairseq v0.8 initialises its fused (3d, d) in_proj with xavier_uniform:
  bound sqrt(6 / 4d)). Queries are scaled by head_dim^-1/2; dropout on the
  attention weights. With `decode=True` (self-attention), keys and values are
  cached in 'cache' (`cached_key`, `cached_value`, `cache_index`) as in
  flax's MultiHeadDotProductAttention: the first call (with the full
  length) creates the cache, every later call appends one position. With
  `decode=True` and `cross=True`, the encoder's keys and values are read
  from 'cache' (`cross_key`, `cross_value`, see `init_cache`).

  The placement's norms inside the attention (`Placement`): per-head norms
  of Q, K and V ('query_norm', 'key_norm', 'value_norm' of the site
  '<stack>_qkv'; after the cache is read, before it is written, so cached
  entries are the projections, each normalised per token and head), and in
  self-attention NormFormer's 'head_scale' and 'out_norm'
  ('<stack>_attention_out'). They get `q_mask` / `kv_mask`, the token masks
  of the queries and of the keys (True = real token).
  """
  config: TransformerConfig
  deterministic: bool
  decode: bool = False
  cross: bool = False  # attends to the encoder output
  train: bool = False  # the norms' batch statistics (not `deterministic`)
  stack: str = 'decoder'  # the sites of the norms inside: '<stack>_...'

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, *, mask, q_mask=None,
               kv_mask=None):
    cfg = self.config
    placement = PLACEMENTS[cfg.placement]
    head_dim = cfg.attention_head_dim
    qkv_init = nn.initializers.variance_scaling(
        0.5, 'fan_avg', 'uniform', in_axis=0, out_axis=(1, 2))
    out_init = nn.initializers.variance_scaling(
        1.0, 'fan_avg', 'uniform', in_axis=(0, 1), out_axis=2)
    project = functools.partial(_HeadsProjection, cfg.num_heads, head_dim,
                                qkv_init, cfg.dtype)
    query = project(name='query')(inputs_q)
    if self.cross and self.decode and self.has_variable('cache',
                                                          'cross_key'):
      # The encoder's keys and values, projected once per sentence
      # (`fill_cross_attention_cache`), not at every decoding step.
      key = self.get_variable('cache', 'cross_key')
      value = self.get_variable('cache', 'cross_value')
    else:
      key = project(name='key')(inputs_kv)
      value = project(name='value')(inputs_kv)
      if self.cross and self.decode:  # creates the cache entries (shapes)
        self.put_variable('cache', 'cross_key', key)
        self.put_variable('cache', 'cross_value', value)
    if placement.qkv_norm:  # per token and head: [..., heads, head_dim]
      site = f'{self.stack}_qkv'
      for name, t_mask in (('query', q_mask), ('key', kv_mask),
                           ('value', kv_mask)):
        t_mask = None if t_mask is None else t_mask[..., None]
        normed = _site_norm(cfg, site, f'{name}_norm', ('kv',))()(
            {'query': query, 'key': key, 'value': value}[name],
            not self.train, mask=t_mask).astype(cfg.dtype)
        if name == 'query':
          query = normed
        elif name == 'key':
          key = normed
        else:
          value = normed
    if cfg.qk_norm:  # per token and head, so cached keys stay exact
      query, key = nnorm.QKNorm(cfg.qk_norm, name='qk_norm')(query, key)

    if self.decode and not self.cross:
      initialized = self.has_variable('cache', 'cached_key')
      cached_key = self.variable('cache', 'cached_key', jnp.zeros, key.shape,
                                 key.dtype)
      cached_value = self.variable('cache', 'cached_value', jnp.zeros,
                                   value.shape, value.dtype)
      cache_index = self.variable('cache', 'cache_index',
                                  lambda: jnp.array(0, jnp.int32))
      if initialized:
        batch, max_length, _, _ = cached_key.value.shape
        if query.shape[1] != 1:
          raise ValueError(f'decode: one position per call, got query shape '
                           f'{query.shape}.')
        i = cache_index.value
        zero = jnp.zeros((), jnp.int32)
        key = jax.lax.dynamic_update_slice(cached_key.value, key,
                                           (zero, i, zero, zero))
        value = jax.lax.dynamic_update_slice(cached_value.value, value,
                                             (zero, i, zero, zero))
        cached_key.value, cached_value.value = key, value
        cache_index.value = i + 1
        mask = jnp.broadcast_to(jnp.arange(max_length) <= i,
                                (batch, 1, 1, max_length))

    dropout_rng = None
    if not self.deterministic and cfg.attention_dropout > 0:
      dropout_rng = self.make_rng('dropout')
    x = nn.dot_product_attention(
        query, key, value, mask=mask, dropout_rng=dropout_rng,
        dropout_rate=cfg.attention_dropout, broadcast_dropout=False,
        deterministic=self.deterministic, dtype=cfg.dtype,
        force_fp32_for_softmax=True)
    x = x.astype(cfg.dtype)
    if placement.head_scale and not self.cross:
      scale = self.param('head_scale',
                         _partitioned(nn.initializers.ones, ('heads',)),
                         (x.shape[-2],), jnp.float32)
      x = x * scale.astype(cfg.dtype).reshape(
          (1,) * (x.ndim - 2) + (x.shape[-2], 1))
    out = _OutputProjection(cfg.stream_width, out_init, cfg.dtype,
                            name='out')(x)
    if placement.attention_out_norm and not self.cross:
      out = _site_norm(cfg, f'{self.stack}_attention_out', 'out_norm')()(
          out, not self.train, mask=q_mask).astype(cfg.dtype)
    return out


def _attention(config: TransformerConfig, deterministic: bool, name: str, *,
               mask, memory=None, decode: bool = False, train: bool = False,
               stack: str = 'decoder', q_mask=None, kv_mask=None):
  """Attention over `memory` (self-attention if None) -> residual dropout.

  `q_mask` / `kv_mask`: the token masks of the queries and keys (for the
  norms inside; `kv_mask` defaults to `q_mask` in self-attention)."""
  if memory is None and kv_mask is None:
    kv_mask = q_mask

  def attend(h):
    h = MultiHeadAttention(config, deterministic, decode=decode,
                           cross=memory is not None, train=train, stack=stack,
                           name=name)(
        h, h if memory is None else memory, mask=mask, q_mask=q_mask,
        kv_mask=kv_mask)
    return nn.Dropout(config.dropout)(h, deterministic=deterministic)
  return attend


def _feed_forward(config: TransformerConfig, deterministic: bool, *,
                  train: bool = False, stack: str = 'decoder', mask=None):
  """fc1 -> ReLU -> activation dropout -> (NormFormer: 'ffn_mid_norm' of
  '<stack>_ffn_mid') -> fc2 -> residual dropout."""
  def ffn(h):
    xavier = nn.initializers.xavier_uniform()
    h = nn.Dense(config.ffn_dim, dtype=config.dtype,
                 kernel_init=_partitioned(xavier, ('embed', 'mlp')),
                 bias_init=_partitioned(nn.initializers.zeros, ('mlp',)),
                 name='fc1')(h)
    h = nn.relu(h)
    h = nn.Dropout(config.activation_dropout)(h, deterministic=deterministic)
    if PLACEMENTS[config.placement].ffn_mid_norm:
      h = _site_norm(config, f'{stack}_ffn_mid', 'ffn_mid_norm', ('mlp',))()(
          h, not train, mask=mask).astype(config.dtype)
    h = nn.Dense(config.stream_width, dtype=config.dtype,
                 kernel_init=_partitioned(xavier, ('mlp', 'embed')),
                 bias_init=_partitioned(nn.initializers.zeros, ('embed',)),
                 name='fc2')(h)
    return nn.Dropout(config.dropout)(h, deterministic=deterministic)
  return ffn


def _embed(config: TransformerConfig, embedding: nn.Embed, tokens: jax.Array,
           positions: jax.Array, mask: jax.Array,
           deterministic: bool) -> jax.Array:
  """sqrt(d) * E[tokens] + sinusoid[positions] (zero at pads), dropout."""
  table = jnp.asarray(position_table(config))
  pos = jnp.take(table, positions, axis=0) * mask[..., None].astype(
      table.dtype)
  x = embedding(tokens) * jnp.asarray(math.sqrt(config.d_model), config.dtype)
  x = x + pos.astype(x.dtype)
  x = nn.Dropout(config.dropout)(x, deterministic=deterministic)
  return _constrain(x.astype(config.dtype))


def _check_length(config: TransformerConfig, length: int, what: str):
  if length > config.max_len:
    raise ValueError(f'{what} has length {length} > config.max_len='
                     f'{config.max_len} (the sinusoidal position table).')


# ----------------------------------------------------------------------------
# Layers.
# ----------------------------------------------------------------------------

def _bind_placement(config, mask, train, layer_index, num_layers):
  """The config's placement with this layer's keyword arguments bound."""
  placement = PLACEMENTS[config.placement]

  def place(x, sublayer, norm, ffn=False):
    return placement(x, sublayer, norm, mask=mask, train=train,
                     layer_index=layer_index, num_layers=num_layers,
                     config=config, ffn=ffn)
  return place


class EncoderLayer(nn.Module):
  config: TransformerConfig
  layer_index: int

  @nn.compact
  def __call__(self, x, mask, attention_mask, *, train: bool):
    cfg = self.config
    det = _deterministic(cfg, train)
    place = _bind_placement(cfg, mask, train, self.layer_index,
                            cfg.num_encoder_layers)
    x = place(x, _attention(cfg, det, 'self_attention', mask=attention_mask,
                            train=train, stack='encoder', q_mask=mask),
              _site_norm(cfg, 'encoder_attention', 'attention_norm'))
    x = place(x, _feed_forward(cfg, det, train=train, stack='encoder',
                               mask=mask),
              _site_norm(cfg, 'encoder_ffn', 'ffn_norm'), ffn=True)
    return _constrain(x)


class DecoderLayer(nn.Module):
  config: TransformerConfig
  layer_index: int

  @nn.compact
  def __call__(self, y, encoded, mask, self_attention_mask, cross_mask, *,
               train: bool, memory_mask=None):
    cfg = self.config
    det = _deterministic(cfg, train)
    place = _bind_placement(cfg, mask, train, self.layer_index,
                            cfg.num_decoder_layers)
    y = place(y, _attention(cfg, det, 'self_attention',
                            mask=self_attention_mask, decode=cfg.decode,
                            train=train, q_mask=mask),
              _site_norm(cfg, 'decoder_attention', 'attention_norm'))
    if encoded is not None:  # None: a decoder-only language model
      y = place(y, _attention(cfg, det, 'cross_attention', mask=cross_mask,
                              memory=encoded, decode=cfg.decode, train=train,
                              q_mask=mask, kv_mask=memory_mask),
                _site_norm(cfg, 'decoder_attention', 'cross_attention_norm'))
    y = place(y, _feed_forward(cfg, det, train=train, mask=mask),
              _site_norm(cfg, 'decoder_ffn', 'ffn_norm'), ffn=True)
    return _constrain(y)


# ----------------------------------------------------------------------------
# Stacks.
# ----------------------------------------------------------------------------

class Encoder(nn.Module):
  config: TransformerConfig
  embedding: nn.Module

  @nn.compact
  def __call__(self, inputs, *, train: bool):
    cfg = self.config
    _check_length(cfg, inputs.shape[1], 'inputs')
    mask = inputs != PAD_ID
    positions = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
    x = _embed(cfg, self.embedding, inputs, positions, mask,
               _deterministic(cfg, train))
    if cfg.embed_norm:
      x = _site_norm(cfg, 'encoder_attention', 'embed_norm')()(
          x, not train, mask=mask)
    # Keys are masked, queries are not (fairseq's key_padding_mask).
    attention_mask = nn.make_attention_mask(jnp.ones_like(mask), mask,
                                            dtype=jnp.bool_)
    for i in range(cfg.num_encoder_layers):
      x = EncoderLayer(cfg, layer_index=i, name=f'layer_{i}')(
          x, mask, attention_mask, train=train)
    if PLACEMENTS[cfg.placement].final_norm:
      x = _site_norm(cfg, 'encoder_final', 'final_norm')()(
          x, not train, mask=mask)
    return x


class Decoder(nn.Module):
  config: TransformerConfig
  embedding: nn.Module
  output_projection: nn.Module | None = None

  @nn.compact
  def __call__(self, encoded, inputs, decoder_inputs, *, train: bool):
    """`encoded`/`inputs` None: no cross-attention (a language model)."""
    cfg = self.config
    if cfg.decode:
      # One position per call, all real; flax's attention adds the causal
      # mask over its cache. The position counter lives in the cache too.
      mask = jnp.ones(decoder_inputs.shape, jnp.bool_)
      self_mask = None
      initialized = self.has_variable('cache', 'position')
      counter = self.variable('cache', 'position',
                              lambda: jnp.zeros((), jnp.int32))
      if initialized:
        positions = jnp.broadcast_to(counter.value, decoder_inputs.shape)
        counter.value = counter.value + decoder_inputs.shape[1]
      else:
        _check_length(cfg, decoder_inputs.shape[1], 'the decoding cache')
        positions = jnp.broadcast_to(
            jnp.arange(decoder_inputs.shape[1], dtype=jnp.int32)[None, :],
            decoder_inputs.shape)
    else:
      _check_length(cfg, decoder_inputs.shape[1], 'decoder_inputs')
      mask = decoder_inputs != PAD_ID
      self_mask = nn.combine_masks(
          nn.make_causal_mask(decoder_inputs, dtype=jnp.bool_),
          nn.make_attention_mask(jnp.ones_like(mask), mask, dtype=jnp.bool_),
          dtype=jnp.bool_)
      positions = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
    cross_mask = memory_mask = None
    if encoded is not None:
      memory_mask = inputs != PAD_ID
      cross_mask = nn.make_attention_mask(jnp.ones_like(mask), memory_mask,
                                          dtype=jnp.bool_)

    y = _embed(cfg, self.embedding, decoder_inputs, positions, mask,
               _deterministic(cfg, train))
    if cfg.embed_norm:
      y = _site_norm(cfg, 'decoder_attention', 'embed_norm')()(
          y, not train, mask=mask)
    for i in range(cfg.num_decoder_layers):
      y = DecoderLayer(cfg, layer_index=i, name=f'layer_{i}')(
          y, encoded, mask, self_mask, cross_mask, train=train,
          memory_mask=memory_mask)
    if PLACEMENTS[cfg.placement].final_norm:
      y = _site_norm(cfg, 'decoder_final', 'final_norm')()(
          y, not train, mask=mask)
    if self.output_projection is None:
      logits = self.embedding.attend(y)
    else:
      logits = self.output_projection(y)
    return logits.astype(jnp.float32)


def _output_dense(config: TransformerConfig) -> nn.Dense:
  """The untied output layer 'output_projection': N(0, d^-0.5), no bias
  (fairseq's `embed_out`), or a zero-initialised bias with `untie_output`."""
  return nn.Dense(
      config.vocab_size, use_bias=config.untie_output, dtype=config.dtype,
      kernel_init=_partitioned(
          nn.initializers.normal(config.d_model ** -0.5), ('embed', 'vocab')),
      bias_init=_partitioned(nn.initializers.zeros, ('vocab',)),
      name='output_projection')


class Transformer(nn.Module):
  """Encoder-decoder Transformer for translation (fairseq semantics).

  Variables: 'params', 'batch_stats' (running statistics of batch norms),
  'grad_stats' (PowerNorm/UN backward statistics), 'cache' (decode=True).
  """
  config: TransformerConfig

  def setup(self):
    cfg = self.config

    def embed(name):
      return nn.Embed(
          cfg.vocab_size, cfg.stream_width, dtype=cfg.dtype,
          param_dtype=jnp.float32,
          embedding_init=_partitioned(embedding_init(), ('vocab', 'embed')),
          name=name)

    if cfg.share_embeddings:
      self.shared_embedding = embed('shared_embedding')
      source, target, projection = (self.shared_embedding,
                                    self.shared_embedding, None)
      if cfg.untie_output:
        self.output_projection = _output_dense(cfg)
        projection = self.output_projection
    else:
      self.source_embedding = embed('source_embedding')
      self.target_embedding = embed('target_embedding')
      # fairseq's separate `embed_out`: no bias, N(0, d^-0.5).
      self.output_projection = _output_dense(cfg)
      source, target, projection = (self.source_embedding,
                                    self.target_embedding,
                                    self.output_projection)
    self.encoder = Encoder(cfg, embedding=source)
    self.decoder = Decoder(cfg, embedding=target, output_projection=projection)

  def encode(self, inputs, *, train: bool):
    """inputs [B, S] int (PAD = 0) -> encoded [B, S, d_model]."""
    return self.encoder(jnp.asarray(inputs), train=train)

  def decode(self, encoded, inputs, decoder_inputs, *, train: bool):
    """-> logits [B, T, vocab] float32.

    `decoder_inputs` are already shifted (`shift_right`); their non-PAD
    positions are the target mask. With `config.decode=True` and a 'cache'
    collection (`init_cache`), call it with one position [B, 1] at a time.
    """
    return self.decoder(encoded, jnp.asarray(inputs),
                        jnp.asarray(decoder_inputs), train=train)

  def __call__(self, inputs, targets, *, train: bool):
    """inputs [B, S], targets [B, T] (EOS-terminated, PAD = 0) -> logits."""
    encoded = self.encode(inputs, train=train)
    return self.decode(encoded, inputs, shift_right(targets), train=train)


class AdaptiveSoftmax(nn.Module):
  """Adaptive softmax (Grave et al., 2017) over frequency-sorted ids.

  With cutoffs c_1 < ... < c_K the head is a softmax over the words
  [0, c_1) and K cluster tokens; word w of cluster k, c_k <= w < c_{k+1},
  has log p(w) = log p_head(cluster k) + log softmax_k(w). The word logits
  are h E^T + b with E the tied embedding table (Transformer-XL's
  `ProjectedAdaptiveLogSoftmax` with div_val 1 and tied weights) or an
  output kernel of its own. Returns normalised log-probabilities for every
  word, so any loss that applies log_softmax to them is unchanged; it saves
  no computation over a full softmax, only defines the distribution.
  """
  vocab_size: int
  cutoffs: tuple[int, ...]
  embedding: nn.Module | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h):
    if self.embedding is not None:
      logits = self.embedding.attend(h)
    else:
      logits = nn.Dense(
          self.vocab_size, use_bias=False, dtype=self.dtype,
          kernel_init=_partitioned(
              nn.initializers.normal(h.shape[-1] ** -0.5), ('embed', 'vocab')),
          name='kernel')(h)
    bias = self.param('bias', _partitioned(nn.initializers.zeros, ('vocab',)),
                      (self.vocab_size,), jnp.float32)
    logits = logits.astype(jnp.float32) + bias.reshape(
        (1,) * (logits.ndim - 1) + bias.shape)
    clusters = nn.Dense(
        len(self.cutoffs), dtype=jnp.float32,
        kernel_init=_partitioned(nn.initializers.normal(h.shape[-1] ** -0.5),
                                 ('embed', None)),
        name='cluster')(h).astype(jnp.float32)
    bounds = (0, *self.cutoffs, self.vocab_size)
    head = jax.nn.log_softmax(
        jnp.concatenate([logits[..., :bounds[1]], clusters], axis=-1))
    parts = [head[..., :bounds[1]]]
    for k in range(len(self.cutoffs)):
      tail = jax.nn.log_softmax(logits[..., bounds[k + 1]:bounds[k + 2]])
      parts.append(head[..., bounds[1] + k, None] + tail)
    return jnp.concatenate(parts, axis=-1)


class LanguageModel(nn.Module):
  """Decoder-only causal Transformer over a token stream.

  The decoder of `Transformer` without cross-attention: the sites are
  'decoder_attention', 'decoder_ffn' and 'decoder_final' (the encoder sites
  and fields are ignored), every norm gets the mask `inputs != PAD`.
  `share_embeddings` ties the output layer to the input embedding;
  `adaptive_softmax_cutoffs` switches to an adaptive softmax.
  """
  config: TransformerConfig

  def setup(self):
    cfg = self.config
    self.embedding = nn.Embed(
        cfg.vocab_size, cfg.stream_width, dtype=cfg.dtype,
        param_dtype=jnp.float32,
        embedding_init=_partitioned(embedding_init(), ('vocab', 'embed')),
        name='embedding')
    tied = (self.embedding if cfg.share_embeddings and not cfg.untie_output
            else None)
    if cfg.adaptive_softmax_cutoffs:
      projection = AdaptiveSoftmax(cfg.vocab_size, cfg.adaptive_softmax_cutoffs,
                                   embedding=tied, dtype=cfg.dtype,
                                   name='adaptive_softmax')
    elif tied is None:
      projection = _output_dense(cfg)
    else:
      projection = None
    self.decoder = Decoder(cfg, embedding=self.embedding,
                           output_projection=projection)

  def __call__(self, inputs, *, train: bool):
    """inputs [B, L] int (PAD = 0) -> logits [B, L, vocab] float32: the
    prediction at position t sees inputs[:, :t + 1] only."""
    return self.decoder(None, None, jnp.asarray(inputs), train=train)


def init_cache(model: Transformer, variables: Mapping[str, Any],
               encoded: jax.Array, inputs: jax.Array, max_len: int) -> Any:
  """The empty decoding cache for `len(inputs)` sequences of `max_len` steps.

  Built from shapes only (`jax.eval_shape`): every cache entry starts at zero
  (flax's cached keys/values and index, the decoder's position counter).
  `model` may have decode False or True; `variables` without 'cache'.
  """
  decoder = model.clone(config=dataclasses.replace(model.config, decode=True))
  variables = {k: v for k, v in variables.items() if k != 'cache'}
  dummy = jnp.full((inputs.shape[0], max_len), BOS_ID, jnp.int32)

  def make(variables, encoded, inputs):
    _, state = decoder.apply(variables, encoded, inputs, dummy, train=False,
                             method=Transformer.decode, mutable=['cache'])
    return state['cache']

  shapes = jax.eval_shape(make, variables, encoded, inputs)
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  return fill_cross_attention_cache(model.config, variables, encoded, cache)


def fill_cross_attention_cache(config: TransformerConfig,
                               variables: Mapping[str, Any],
                               encoded: jax.Array, cache: Any) -> Any:
  """`cache` with every decoder layer's cross-attention keys and values of
  `encoded` [B, S, d]: the projections decoding would otherwise recompute at
  every step (most of its work for short targets)."""
  params = nn.unbox(variables['params'])['decoder']
  cache = jax.tree.map(lambda x: x, dict(cache))  # a copy to fill
  for i in range(config.num_decoder_layers):
    weights = params[f'layer_{i}']['cross_attention']
    entry = dict(cache['decoder'][f'layer_{i}']['cross_attention'])
    for name in ('key', 'value'):
      entry[f'cross_{name}'] = project_heads(
          encoded, weights[name]['kernel'], weights[name]['bias'],
          config.dtype)
    layer = dict(cache['decoder'][f'layer_{i}'])
    layer['cross_attention'] = entry
    cache['decoder'] = {**cache['decoder'], f'layer_{i}': layer}
  return cache
