"""experiments.fold: folded / converted / frozen models against the originals.

Every model is tiny and float32 (float64 where noted); the running statistics
are moved away from their init by a few train-mode forward passes and every
parameter is perturbed (norm scales and biases, Dense biases), so no fold is
trivially exact. The largest deviations are recorded (conftest summary).
"""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import conftest
from experiments import checkpointing
from experiments import cli as cli_lib
from experiments import fold
from experiments import models
from experiments import train_lib
from experiments.configs import wmt
from normjax import functional as nf

from run_helpers import INPUTS, TARGETS, VOCAB

# As models_test: compile time dominates, so compile without LLVM
# optimisation or fusion emitters (cheaper than eager op-by-op dispatch,
# which compiles every distinct op). Parameters are drawn directly in the
# shapes of `jax.eval_shape(model.init)`: no init program to compile.
jit = functools.partial(jax.jit, compiler_options={
    'xla_backend_optimization_level': 0,
    'xla_cpu_use_fusion_emitters': False})

LN = {s: dict(kind='layernorm', epsilon=1e-5) for s in models.SITES}
# Every offline kind, in both stacks; GroupScaling with 2 groups.
OFFLINE = dict(
    encoder_attention=dict(kind='batchnorm', momentum=0.5),
    encoder_ffn=dict(kind='pn_v', num_groups=2, momentum=0.5),
    encoder_final=dict(kind='powernorm', num_groups=2, warmup_steps=1),
    decoder_attention=dict(kind='unified', window_size=2, warmup_steps=1),
    decoder_ffn=dict(kind='powernorm', num_groups=2, warmup_steps=1),
    decoder_final=dict(kind='batchnorm', momentum=0.5))
OFFLINE_LM = dict(
    decoder_attention=dict(kind='powernorm', num_groups=2, warmup_steps=1),
    decoder_ffn=dict(kind='unified', window_size=2, warmup_steps=1),
    decoder_final=dict(kind='pn_v', num_groups=2, momentum=0.5))


def config(norms, **kwargs):
  base = dict(vocab_size=VOCAB, d_model=16, num_heads=2, ffn_dim=32,
              num_encoder_layers=1, num_decoder_layers=1, max_len=16,
              norms=norms, deterministic=True)
  base.update(kwargs)
  return models.TransformerConfig(**base)


def model_args(transformer):
  return (INPUTS, TARGETS) if transformer else (INPUTS,)


def random_params(model, args, seed=1):
  """Random parameters in the model's shapes (no init program to compile):
  kernels N(0, 1/fan_in), norm scales 1 + 0.2 N, every bias 0.1 N."""
  shapes = nn.unbox(jax.eval_shape(functools.partial(model.init, train=False),
                                   jax.random.key(0), *args))['params']
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    z = rng.standard_normal(leaf.shape)
    if name.endswith("['scale']"):
      z = 1 + 0.2 * z
    elif name.endswith("['bias']"):
      z = 0.1 * z
    elif name.endswith("['embedding']"):
      z = z / np.sqrt(leaf.shape[-1])
    else:  # kernels [in..., out]; out-projections [heads, kv, out]
      fan_in = leaf.shape[0] * (leaf.shape[1] if 'out' in name else 1)
      z = z / np.sqrt(fan_in)
    return z.astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def trained(cfg, transformer, steps=3):
  """Random variables; with batch-statistic norms, their statistics after
  `steps` train-mode forward passes (which also create them)."""
  model = fold.model_for(cfg, transformer)
  args = model_args(transformer)
  variables = {'params': random_params(model, args)}
  stateful = any(cfg.norms[s]['kind'] in fold.OFFLINE_KINDS
                 for s in fold.used_sites(cfg, transformer))
  train = jit(functools.partial(model.apply, train=True,
                                mutable=['batch_stats', 'grad_stats']))
  for i in range(steps if stateful else 0):
    batch = [a[::-1] if i % 2 else a for a in args]
    _, updates = train(variables, *batch)
    variables = dict(variables, **nn.unbox(updates))
  return variables


def logits(cfg, variables, transformer, args=None):
  model = fold.model_for(cfg, transformer)
  return np.asarray(jit(functools.partial(model.apply, train=False))(
      variables, *(args or model_args(transformer))))


def kinds(cfg, transformer):
  return {s: cfg.norms[s]['kind']
          for s in fold.used_sites(cfg, transformer)}


def check_exact(name, cfg, variables, new_cfg, new_variables, transformer,
                atol=1e-5, reference=None):
  fold.check_variables(new_cfg, new_variables)
  ref = logits(cfg, variables, transformer) if reference is None else reference
  out = logits(new_cfg, new_variables, transformer)
  deviation = float(np.abs(out - ref).max())
  conftest.record_deviation(f'fold {name}', deviation)
  assert deviation < atol, (name, deviation)
  return ref


# ---------------------------------------------------------------------------
# fold_affine.


@pytest.mark.parametrize('transformer', [True, False],
                         ids=['transformer', 'lm_adaptive'])
def test_fold_affine_matches(transformer):
  if transformer:  # tied embeddings: the output layer is untied; two
    cfg = config(OFFLINE, num_decoder_layers=2)  # cross-attentions read the
    # encoder's final norm
  else:  # tied adaptive softmax: its kernel and cluster layer get the fold
    cfg = config(OFFLINE_LM, adaptive_softmax_cutoffs=(5,))
  variables = trained(cfg, transformer)
  before = kinds(cfg, transformer)
  new_cfg, new_variables = fold.fold_affine(cfg, variables)
  name = 'fold_affine ' + ('transformer' if transformer else 'lm')
  check_exact(name + ' (f32)', cfg, variables, new_cfg, new_variables,
              transformer)
  after = kinds(new_cfg, transformer)
  for site, kind in before.items():
    # GroupScaling does not fold: PowerNorm / PN-V keep it, same groups/eps.
    want = 'group_scaling' if kind in ('powernorm', 'pn_v') else 'none'
    assert after[site] == want, (site, after)
    if want == 'group_scaling':
      assert new_cfg.norms[site]['num_groups'] == 2
      assert new_cfg.norms[site]['epsilon'] == 1e-5
  assert new_cfg.untie_output
  assert 'batch_stats' not in new_variables
  assert 'grad_stats' not in new_variables


def test_fold_affine_untied_output_and_layernorm_kinds():
  """share_embeddings=False: the output layer gains a bias; LN's own affine
  folds on request (kinds=...) and the site keeps LayerNorm, no affine."""
  cfg = config(dict(LN, decoder_final=OFFLINE['decoder_final']),
               share_embeddings=False)
  variables = trained(cfg, False, steps=2)
  new_cfg, new_variables = fold.fold_affine(
      cfg, variables, kinds=('batchnorm', 'layernorm'))
  check_exact('fold_affine lm untied + LN (f32)', cfg, variables,
              new_cfg, new_variables, False)
  assert new_cfg.norms['decoder_final']['kind'] == 'none'
  assert new_cfg.norms['decoder_ffn']['kind'] == 'layernorm'
  assert not new_cfg.norms['decoder_ffn']['use_scale']
  assert 'bias' in new_variables['params']['output_projection']


# ---------------------------------------------------------------------------
# Pre-RMSNorm / Pre-CRMSNorm.


def stream_statistics(cfg, variables, transformer):
  """(logits, max over norm inputs of |mean(x)| / rms(x)): the residual
  stream at every norm site, every token (pads included)."""
  model = fold.model_for(cfg, transformer)

  @jit
  def run(variables):
    found = []

    def interceptor(next_fun, args, kwargs, context):
      if (isinstance(context.module, nn.Module) and context.method_name ==
          '__call__' and type(context.module).__name__ == 'RMSNorm'):
        x = args[0]
        rms = jnp.sqrt(jnp.mean(jnp.square(x), axis=-1))
        found.append(jnp.max(jnp.abs(jnp.mean(x, axis=-1)) / rms))
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      out = model.apply(variables, *model_args(transformer), train=False)
    return out, jnp.stack(found)

  out, means = run(variables)
  return np.asarray(out), np.asarray(means)


@pytest.mark.parametrize('transformer', [True, False],
                         ids=['transformer', 'lm'])
def test_pre_rmsnorm_and_crmsnorm_match(transformer):
  cfg = config(LN)
  variables = trained(cfg, transformer)
  ref = logits(cfg, variables, transformer)
  name = 'transformer' if transformer else 'lm'

  rms_cfg, rms_variables = fold.to_pre_rmsnorm(cfg, variables)
  fold.check_variables(rms_cfg, rms_variables)
  out, means = stream_statistics(rms_cfg, rms_variables, transformer)
  deviation = float(np.abs(out - ref).max())
  conftest.record_deviation(f'fold rmsnorm {name} (f32)', deviation)
  assert deviation < 1e-5
  # Every norm input (the residual stream at every layer) is zero-mean.
  sites = len(fold.norm_modules(cfg, transformer))
  assert means.shape == (sites,)
  conftest.record_deviation(f'fold rmsnorm {name}: max |mean|/rms', means.max())
  assert means.max() < 1e-5
  assert set(kinds(rms_cfg, transformer).values()) == {'rmsnorm'}
  assert rms_cfg.center_positions and rms_cfg.untie_output

  crms_cfg, crms_variables = fold.to_pre_crmsnorm(cfg, variables)
  check_exact(f'crmsnorm {name} (f32)', cfg, variables, crms_cfg,
              crms_variables, transformer, reference=ref)
  assert set(kinds(crms_cfg, transformer).values()) == {'crmsnorm'}
  assert crms_cfg.compressed_stream
  table = 'shared_embedding' if transformer else 'embedding'
  assert crms_variables['params'][table]['embedding'].shape == (VOCAB, 15)


def test_crmsnorm_is_rmsnorm_of_the_full_vector():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 5, 16)) * 2 + 0.5
  x = (x - x.mean(-1, keepdims=True)).astype(np.float32)
  full, _ = nf.rms_norm(x, eps=1e-5)
  compressed, _ = nf.crms_norm(x[..., :-1], eps=1e-5)
  deviation = float(np.abs(np.asarray(compressed)
                           - np.asarray(full)[..., :-1]).max())
  conftest.record_deviation('fold CRMSNorm(x[:d-1]) vs RMSNorm(x)[:d-1]',
                            deviation)
  assert deviation < 1e-6


# ---------------------------------------------------------------------------
# LayerNorm freezing.


@pytest.mark.parametrize('transformer', [True, False],
                         ids=['transformer_untied', 'lm'])
def test_freeze_layernorm_equals_fixed_scale_model(transformer):
  cfg = config(LN, share_embeddings=not transformer)
  variables = trained(cfg, transformer)
  args = model_args(transformer)
  batches = [args, tuple(a[::-1] for a in args)]
  scales = fold.calibrate_layernorm(cfg, variables, batches)
  assert len(scales) == len(fold.norm_modules(cfg, transformer))
  assert all(s > 0 for s in scales.values())
  new_cfg, new_variables = fold.freeze_layernorm(cfg, variables, batches,
                                                 scales=scales)
  assert set(kinds(new_cfg, transformer).values()) == {'none'}

  # Exact: equal to the model whose LayerNorms divide by the fixed s.
  model = fold.model_for(cfg, transformer)

  @jit
  def fixed_scale(variables):
    with nn.intercept_methods(fold.frozen_layernorm_interceptor(scales)):
      return model.apply(variables, *args, train=False)

  reference = np.asarray(fixed_scale(variables))
  name = 'transformer' if transformer else 'lm'
  check_exact(f'freeze_ln {name} vs fixed-scale LN (f32)', cfg, variables,
              new_cfg, new_variables, transformer, reference=reference)
  if not transformer:  # an approximation: by how much the logits move
    original = logits(cfg, variables, transformer)
    conftest.record_deviation(f'fold freeze_ln {name} vs original (approx.)',
                              np.abs(reference - original).max())
    assert not np.allclose(reference, original, atol=1e-3)


# ---------------------------------------------------------------------------
# float64: the transforms are exact up to float64 rounding.


@pytest.fixture
def full_float64_softmax(monkeypatch):
  """The models ask for an f32 softmax (for bf16), which for f64 logits
  rounds to f32; in float64 tests compute it in float64."""
  original = nn.dot_product_attention

  def attention(*args, **kwargs):
    return original(*args, **dict(kwargs, force_fp32_for_softmax=False))
  monkeypatch.setattr(nn, 'dot_product_attention', attention)


def float64_logits(cfg, variables, scales=None):
  """The LM's logits before the model's final cast to float32 (the output
  layer's result), optionally with the LayerNorms of `scales` frozen."""
  model = fold.model_for(cfg, False)

  @jit
  def run(variables):
    found = []

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      path = context.module.path
      if (context.method_name == 'attend' or path in (
          ('output_projection',), ('adaptive_softmax',))):
        found.append(out)
      return out

    with nn.intercept_methods(interceptor):
      if scales is None:
        model.apply(variables, INPUTS, train=False)
      else:
        with nn.intercept_methods(fold.frozen_layernorm_interceptor(scales)):
          model.apply(variables, INPUTS, train=False)
    (out,) = found
    return out

  out = run(variables)
  assert out.dtype == jnp.float64
  return np.asarray(out)


def test_float64_lm_all_transforms(full_float64_softmax):
  """Eager float64 (tiny LM): every transform within 1e-10."""
  del full_float64_softmax
  cases = [('fold_affine', OFFLINE_LM, fold.fold_affine),
           ('rmsnorm', LN, fold.to_pre_rmsnorm),
           ('crmsnorm', LN, fold.to_pre_crmsnorm),
           ('freeze_ln', LN, None)]
  with jax.enable_x64(True):
    prepared = {}
    for name, norms, transform in cases:
      if id(norms) not in prepared:
        cfg32 = config(norms)
        variables = jax.tree.map(
            lambda x: np.asarray(x, np.float64)
            if np.issubdtype(np.asarray(x).dtype, np.floating) else x,
            trained(cfg32, False, steps=2))
        cfg = dataclasses.replace(cfg32, dtype=jnp.float64)
        prepared[id(norms)] = cfg, variables, float64_logits(cfg, variables)
      cfg, variables, ref = prepared[id(norms)]
      scales = None
      if transform is None:
        scales = fold.calibrate_layernorm(cfg, variables, [(INPUTS,)])
        new_cfg, new_variables = fold.freeze_layernorm(cfg, variables, (),
                                                       scales=scales)
        ref = float64_logits(cfg, variables, scales)
      else:
        new_cfg, new_variables = transform(cfg, variables)
      assert jax.tree.leaves(new_variables['params'])[0].dtype == np.float64
      fold.check_variables(new_cfg, new_variables)
      deviation = float(np.abs(float64_logits(new_cfg, new_variables)
                               - ref).max())
      conftest.record_deviation(f'fold {name} lm (f64)', deviation)
      assert deviation < 1e-10, (name, deviation)


# ---------------------------------------------------------------------------
# What does not fold.


@pytest.mark.parametrize('placement', ['post', 'peri', 'mix'])
def test_non_pre_norm_is_rejected(placement):
  cfg = config(LN, placement=placement)
  variables = jax.eval_shape(functools.partial(
      models.Transformer(cfg).init, train=False), jax.random.key(0), INPUTS,
                             TARGETS)
  for transform in (fold.to_pre_rmsnorm, fold.to_pre_crmsnorm,
                    fold.fold_affine):
    with pytest.raises(ValueError, match=f"placement='{placement}' cannot be "
                       'folded') as info:
      transform(cfg, nn.unbox(variables))
  if placement == 'post':
    assert 'residual stream' in str(info.value)
  with pytest.raises(ValueError, match='cannot be folded'):
    fold.freeze_layernorm(cfg, nn.unbox(variables), [])


def test_transform_that_does_not_apply():
  variables = {'params': {'embedding': {'embedding': np.zeros((VOCAB, 16))}}}
  with pytest.raises(ValueError, match='fold_affine applies to'):
    fold.fold_affine(config(LN), variables)
  with pytest.raises(ValueError, match='needs LayerNorm at every site'):
    fold.to_pre_rmsnorm(config(OFFLINE_LM), variables)
  with pytest.raises(ValueError, match='freeze_layernorm applies to'):
    fold.freeze_layernorm(config(OFFLINE_LM), variables, [])


def test_default_configs_unchanged():
  """The new config fields default off: same tree as before them."""
  cfg = config(LN)
  assert not (cfg.untie_output or cfg.center_positions
              or cfg.compressed_stream)
  assert cfg.stream_width == 16
  np.testing.assert_array_equal(models.position_table(cfg),
                                models.sinusoidal_table(16, 16))
  with pytest.raises(ValueError, match='needs center_positions'):
    config(LN, compressed_stream=True)


# ---------------------------------------------------------------------------
# The CLI on a checkpoint of the `powernorm,smoke` translation preset.


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  """A run directory holding a TrainState checkpoint (step 2) of the
  wmt `powernorm,smoke` model (PowerNorm encoder, LayerNorm decoder) with
  the run's vocabulary, its statistics moved by 2 train-mode forwards."""
  from experiments.data import load_translation
  workdir = str(tmp_path_factory.mktemp('smoke_run'))
  run_config = wmt.get_config('powernorm,smoke')
  vocab = load_translation(run_config.data,
                           cache_dir=os.path.join(workdir, 'vocab')).vocab
  cfg = models.TransformerConfig.from_config(run_config.model, vocab.size,
                                             deterministic=True)
  variables = trained(cfg, True, steps=2)
  tx = optax.adam(1e-3)
  state = train_lib.TrainState(
      step=jnp.asarray(2, jnp.int32), params=variables['params'],
      opt_state=tx.init(variables['params']),
      batch_stats=variables['batch_stats'],
      grad_stats=variables['grad_stats'], rng=jax.random.PRNGKey(0))
  mngr = checkpointing.manager(os.path.join(workdir, 'checkpoints'), 2,
                               async_save=False)
  checkpointing.save(mngr, 2, state, {'vocab_fingerprint': 'test'})
  mngr.wait_until_finished()
  mngr.close()
  return workdir, cfg, variables


def test_cli_fold_affine_writes_an_equivalent_checkpoint(smoke_run, tmp_path):
  workdir, cfg, variables = smoke_run
  out = str(tmp_path / 'folded')
  summary = fold.run(workdir, 'wmt:powernorm,smoke', 'fold_affine', out)
  assert summary['step'] == 2
  # powernorm,smoke: PowerNorm in the encoder, LayerNorm in the decoder.
  assert summary['norms'] == {
      'encoder_attention': 'group_scaling', 'encoder_ffn': 'group_scaling',
      'encoder_final': 'group_scaling', 'decoder_attention': 'layernorm',
      'decoder_ffn': 'layernorm', 'decoder_final': 'layernorm'}
  with open(os.path.join(out, fold.CONFIG_FILE)) as f:
    assert json.load(f)['norms']['encoder_ffn']['kind'] == 'group_scaling'
  new_cfg, new_variables, meta = fold.load(out)
  assert meta['transform'] == 'fold_affine' and meta['source_step'] == 2
  assert meta['vocab_fingerprint'] == 'test'
  check_exact('fold_affine CLI checkpoint (powernorm,smoke)', cfg, variables,
              new_cfg, new_variables, True)


def test_cli_freeze_ln_calibrates_on_the_valid_split(smoke_run, tmp_path):
  workdir, _, _ = smoke_run
  out = str(tmp_path / 'frozen')
  summary = fold.run(workdir, 'wmt:powernorm,smoke', 'freeze_ln', out,
                     calibration_batches=2)
  assert summary['norms'] == {
      'encoder_attention': 'powernorm', 'encoder_ffn': 'powernorm',
      'encoder_final': 'powernorm', 'decoder_attention': 'none',
      'decoder_ffn': 'none', 'decoder_final': 'none'}
  new_cfg, new_variables, meta = fold.load(out)
  assert meta['transform'] == 'freeze_ln'
  fold.check_variables(new_cfg, new_variables)


def cli(capsys, monkeypatch, *argv):
  # config_flags reads its dotted overrides from sys.argv.
  monkeypatch.setattr(sys, 'argv', ['fold', *argv])
  with pytest.raises(SystemExit) as info:
    cli_lib.run(fold.main, argv=['fold', *argv])
  err = capsys.readouterr().err.strip()
  assert info.value.code == 2
  assert len(err.splitlines()) == 1, err
  return err


# ml_collections' config_flags loads the config file with the deprecated
# load_module().
@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')
def test_cli_errors(smoke_run, tmp_path, capsys, monkeypatch):
  workdir, _, _ = smoke_run
  out = str(tmp_path / 'out')
  err = cli(capsys, monkeypatch, f'--workdir={tmp_path}/missing',
            '--config=wmt:powernorm',
            '--transform=fold_affine', f'--out={out}')
  assert 'no checkpoints/ directory' in err
  err = cli(capsys, monkeypatch, f'--workdir={workdir}',
            '--config=wmt:powernorm,smoke',
            '--transform=fold_affine', f'--out={out}',
            '--config.model.placement=post')
  assert "placement='post' cannot be folded" in err
  assert 'residual stream' in err
  err = cli(capsys, monkeypatch, f'--workdir={workdir}',
            '--config=wmt:powernorm,smoke',
            '--transform=rmsnorm', f'--out={out}')
  assert 'needs LayerNorm at every site' in err
  err = cli(capsys, monkeypatch, f'--workdir={workdir}', '--config=nosuch:x',
            '--transform=rmsnorm', f'--out={out}')
  assert 'no experiment' in err
  assert not os.path.exists(out)


def test_cli_entry_point(tmp_path):
  """`python -m experiments.fold`: one line on stderr, exit code 2."""
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.fold', f'--workdir={tmp_path}/none',
       '--config=wmt:layernorm', '--transform=crmsnorm',
       f'--out={tmp_path}/out'], capture_output=True, text=True,
      cwd=os.path.dirname(os.path.dirname(fold.__file__)),
      env=dict(os.environ, PYTHONPATH=os.path.dirname(
          os.path.dirname(fold.__file__))), timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith('error: --workdir=')
  assert len(proc.stderr.strip().splitlines()) == 1
