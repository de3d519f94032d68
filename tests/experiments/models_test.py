"""The translation Transformer: norms at every site, masks, decoding, training."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import normjax
from experiments import models

from run_helpers import BOS, INPUTS, PAD, TARGETS, VOCAB

NORM_OPTIONS = {
    'layernorm': dict(epsilon=1e-5),
    'rmsnorm': dict(epsilon=1e-5),
    'batchnorm': dict(momentum=0.9),
    'powernorm': dict(num_groups=2, warmup_steps=2),
    'pn_v': dict(num_groups=2),
    'unified': dict(window_size=2, warmup_steps=2),
    'none': {},
}
BATCH_STATISTIC_KINDS = ('batchnorm', 'powernorm', 'pn_v', 'unified')


def norm(kind):
  return dict(kind=kind, **NORM_OPTIONS[kind])


# XLA:CPU compile time dominates these tests: compile without LLVM
# optimisation or fusion emitters, and draw dropout bits with the
# cheap-to-compile 'rbg' PRNG.
jit = functools.partial(jax.jit, compiler_options={
    'xla_backend_optimization_level': 0,
    'xla_cpu_use_fusion_emitters': False})


def key(seed):
  return jax.random.key(seed, impl='rbg')


def config(kind='layernorm', sites=models.SITES, **kwargs):
  base = dict(vocab_size=VOCAB, d_model=16, num_heads=2, ffn_dim=32,
              num_encoder_layers=1, num_decoder_layers=1, max_len=16,
              norms={site: norm(kind) for site in sites})
  base.update(kwargs)
  return models.TransformerConfig(**base)


def init(model, inputs=INPUTS, targets=TARGETS):
  return jit(functools.partial(model.init, train=False))(
      jax.random.key(0), inputs, targets)


def train_apply(model):
  return jit(functools.partial(model.apply, train=True,
                               mutable=['batch_stats']))


def eval_apply(model):
  return jit(functools.partial(model.apply, train=False))


def leaves_with_paths(tree):
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


# --------------------------------------------------------------------------
# Every norm kind at every site.
# --------------------------------------------------------------------------

@pytest.mark.parametrize('kind,placement,dtype', [
    ('layernorm', 'pre', 'float32'), ('rmsnorm', 'post', 'float32'),
    ('batchnorm', 'pre', 'float32'), ('powernorm', 'post', 'bfloat16'),
    ('pn_v', 'pre', 'float32'), ('unified', 'post', 'float32'),
    ('none', 'pre', 'float32'),
])  # powernorm 'pre' and layernorm 'post' run in the decoding tests
def test_every_kind_at_every_site(kind, placement, dtype):
  model = models.Transformer(config(kind, placement=placement,
                                    dtype=jnp.dtype(dtype)))

  @jit
  def run(dropout_key):
    variables = model.init(jax.random.key(0), INPUTS, TARGETS, train=False)
    train_logits, state = model.apply(
        variables, INPUTS, TARGETS, train=True, mutable=['batch_stats'],
        rngs={'dropout': dropout_key})
    eval_logits = model.apply({**variables, **state}, INPUTS, TARGETS,
                              train=False)
    return variables, state, train_logits, eval_logits

  variables, state, train_logits, eval_logits = run(key(0))
  for logits in (train_logits, eval_logits):
    assert logits.shape == (4, 5, VOCAB) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
  assert not np.allclose(train_logits, eval_logits)  # dropout, batch stats
  assert all(x.dtype == jnp.float32 for x in  # activations may be bf16
             jax.tree_util.tree_leaves(nn.unbox(variables['params'])))

  def module(path):  # "['encoder']['final_norm']['scale']" -> its module
    return path[:path.index("_norm'") + 6] + ']'

  def norm_modules(tree):
    return {module(p) for p in leaves_with_paths(nn.unbox(tree))
            if "_norm'" in p}

  expected = {"['encoder']['layer_0']['attention_norm']",
              "['encoder']['layer_0']['ffn_norm']",
              "['decoder']['layer_0']['attention_norm']",
              "['decoder']['layer_0']['cross_attention_norm']",
              "['decoder']['layer_0']['ffn_norm']"}
  if placement == 'pre':
    expected |= {"['encoder']['final_norm']", "['decoder']['final_norm']"}
  if kind == 'none':
    expected = set()
  assert norm_modules(variables['params']) == expected

  if kind in BATCH_STATISTIC_KINDS:
    # Every norm keeps running statistics, and a train step moves them.
    assert norm_modules(variables['batch_stats']) == expected
    before = leaves_with_paths(nn.unbox(variables['batch_stats']))
    after = leaves_with_paths(nn.unbox(state['batch_stats']))
    moved = {module(p) for p in before if np.any(before[p] != after[p])}
    assert moved == expected
  else:
    assert 'batch_stats' not in variables


# --------------------------------------------------------------------------
# Parameters: partitioning, sharing, initialisation.
# --------------------------------------------------------------------------

def test_partition_specs():
  model = models.Transformer(config('powernorm', sites=('encoder_attention',)))
  variables = jax.eval_shape(
      functools.partial(model.init, train=False), jax.random.key(0),
      INPUTS, TARGETS)
  specs = leaves_with_paths(nn.get_partition_spec(variables))
  unboxed = nn.unbox(variables)
  assert set(leaves_with_paths(unboxed)) == set(specs)
  expected = {
      "['params']['shared_embedding']['embedding']": ('vocab', 'embed'),
      "['params']['encoder']['layer_0']['fc1']['kernel']": ('embed', 'mlp'),
      "['params']['encoder']['layer_0']['fc1']['bias']": ('mlp',),
      "['params']['encoder']['layer_0']['fc2']['kernel']": ('mlp', 'embed'),
      "['params']['decoder']['layer_0']['self_attention']['query']['kernel']":
          ('embed', 'heads', 'kv'),
      "['params']['decoder']['layer_0']['cross_attention']['value']['kernel']":
          ('embed', 'heads', 'kv'),
      "['params']['encoder']['layer_0']['self_attention']['out']['kernel']":
          ('heads', 'kv', 'embed'),
      "['params']['decoder']['final_norm']['scale']": ('embed',),
      "['batch_stats']['encoder']['layer_0']['attention_norm']['running_phi']":
          ('embed',),
      "['grad_stats']['encoder']['layer_0']['attention_norm']['ema_gz']":
          ('embed',),
  }
  for path, axes in expected.items():
    assert tuple(specs[path]) == axes, path
  shapes = leaves_with_paths(unboxed)
  for path, spec in specs.items():  # every param is annotated, full rank
    if path.startswith("['params']"):
      assert spec is not None and len(tuple(spec)) == shapes[path].ndim, path

  # The specs map onto a mesh with the experiments' rules.
  mesh = jax.make_mesh((4, 2), ('data', 'tensor'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (('batch', 'data'), ('vocab', 'tensor'), ('embed', None),
           ('mlp', 'tensor'), ('heads', 'tensor'), ('kv', None),
           ('length', None))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(variables),
                                          mesh, rules)
  assert len(jax.tree_util.tree_leaves(shardings)) == len(specs)


def test_sharded_forward_with_activation_constraints():
  """Runs under a mesh with logical rules (activation constraints active)."""
  model = models.Transformer(config(vocab_size=16))
  variables = init(model)
  mesh = jax.make_mesh((4, 2), ('data', 'tensor'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (('batch', 'data'), ('vocab', 'tensor'), ('embed', None),
           ('mlp', 'tensor'), ('heads', 'tensor'), ('kv', None),
           ('length', None))
  expected = eval_apply(model)(variables, INPUTS, TARGETS)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = nn.logical_to_mesh_sharding(
        nn.get_partition_spec(variables), mesh, rules)
    placed = jax.device_put(variables, shardings)
    logits = eval_apply(model)(placed, INPUTS, TARGETS)
  np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_share_embeddings():
  def shapes(model):
    variables = jax.eval_shape(functools.partial(model.init, train=False),
                               jax.random.key(0), INPUTS, TARGETS)
    logits = jax.eval_shape(functools.partial(model.apply, train=False),
                            variables, INPUTS, TARGETS)
    return nn.unbox(variables)['params'], logits

  shared, logits = shapes(models.Transformer(config()))
  assert shared['shared_embedding']['embedding'].shape == (VOCAB, 16)
  assert not {'source_embedding', 'target_embedding',
              'output_projection'} & set(shared)
  assert logits.shape == (4, 5, VOCAB)

  separate, logits = shapes(models.Transformer(config(share_embeddings=False)))
  assert 'shared_embedding' not in separate
  assert separate['source_embedding']['embedding'].shape == (VOCAB, 16)
  assert separate['target_embedding']['embedding'].shape == (VOCAB, 16)
  assert separate['output_projection']['kernel'].shape == (16, VOCAB)
  assert 'bias' not in separate['output_projection']
  assert logits.shape == (4, 5, VOCAB)


def test_initialisation():
  model = models.Transformer(config(d_model=64, ffn_dim=128, num_heads=4,
                                    vocab_size=1000))
  params = nn.unbox(init(model)['params'])
  table = np.asarray(params['shared_embedding']['embedding'])
  assert (table[PAD] == 0).all()
  np.testing.assert_allclose(table[1:].std(), 64 ** -0.5, rtol=0.05)
  layer = params['encoder']['layer_0']
  # xavier_uniform: bound sqrt(6 / (fan_in + fan_out)); fairseq's q/k/v
  # (a fused (3d, d) in_proj) have bound sqrt(6 / 4d).
  bounds = {
      ('fc1', 'kernel'): np.sqrt(6 / (64 + 128)),
      ('self_attention', 'query', 'kernel'): np.sqrt(6 / (4 * 64)),
      ('self_attention', 'out', 'kernel'): np.sqrt(6 / (2 * 64)),
  }
  for path, bound in bounds.items():
    w = np.asarray(functools.reduce(lambda t, k: t[k], path, layer))
    assert np.abs(w).max() <= bound
    assert np.abs(w).max() > 0.9 * bound
  for leaf_path, leaf in leaves_with_paths(params).items():
    if leaf_path.endswith("['bias']") and '_norm' not in leaf_path:
      assert (np.asarray(leaf) == 0).all(), leaf_path


# --------------------------------------------------------------------------
# Masks.
# --------------------------------------------------------------------------

def with_pad_row(variables, rng):
  """Variables whose PAD embedding rows hold random values."""
  params = nn.unbox(variables['params'])
  for name in ('shared_embedding', 'source_embedding', 'target_embedding'):
    if name in params:
      table = params[name]['embedding']
      params[name]['embedding'] = table.at[PAD].set(
          jnp.asarray(rng.normal(size=table.shape[1:]), table.dtype))
  return {**variables, 'params': params}


def pad_columns(x, n=3):
  return np.concatenate([x, np.full((x.shape[0], n), PAD, x.dtype)], axis=1)


def test_padding_invariance_layernorm():
  """Values at pad positions and extra pad columns do not reach real tokens."""
  model = models.Transformer(config())
  variables = init(model)
  apply = eval_apply(model)
  real = TARGETS != PAD
  # The shared PAD row is also the PAD logit's weights: compare the others.
  columns = slice(1, None)
  logits = np.asarray(apply(variables, INPUTS, TARGETS))

  noisy = np.asarray(apply(with_pad_row(variables, np.random.default_rng(0)),
                           INPUTS, TARGETS))
  np.testing.assert_allclose(noisy[real][:, columns],
                             logits[real][:, columns], atol=1e-5)
  assert not np.allclose(noisy[~real], logits[~real], atol=1e-3)

  longer = np.asarray(apply(variables, pad_columns(INPUTS),
                            pad_columns(TARGETS)))
  np.testing.assert_allclose(longer[:, :5][real], logits[real], atol=1e-5)


def test_batch_statistic_norms_see_only_real_tokens():
  """Encoder and decoder norms get the token masks of their streams: their
  running statistics ignore extra pad columns and the values at pads."""
  model = models.Transformer(config('powernorm', dropout=0.0,
                                    attention_dropout=0.0,
                                    activation_dropout=0.0))
  variables = init(model)
  run = train_apply(model)
  logits, state = run(variables, INPUTS, TARGETS)
  reference = leaves_with_paths(nn.unbox(state['batch_stats']))
  initial = leaves_with_paths(nn.unbox(variables['batch_stats']))
  assert any(not np.allclose(reference[p], initial[p]) for p in reference)
  assert any('encoder' in p for p in reference)
  assert any('decoder' in p for p in reference)

  for name, (vs, inputs, targets) in {
      'pad columns': (variables, pad_columns(INPUTS), pad_columns(TARGETS)),
      'pad values': (with_pad_row(variables, np.random.default_rng(1)),
                     INPUTS, TARGETS)}.items():
    other_logits, other = run(vs, inputs, targets)
    other = leaves_with_paths(nn.unbox(other['batch_stats']))
    for path, value in reference.items():
      np.testing.assert_allclose(other[path], value, rtol=1e-5, atol=1e-6,
                                 err_msg=f'{name}: {path}')
    real = TARGETS != PAD
    np.testing.assert_allclose(
        np.asarray(other_logits)[:, :5][real][:, 1:],
        np.asarray(logits)[real][:, 1:], atol=1e-4, err_msg=name)


# --------------------------------------------------------------------------
# Incremental decoding.
# --------------------------------------------------------------------------

@pytest.mark.parametrize('kind,placement,share,qk_norm', [
    ('layernorm', 'pre', True, ''), ('powernorm', 'pre', True, ''),
    ('layernorm', 'post', False, ''), ('rmsnorm', 'pre', True, 'rmsnorm'),
])
def test_incremental_decoding_matches_full_decoder(kind, placement, share,
                                                   qk_norm):
  model = models.Transformer(config(kind, placement=placement,
                                    share_embeddings=share,
                                    num_decoder_layers=2, qk_norm=qk_norm))
  variables = init(model)
  if 'batch_stats' in variables:  # running statistics away from init
    rng = np.random.default_rng(0)
    variables = {**variables, 'batch_stats': jax.tree.map(
        lambda x: jnp.asarray(rng.uniform(0.5, 2.0, x.shape), x.dtype)
        if x.ndim else x, nn.unbox(variables['batch_stats']))}
  full = np.asarray(eval_apply(model)(variables, INPUTS, TARGETS))

  decoder = model.clone(config=dataclasses.replace(model.config, decode=True))
  encoded = jit(functools.partial(model.apply, train=False,
                                  method=models.Transformer.encode))(
                                      variables, INPUTS)
  cache = models.init_cache(model, variables, encoded, INPUTS, max_len=8)
  decoder_inputs = np.asarray(models.shift_right(TARGETS))

  @jit
  def step(cache, tokens):
    logits, state = decoder.apply(
        {**variables, 'cache': cache}, encoded, INPUTS, tokens, train=False,
        method=models.Transformer.decode, mutable=['cache'])
    return logits, state['cache']

  for t in range(TARGETS.shape[1]):
    logits, cache = step(cache, decoder_inputs[:, t:t + 1])
    assert logits.shape == (4, 1, VOCAB)
    real = TARGETS[:, t] != PAD
    np.testing.assert_allclose(np.asarray(logits)[real, 0], full[real, t],
                               atol=1e-5, rtol=1e-5)


def test_shift_right():
  shifted = np.asarray(models.shift_right(TARGETS))
  np.testing.assert_array_equal(shifted[:, 0], BOS)
  np.testing.assert_array_equal(shifted[:, 1:][TARGETS[:, 1:] != PAD],
                                TARGETS[:, :-1][TARGETS[:, 1:] != PAD])
  np.testing.assert_array_equal(shifted != PAD, TARGETS != PAD)


# --------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------

def test_train_step_with_backward_statistics():
  model = models.Transformer(config('powernorm'))
  variables = init(model)
  params, batch_stats = variables['params'], variables['batch_stats']
  grad_stats = variables['grad_stats']
  assert jax.tree_util.tree_leaves(grad_stats)
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)

  @jit
  def train_step(params, batch_stats, grad_stats, opt_state, dropout_key):
    def loss_fn(params, grad_stats):
      logits, new = model.apply(
          {'params': params, 'batch_stats': batch_stats,
           'grad_stats': grad_stats}, INPUTS, TARGETS, train=True,
          mutable=['batch_stats'], rngs={'dropout': dropout_key})
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, TARGETS)
      mask = TARGETS != PAD
      return jnp.sum(loss * mask) / jnp.sum(mask), new['batch_stats']

    (loss, batch_stats), (grads, updates) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(params, grad_stats)
    step, opt_state = tx.update(grads, opt_state, params)
    grad_stats = normjax.apply_backward_stats(grad_stats, updates)
    return (optax.apply_updates(params, step), batch_stats, grad_stats,
            opt_state, loss, updates)

  losses = []
  for i in range(3):
    params, batch_stats, grad_stats, opt_state, loss, updates = train_step(
        params, batch_stats, grad_stats, opt_state, key(i))
    losses.append(float(loss))
  assert np.isfinite(losses).all()
  update_leaves = [np.asarray(x) for x in
                   jax.tree_util.tree_leaves(nn.unbox(updates))]
  assert update_leaves and all(np.isfinite(x).all() for x in update_leaves)
  assert any(np.abs(x).max() > 0 for x in update_leaves)
  # The encoder and decoder norms all keep a backward statistic.
  paths = leaves_with_paths(nn.unbox(grad_stats))
  assert any('encoder' in p for p in paths)
  assert any('decoder' in p for p in paths)


# --------------------------------------------------------------------------
# Config and placements.
# --------------------------------------------------------------------------

def test_config():
  c = config('layernorm', sites=('encoder_attention',))
  # The rest default to LayerNorm, the placements' own sites included.
  assert set(c.norms) == set(models.ALL_SITES)
  assert dict(c.norms['decoder_final']) == dict(kind='layernorm',
                                                epsilon=1e-5)
  assert hash(c) == hash(config('layernorm', sites=('encoder_attention',)))
  assert c == dataclasses.replace(c)
  with pytest.raises(ValueError, match='unknown sites'):
    config(sites=('encoder_attn',))
  with pytest.raises(ValueError, match='unknown norm kind'):
    models.TransformerConfig(VOCAB, norms={'encoder_ffn': {'kind': 'ln'}})
  with pytest.raises(ValueError, match='unknown options'):
    models.TransformerConfig(VOCAB, norms={
        'encoder_ffn': {'kind': 'powernorm', 'groups': 2}})
  with pytest.raises(ValueError, match='placement'):
    models.TransformerConfig(VOCAB, placement='sandwich')
  with pytest.raises(ValueError, match='max_len'):
    model = models.Transformer(config(max_len=4))
    init(model)


def test_a_new_placement_is_one_function(monkeypatch):
  """Peri-LN (norm before the sublayer and on its output), registered here."""

  def peri_norm(x, sublayer, norm, *, mask, train, layer_index, num_layers,
                config):
    del layer_index, num_layers, config
    h = sublayer(norm()(x, not train, mask=mask))
    return x + norm('_out')(h, not train, mask=mask)

  monkeypatch.setitem(models.PLACEMENTS, 'my_peri',
                      models.Placement(peri_norm, final_norm=True))
  model = models.Transformer(config('rmsnorm', placement='my_peri'))
  variables = init(model)
  layer = variables['params']['decoder']['layer_0']
  for name in ('attention_norm', 'attention_norm_out', 'cross_attention_norm',
               'cross_attention_norm_out', 'ffn_norm', 'ffn_norm_out'):
    assert name in layer, name
  logits = eval_apply(model)(variables, INPUTS, TARGETS)
  assert np.isfinite(np.asarray(logits)).all()


def test_qk_norm_makes_attention_invariant_to_the_query_key_scale():
  model = models.Transformer(config('layernorm', qk_norm='rmsnorm'))
  variables = nn.unbox(init(model))
  for stack in ('encoder', 'decoder'):
    layer = variables['params'][stack]['layer_0']
    assert set(layer['self_attention']['qk_norm']) == {'query_scale',
                                                       'key_scale'}
  scaled = jax.tree.map(lambda x: x, variables)
  attention = scaled['params']['encoder']['layer_0']['self_attention']
  for name, factor in (('query', 7.0), ('key', 0.1)):
    attention[name] = jax.tree.map(lambda p, f=factor: p * f,
                                   attention[name])
  a = np.asarray(eval_apply(model)(variables, INPUTS, TARGETS))
  b = np.asarray(eval_apply(model)(scaled, INPUTS, TARGETS))
  np.testing.assert_allclose(a, b, atol=1e-4)
  # Without QK-norm the same rescaling changes the attention.
  plain = models.Transformer(config('layernorm'))
  plain_variables = nn.unbox(init(plain))
  plain_scaled = jax.tree.map(lambda x: x, plain_variables)
  attention = plain_scaled['params']['encoder']['layer_0']['self_attention']
  attention['query'] = jax.tree.map(lambda p: p * 7.0, attention['query'])
  c = np.asarray(eval_apply(plain)(plain_variables, INPUTS, TARGETS))
  d = np.asarray(eval_apply(plain)(plain_scaled, INPUTS, TARGETS))
  assert np.abs(c - d).max() > 1e-3
  with pytest.raises(ValueError, match='qk_norm'):
    config(qk_norm='l2')
