"""normjax.folding on a model that is not the experiments' Transformer.

A user-written pre-norm linen model (embedding, one attention block and one
MLP block, a final norm and a head) is folded through `NormSite`s only: the
folded model, rebuilt from the `Replacement`s, gives the logits of the
original in evaluation mode. Statistics are moved off their init by a few
training passes and every parameter is perturbed, so no fold is trivially
exact. Deviations are recorded in the conftest summary.
"""

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from normjax import folding
from normjax import linen as nnorm

D, HEADS, VOCAB = 8, 2, 11
TOKENS = np.array([[1, 4, 7, 2, 9, 3], [5, 5, 8, 10, 0, 0]], np.int32)
MASK = TOKENS > 0
SITES = ('attention_norm', 'mlp_norm', 'final_norm')


class UserModel(nn.Module):
  """A pre-norm LM: x = E[t]; x += Att(N1(x)); x += MLP(N2(x)); N3(x) W.

  `norms` holds one `make_norm` kwargs dict per site; `width` is the
  residual stream's width (d - 1 after CRMSNorm compression)."""
  norms: Mapping[str, dict]
  width: int = D

  def norm(self, site, x, train, mask):
    kwargs = dict(self.norms[site])
    return nnorm.make_norm(**kwargs)(name=site)(
        x, use_running_average=not train, mask=mask)

  @nn.compact
  def __call__(self, tokens, train=False):
    mask = tokens > 0
    x = nn.Embed(VOCAB, self.width, name='embed')(tokens)
    h = self.norm('attention_norm', x, train, mask)
    q, k, v = (nn.DenseGeneral((HEADS, D // HEADS), name=n)(h)
               for n in ('query', 'key', 'value'))
    att = nn.dot_product_attention(q, k, v, mask=nn.make_attention_mask(
        mask, mask))
    x = x + nn.DenseGeneral(self.width, axis=(-2, -1), name='out')(att)
    h = self.norm('mlp_norm', x, train, mask)
    x = x + nn.Dense(self.width, name='fc2')(nn.gelu(nn.Dense(
        16, name='fc1')(h)))
    h = self.norm('final_norm', x, train, mask)
    return nn.Dense(VOCAB, name='head')(h)


READERS = {'attention_norm': (('query',), ('key',), ('value',)),
           'mlp_norm': (('fc1',),), 'final_norm': (('head',),)}
WRITERS = [('embed', 'embedding'), ('out', 'kernel'), ('out', 'bias'),
           ('fc2', 'kernel'), ('fc2', 'bias')]


def norm_sites(norms: Mapping[str, dict]) -> list[folding.NormSite]:
  """The model's norm -> readers map, options in the functions' names."""
  return [folding.NormSite.from_module_kwargs((s,), norms[s], READERS[s])
          for s in SITES]


def trained_variables(model, seed=0, steps=3):
  """Variables after `steps` training passes, every leaf perturbed."""
  variables = model.init(jax.random.key(seed), TOKENS)
  variables = nn.unbox(variables)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(
      lambda p: p + 0.3 * rng.standard_normal(p.shape).astype(p.dtype),
      variables['params'])
  variables = dict(variables, params=params)
  for _ in range(steps):
    _, updates = model.apply(variables, TOKENS, train=True,
                             mutable=['batch_stats'])
    variables = dict(variables, **updates)
  return variables


def folded_norms(norms, replacements):
  out = dict(norms)
  for (site,), replacement in replacements.items():
    out[site] = replacement.module_kwargs()
  return out


def check_logits(name, model, variables, new_model, new_variables, tol):
  want = model.apply(variables, TOKENS)
  got = new_model.apply(new_variables, TOKENS)
  error = float(np.max(np.abs(np.asarray(got) - np.asarray(want))))
  conftest.record_deviation(f'folding {name}', error)
  assert error < tol, (name, error)


OFFLINE = {
    'batchnorm': dict(kind='batchnorm', momentum=0.5),
    'paper_batchnorm': dict(kind='paper_batchnorm', momentum=0.5),
    'pn_v': dict(kind='pn_v', num_groups=2, momentum=0.5),
    'powernorm': dict(kind='powernorm', num_groups=2, warmup_steps=2),
    'unified': dict(kind='unified', window_size=2, warmup_steps=1),
    'layernorm': dict(kind='layernorm', epsilon=1e-5),
    'rmsnorm': dict(kind='rmsnorm', use_bias=True),
}


@pytest.mark.parametrize('kind', sorted(OFFLINE))
def test_fold_norms_keeps_the_logits(kind):
  norms = {s: OFFLINE[kind] for s in SITES}
  model = UserModel(norms)
  variables = trained_variables(model)
  new_variables, replacements = folding.fold_norms(variables,
                                                   norm_sites(norms))
  assert set(replacements) == {(s,) for s in SITES}
  for site in SITES:
    assert 'scale' not in new_variables['params'].get(site, {})
    assert site not in new_variables.get('batch_stats', {})
  new_model = UserModel(folded_norms(norms, replacements))
  check_logits(f'fold_norms {kind} (f32)', model, variables, new_model,
               new_variables, 2e-5)


def test_fold_norms_float64_is_exact_to_rounding():
  norms = {s: OFFLINE['powernorm'] for s in SITES}
  with jax.enable_x64(True):
    model = UserModel(norms)
    variables = jax.tree.map(lambda v: np.asarray(v, np.float64)
                             if np.issubdtype(np.asarray(v).dtype,
                                              np.floating) else v,
                             trained_variables(model))
    model64 = UserModel({s: dict(n, dtype=jnp.float64) for s, n in
                         norms.items()})
    new_variables, replacements = folding.fold_norms(variables,
                                                     norm_sites(norms))
    assert replacements[('mlp_norm',)] == folding.Replacement(
        'group_scaling', {'num_groups': 2, 'eps': 1e-5})
    new_norms = {s: dict(n, dtype=jnp.float64) for s, n in
                 folded_norms(norms, replacements).items()}
    check_logits('fold_norms powernorm (f64)', model64, variables,
                 UserModel(new_norms), new_variables, 1e-12)


@pytest.mark.parametrize('target', ['rmsnorm', 'crmsnorm'])
def test_layernorm_conversion_is_exact(target):
  norms = {s: dict(kind='layernorm', epsilon=1e-5) for s in SITES}
  model = UserModel(norms)
  variables = trained_variables(model)
  convert = {'rmsnorm': folding.layernorm_to_rmsnorm,
             'crmsnorm': folding.layernorm_to_crmsnorm}[target]
  new_variables, replacements = convert(variables, norm_sites(norms),
                                        WRITERS)
  assert {r.kind for r in replacements.values()} == {target}
  width = D if target == 'rmsnorm' else D - 1
  new_model = UserModel(folded_norms(norms, replacements), width=width)
  check_logits(f'layernorm -> {target} (f32)', model, variables, new_model,
               new_variables, 2e-5)


def test_freeze_layernorm_equals_the_fixed_sigma_model():
  norms = {s: dict(kind='layernorm', epsilon=1e-5) for s in SITES}
  model = UserModel(norms)
  variables = trained_variables(model)
  sigmas = folding.calibrate_layernorm(
      lambda v, t: model.apply(v, t), variables, [(TOKENS,)])
  assert set(sigmas) == {(s,) for s in SITES}
  new_variables, replacements = folding.freeze_layernorm(
      variables, norm_sites(norms), sigmas)
  assert {r.kind for r in replacements.values()} == {'none'}
  with nn.intercept_methods(folding.frozen_layernorm_interceptor(sigmas)):
    want = model.apply(variables, TOKENS)
  got = UserModel(folded_norms(norms, replacements)).apply(new_variables,
                                                           TOKENS)
  error = float(np.max(np.abs(np.asarray(got) - np.asarray(want))))
  conftest.record_deviation('folding freeze_layernorm vs FakeLN (f32)', error)
  assert error < 2e-5


def test_what_does_not_fold_says_why():
  norms = {s: dict(kind='dyt') for s in SITES}
  variables = trained_variables(UserModel(norms))
  with pytest.raises(ValueError, match="'dyt' has no evaluation-mode"):
    folding.fold_norms(variables, norm_sites(norms))
  norms = {s: OFFLINE['batchnorm'] for s in SITES}
  variables = trained_variables(UserModel(norms))
  lonely = folding.NormSite(('mlp_norm',), 'batchnorm', {})
  with pytest.raises(ValueError, match='lists no readers'):
    folding.fold_norms(variables, [lonely])
  with pytest.raises(ValueError, match='needs layernorm at every'):
    folding.layernorm_to_rmsnorm(variables, norm_sites(norms), WRITERS)
  with pytest.raises(ValueError, match='no variables at nowhere'):
    folding.fold_norms(variables, [folding.NormSite(('nowhere',),
                                                    'batchnorm', {},
                                                    (('fc1',),))])


@pytest.mark.parametrize('toy', ['toy_center', 'toy_running_mean'])
def test_a_norm_added_by_one_record_folds(toy, toy_norms):
  """A toy norm (tests/norm_cases.py), registered by its record alone, folds
  through its `eval_affine` like the built-in norms."""
  del toy_norms
  norms = {s: {'kind': toy} for s in SITES}
  model = UserModel(norms)
  variables = trained_variables(model)
  new_variables, replacements = folding.fold_norms(variables,
                                                   norm_sites(norms))
  new_model = UserModel(folded_norms(norms, replacements))
  check_logits(f'fold_norms {toy} (f32)', model, variables, new_model,
               new_variables, 2e-5)
