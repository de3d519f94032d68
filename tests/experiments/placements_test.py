"""Placements (zoo spec §3): Post, Pre, Peri, Mix-LN, LayerNorm Scaling,
OLMo 2 reordered, HybridNorm, NormFormer."""

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
  (a, ia), (b, _) = lns(variables), pre(surgery)
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


# ------------------------------------------ OLMo 2, HybridNorm, NormFormer --

NEW_PLACEMENTS = ('reordered', 'hybrid', 'normformer')


def record(names):
  """An interceptor recording (first argument, output) of the modules
  named `names` (their __call__), by name, in call order."""
  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and context.module.name in names:
      seen.setdefault(context.module.name, []).append(
          (np.asarray(args[0]), np.asarray(out)))
    return out
  return seen, interceptor


def intercepted(cfg, names, tokens=TOKENS):
  model = models.LanguageModel(cfg)
  variables = nn.unbox(model.init(jax.random.key(0), tokens, train=False))
  seen, interceptor = record(names)
  with nn.intercept_methods(interceptor):
    logits = model.apply(variables, tokens, train=False)
  return variables, seen, np.asarray(logits)


def test_reordered_is_x_plus_the_norm_of_the_sublayer_output():
  x = np.random.default_rng(3).normal(size=(3, 8)) * 3 + 1
  seen, calls = [], []
  got = models.reordered_norm(x, lambda h: seen.append(h) or np.tanh(h),
                              recording_norm(calls), config=config(),
                              **KWARGS)
  np.testing.assert_array_equal(seen[0], x)  # no norm on the input
  np.testing.assert_allclose(got, x + rms(np.tanh(x)), rtol=1e-12)
  assert calls == ['_out']
  # In the model: the residual stream of every block, intercepted.
  cfg = config(placement='reordered')
  assert cfg.qk_norm == 'rmsnorm'  # OLMo 2's QK-norm by default
  assert config(placement='reordered', qk_norm='').qk_norm == ''
  variables, seen, _ = intercepted(cfg, (
      'layer_0', 'layer_1', 'self_attention', 'attention_norm_out', 'fc2',
      'ffn_norm_out'))
  layer0 = variables['params']['decoder']['layer_0']
  assert 'attention_norm' not in layer0 and 'ffn_norm' not in layer0
  assert 'qk_norm' in layer0['self_attention']
  for i in range(2):
    x, _ = seen[f'layer_{i}'][0]
    att_in, att = seen['self_attention'][i]
    np.testing.assert_array_equal(att_in, x)  # F sees x itself
    norm_in, att_n = seen['attention_norm_out'][i]
    np.testing.assert_array_equal(norm_in, att)  # N sees F(x)
    h = x + att_n
    ffn_norm_in, ffn_n = seen['ffn_norm_out'][i]
    np.testing.assert_array_equal(ffn_norm_in, seen['fc2'][i][1])
    np.testing.assert_array_equal(seen[f'layer_{i}'][0][1], h + ffn_n)


@pytest.mark.parametrize('kind', ['layernorm', 'rmsnorm', 'batchnorm'])
def test_hybrid_normalises_q_k_v_per_head_and_post_norms_the_ffn(kind):
  cfg = config(placement='hybrid', num_decoder_layers=2,
               norms={s: dict(kind=kind) for s in models.ALL_SITES})
  names = ('layer_0', 'self_attention', 'query_norm', 'key_norm',
           'value_norm', 'fc2', 'ffn_norm')
  variables, seen, _ = intercepted(cfg, names)
  layer0 = variables['params']['decoder']['layer_0']
  assert 'attention_norm' not in layer0 and 'final_norm' not in (
      variables['params']['decoder'])
  real = TOKENS != models.PAD_ID
  for name in ('query_norm', 'key_norm', 'value_norm'):
    for t, out in seen[name]:
      assert t.shape == out.shape == (3, 6, 2, 8)  # [B, L, heads, head_dim]
      out = out[real]
      if kind == 'layernorm':  # per token and head: mean 0, variance 1
        assert np.abs(out.mean(-1)).max() < 1e-6
        assert np.abs(out.var(-1) - 1).max() < 1e-4
      elif kind == 'rmsnorm':  # RMS 1
        assert np.abs(np.sqrt((out ** 2).mean(-1)) - 1).max() < 1e-4
      else:  # running statistics at init: the input unchanged up to eps
        np.testing.assert_allclose(out, t[real] / np.sqrt(1 + 1e-5),
                                   rtol=1e-5, atol=1e-6)
  # Attention: x + Attn(x), no norm around it; FFN: N(h + F(h)).
  x = seen['layer_0'][0][0]
  att_in, att = seen['self_attention'][0]
  np.testing.assert_array_equal(att_in, x)
  ffn_norm_in, ffn_out = seen['ffn_norm'][0]
  np.testing.assert_array_equal(ffn_norm_in, x + att + seen['fc2'][0][1])
  np.testing.assert_array_equal(seen['layer_0'][0][1], ffn_out)


def test_hybrid_qkv_batch_norms_train_with_statistics_of_their_own():
  """Stateful norms at the QKV site: one set of running statistics each
  for Q, K and V (channels: the head features), updated in training."""
  cfg = config(placement='hybrid', num_decoder_layers=1,
               norms={s: dict(kind='batchnorm') for s in models.ALL_SITES})
  model = models.LanguageModel(cfg)
  variables = model.init(jax.random.key(0), TOKENS, train=False)
  out, updates = model.apply(variables, TOKENS, train=True,
                             mutable=['batch_stats'])
  stats = updates['batch_stats']['decoder']['layer_0']['self_attention']
  assert set(stats) == {'query_norm', 'key_norm', 'value_norm'}
  assert np.isfinite(np.asarray(out)).all()


def test_normformer_with_no_extra_norms_and_unit_head_scales_is_pre_norm():
  norms = {s: dict(kind='layernorm') for s in models.SITES}
  extra = dict(decoder_attention_out=dict(kind='none'),
               decoder_ffn_mid=dict(kind='none'))
  nf_cfg = config(placement='normformer', norms={**norms, **extra})
  variables, _, nf_logits = intercepted(nf_cfg, ())
  attention = variables['params']['decoder']['layer_0']['self_attention']
  np.testing.assert_array_equal(attention['head_scale'], np.ones(2))
  pre_variables = jax.tree.map(lambda x: x, variables)
  for i in range(4):
    del pre_variables['params']['decoder'][f'layer_{i}']['self_attention'][
        'head_scale']
  pre = models.LanguageModel(config(placement='pre', norms=norms))
  assert jax.tree.structure(pre_variables) == jax.tree.structure(
      nn.unbox(pre.init(jax.random.key(0), TOKENS, train=False)))
  np.testing.assert_array_equal(
      nf_logits, np.asarray(pre.apply(pre_variables, TOKENS, train=False)))
  # With the norms on, they sit where NormFormer puts them.
  variables, seen, _ = intercepted(config(placement='normformer'),
                                   ('out', 'out_norm', 'fc1', 'ffn_mid_norm',
                                    'fc2'))
  layer0 = variables['params']['decoder']['layer_0']
  assert {'out_norm', 'head_scale'} <= set(layer0['self_attention'])
  assert 'ffn_mid_norm' in layer0 and 'attention_norm' in layer0
  np.testing.assert_array_equal(seen['out_norm'][0][0], seen['out'][0][1])
  np.testing.assert_array_equal(seen['ffn_mid_norm'][0][0],
                                np.maximum(seen['fc1'][0][1], 0))
  np.testing.assert_array_equal(seen['fc2'][0][0],
                                seen['ffn_mid_norm'][0][1])


def test_normformer_head_scales_scale_each_head():
  cfg = config(placement='normformer', num_decoder_layers=1)
  variables, seen, base = intercepted(cfg, ('out',))
  scaled = jax.tree.map(lambda x: x, variables)
  attention = scaled['params']['decoder']['layer_0']['self_attention']
  attention['head_scale'] = np.array([0.0, 1.0], np.float32)
  seen2, interceptor = record(('out',))
  with nn.intercept_methods(interceptor):
    models.LanguageModel(cfg).apply(scaled, TOKENS, train=False)
  heads = seen['out'][0][0]
  np.testing.assert_array_equal(seen2['out'][0][0][..., 0, :], 0)
  np.testing.assert_array_equal(seen2['out'][0][0][..., 1, :],
                                heads[..., 1, :])


@pytest.mark.parametrize('placement', sorted(models.PLACEMENTS))
def test_every_placement_is_causal(placement):
  cfg = config(placement=placement, num_decoder_layers=2, mix_alpha=0.5,
               norms={s: dict(kind='rmsnorm') for s in models.ALL_SITES})
  init, apply = forward(cfg)
  variables = init()
  changed = TOKENS.copy()
  changed[:, 3] = [13, 14, 15]  # position 3 of every row
  a = np.asarray(apply(variables)[0])
  model = models.LanguageModel(cfg)
  b = np.asarray(jit(lambda v: model.apply(v, changed, train=False))(
      variables))
  np.testing.assert_array_equal(a[:, :3], b[:, :3])
  assert not np.allclose(a[:, 3:], b[:, 3:])


@pytest.mark.parametrize('placement', sorted(models.PLACEMENTS))
def test_every_placement_trains_on_the_smoke_preset(placement):
  """PowerNorm at every site the placement has (masked, stateful), the
  smoke preset's model and optimizer, six steps on one batch."""
  from experiments import train_lib
  from experiments.configs import lm
  c = lm.get_config(f'ptb_powernorm,smoke,{placement}')
  cfg = models.TransformerConfig.from_config(c.model, VOCAB)
  model = models.LanguageModel(cfg)
  tokens = np.random.default_rng(4).integers(3, VOCAB, size=(8, 9))
  batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
               weights=np.ones((8, 8), np.float32))
  variables = nn.unbox(model.init(jax.random.key(0), batch['inputs'],
                                  train=False))
  schedule = train_lib.make_schedule(c.schedule)
  tx = train_lib.make_optimizer(c.optim, schedule)
  state = train_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=variables['params'],
      opt_state=tx.init(variables['params']),
      batch_stats=variables.get('batch_stats', {}),
      grad_stats=variables.get('grad_stats', {}), rng=jax.random.PRNGKey(0))

  def logits_fn(variables, batch, rngs, mutable):
    return model.apply(variables, batch['inputs'], train=True, rngs=rngs,
                       mutable=mutable)
  step = jit(train_lib.make_train_step(logits_fn, tx, schedule, 0.0))
  losses = []
  for _ in range(c.train.num_steps):
    state, metrics = step(state, batch)
    assert bool(metrics['finite'])
    losses.append(float(metrics['loss']))
  print(placement, losses[0], losses[-1])
  assert losses[-1] < losses[0] - 0.05, losses
