"""Placements (zoo spec §3): Post, Pre, Peri, Mix-LN, LayerNorm Scaling."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import models

VOCAB = 17
TOKENS = np.array([[5, 6, 7, 8, 9, 2], [10, 11, 2, 4, 5, 6],
                   [4, 12, 6, 2, 0, 0]], np.int32)
KWARGS = dict(mask=None, train=False, layer_index=0, num_layers=1)
# Compile time dominates: no LLVM optimisation or fusion emitters.
jit = functools.partial(jax.jit, compiler_options={
    'xla_backend_optimization_level': 0,
    'xla_cpu_use_fusion_emitters': False})


def rms(x, eps=0.0):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)


def recording_norm(calls):
  """A norm factory for the placement functions: RMS with no params,
  recording which norms (by suffix) were applied, in order."""
  def make(suffix=''):
    def apply(x, use_running_average, mask=None):
      del use_running_average, mask
      calls.append(suffix)
      return rms(x)
    return apply
  return make


def config(**kwargs):
  return models.TransformerConfig(**{**dict(
      vocab_size=VOCAB, d_model=16, num_heads=2, ffn_dim=32,
      num_decoder_layers=4, max_len=16, dropout=0.0, attention_dropout=0.0,
      activation_dropout=0.0), **kwargs})


@functools.lru_cache(maxsize=None)
def forward(cfg):
  model = models.LanguageModel(cfg)
  init = jit(lambda: nn.unbox(model.init(jax.random.key(0), TOKENS,
                                             train=False)))

  def apply(variables):
    return model.apply(variables, TOKENS, train=False,
                       capture_intermediates=lambda m, _: m.name and
                       m.name.startswith('layer_'))
  return init, jit(apply)


def layer_outputs(intermediates, layers=4):
  decoder = intermediates['intermediates']['decoder']
  return [np.asarray(decoder[f'layer_{i}']['__call__'][0])
          for i in range(layers)]


def test_zero_sublayer_pre_is_identity_post_is_the_norm():
  x = np.random.default_rng(0).normal(size=(3, 8)) * 3 + 1
  zero = lambda h: 0 * h  # noqa: E731
  calls = []
  for fn, want in ((models.pre_norm, x), (models.post_norm, rms(x))):
    got = fn(x, zero, recording_norm(calls), config=config(), **KWARGS)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_peri_is_invariant_to_the_scale_of_the_sublayer_output():
  rng = np.random.default_rng(1)
  x, w = rng.normal(size=(3, 8)), rng.normal(size=(8, 8))
  out = [models.peri_norm(x, lambda h, c=c: c * np.tanh(h @ w),
                          recording_norm([]), config=config(), **KWARGS)
         for c in (1.0, 37.0)]
  np.testing.assert_allclose(out[0], out[1], rtol=1e-12)
  pre = [models.pre_norm(x, lambda h, c=c: c * np.tanh(h @ w),
                         recording_norm([]), config=config(), **KWARGS)
         for c in (1.0, 37.0)]
  assert not np.allclose(pre[0], pre[1])  # pre-norm is not
  # Each residual increment is the output norm's: RMS 1 per token.
  np.testing.assert_allclose(np.sqrt(np.mean((out[0] - x) ** 2, -1)), 1.0,
                             rtol=1e-12)


@pytest.mark.parametrize('alpha,layers', [(0.25, 4), (0.5, 4), (0.25, 12),
                                          (0.0, 3), (1.0, 3)])
def test_mix_has_floor_alpha_l_post_layers(alpha, layers):
  x = np.random.default_rng(2).normal(size=(2, 8)) * 3
  post = []
  for i in range(layers):
    calls = []
    seen = []
    models.mix_norm(x, lambda h, seen=seen: seen.append(h) or h,
                    recording_norm(calls), config=config(mix_alpha=alpha),
                    mask=None, train=False, layer_index=i, num_layers=layers)
    # Post-norm hands the sublayer the raw x; pre-norm the normalised one.
    post.append(bool(np.array_equal(seen[0], x)) and calls == [''])
  assert sum(post) == math.floor(alpha * layers) == post.count(True)
  assert post == sorted(post, reverse=True)  # the first layers


def test_mix_alpha_0_is_pre_and_alpha_1_is_post_bit_for_bit():
  norms = {s: dict(kind='rmsnorm') for s in models.SITES}
  pre_init, pre = forward(config(placement='pre', norms=norms))
  mix0_init, mix0 = forward(config(placement='mix', mix_alpha=0.0,
                                   norms=norms))
  variables = pre_init()
  assert jax.tree.structure(variables) == jax.tree.structure(mix0_init())
  (a, ia), (b, ib) = pre(variables), mix0(variables)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for x, y in zip(layer_outputs(ia), layer_outputs(ib)):
    np.testing.assert_array_equal(x, y)

  post_init, post = forward(config(placement='post', norms=norms))
  mix1_init, mix1 = forward(config(placement='mix', mix_alpha=1.0,
                                   norms=norms))
  variables = mix1_init()  # post's parameters plus the final norm
  post_variables = jax.tree.map(lambda x: x, variables)
  del post_variables['params']['decoder']['final_norm']
  assert jax.tree.structure(post_variables) == jax.tree.structure(
      post_init())
  (_, ia), (_, ib) = post(post_variables), mix1(variables)
  for x, y in zip(layer_outputs(ia), layer_outputs(ib)):
    np.testing.assert_array_equal(x, y)


def test_layer_norm_scaling_equals_pre_after_dividing_the_affine():
  lns_init, lns = forward(config(placement='lns'))
  _, pre = forward(config(placement='pre'))
  variables = lns_init()
  surgery = jax.tree.map(lambda x: x, variables)
  decoder = surgery['params']['decoder']
  for i in range(4):
    for norm in ('attention_norm', 'ffn_norm'):
      decoder[f'layer_{i}'][norm] = jax.tree.map(
          lambda p, i=i: p / math.sqrt(i + 1), decoder[f'layer_{i}'][norm])
  (a, ia), (b, ib) = lns(variables), pre(surgery)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  # Layer 1 (l = 1) is unscaled: equal to pre-norm with the same params.
  _, ic = pre(variables)
  np.testing.assert_array_equal(layer_outputs(ia)[0], layer_outputs(ic)[0])
  assert not np.allclose(layer_outputs(ia)[1], layer_outputs(ic)[1])


def test_peri_norms_the_embeddings_by_default():
  init, apply = forward(config(placement='peri'))
  variables = init()
  decoder = variables['params']['decoder']
  assert 'embed_norm' in decoder and 'final_norm' in decoder
  for name in ('attention_norm', 'attention_norm_out', 'ffn_norm',
               'ffn_norm_out'):
    assert name in decoder['layer_0'], name
  assert np.isfinite(np.asarray(apply(variables)[0])).all()
  no_embed, _ = forward(config(placement='peri', embed_norm=False))
  assert 'embed_norm' not in no_embed()['params']['decoder']


@pytest.mark.parametrize('kind,placement', [
    ('batchnorm', 'peri'), ('powernorm', 'mix'), ('pn_v', 'lns'),
    ('unified', 'peri'), ('rmsnorm', 'lns'), ('layernorm', 'mix'),
    ('none', 'peri'),
])
def test_any_norm_in_any_placement_trains(kind, placement):
  options = {'powernorm': dict(num_groups=2, warmup_steps=2),
             'pn_v': dict(num_groups=2),
             'unified': dict(window_size=2, warmup_steps=2)}.get(kind, {})
  cfg = config(placement=placement, num_decoder_layers=2, mix_alpha=0.5,
               norms={s: dict(kind=kind, **options) for s in models.SITES})
  model = models.LanguageModel(cfg)
  variables = model.init(jax.random.key(0), TOKENS, train=False)

  @jit
  def step(variables):
    def loss(params, grad_stats):
      logits, updates = model.apply(
          {**variables, 'params': params, 'grad_stats': grad_stats}, TOKENS,
          train=True, mutable=['batch_stats'])
      return jnp.mean(jax.nn.logsumexp(logits, -1)), updates
    (value, updates), (grads, _) = jax.value_and_grad(
        loss, argnums=(0, 1), has_aux=True)(variables['params'],
                                            variables.get('grad_stats', {}))
    return value, grads, updates

  value, grads, _ = step(variables)
  assert np.isfinite(float(value))
  assert all(np.isfinite(np.asarray(g)).all()
             for g in jax.tree.leaves(nn.unbox(grads)))


def test_bad_placement_options_are_rejected():
  with pytest.raises(ValueError, match='mix_alpha'):
    config(placement='mix', mix_alpha=1.5)
  with pytest.raises(ValueError, match='placement'):
    config(placement='sandwich')
