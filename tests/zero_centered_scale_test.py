"""The zero-centred scale (`zero_centered_scale=True`), on every norm.

The stored parameter is gamma - 1 (initialised to 0) and the norm applies
1 + scale; the option is added to every record once (`definition.py`) and
applied where params enter a norm, where modules initialise them and where
folding reads them.

1. Every registered norm: the option with stored gamma - 1 gives exactly
   (float64, to rounding: bit for bit for most) the output, new state and gradients of the
   ordinary parameterisation with gamma, in training and evaluation.
2. linen and nnx: the stored scale starts at 0 and the output at init is
   that of the default init.
3. Folding a norm with the option keeps the logits.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import conftest
import folding_test as ft
import norm_cases as nc
from normjax import folding
from normjax import linen as nl
from normjax import nnx as nnorm

B, T, C = nc.SHAPE
ZC = 'zero_centered_scale'


def _gamma(dtype):
  # In [0.5, 2]: gamma - 1 and (gamma - 1) + 1 are exact (Sterbenz).
  return jnp.asarray(np.random.default_rng(5).uniform(0.5, 2.0, C), dtype)


@pytest.mark.parametrize('kind', nc.KINDS)
def test_stored_gamma_minus_one_is_exact(kind):
  assert ZC in nc.definition(kind).defaults
  stateful = nc.definition(kind).stateful
  with jax.enable_x64(True):
    dtype = jnp.float64
    x, dy, mask = nc.x(seed=80, dtype=dtype), nc.cotangent(81, dtype=dtype), nc.mask()
    p = dict(nc.params(kind, dtype=dtype), scale=_gamma(dtype))
    shifted = dict(p, scale=p['scale'] - 1)
    state = nc.state(kind, dtype=dtype)
    modes = (False, True) if stateful else (False,)

    @jax.jit
    def both(p, shifted, x, dy):
      out = []
      for eval_mode in modes:
        for params, zc in ((p, False), (shifted, True)):
          out.append(nc.train_grads(kind, x, params, state, mask, dy,
                                    jit=False, use_running_average=eval_mode,
                                    **{ZC: zc}))
      return out

    runs = both(p, shifted, x, dy)
    for plain, centred in zip(runs[::2], runs[1::2]):
      # Equal to float64 rounding: (gamma - 1) + 1 == gamma exactly, and
      # most norms agree bit for bit; XLA may fuse the two programs
      # differently (CRMSNorm: 1 ulp).
      chex.assert_trees_all_close(centred, plain, rtol=1e-14, atol=1e-15)
      dev = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(centred),
                                jax.tree.leaves(plain)))
      conftest.record_deviation(f'{kind} zero_centered_scale f64 (abs)', dev)


def _init_both(kind, zc):
  x = nc.x(seed=82)
  module = nl.make_norm(kind, use_scale=True,
                        **nc.module_options(kind, **{ZC: zc}))()
  kwargs = {'use_running_average': False} if nc.definition(kind).stateful \
      else {}
  variables = jax.jit(lambda k: module.init(k, x, mask=nc.mask(),
                                            **kwargs))(jax.random.key(0))
  y = jax.jit(lambda v: module.apply(v, x, use_running_average=True,
                                     mask=nc.mask()))(variables)
  model = nnorm.make_norm(kind, use_scale=True,
                          **nc.module_options(kind, **{ZC: zc}))(
                              C, rngs=nnx.Rngs(0))
  if nc.definition(kind).stateful:
    model.eval()
  return nn.unbox(variables)['params']['scale'], y, model.scale[...], model(
      x, mask=nc.mask())


@pytest.mark.parametrize('kind', ['layernorm', 'rmsnorm', 'dyt', 'seednorm',
                                  'batchnorm', 'bcn', 'group_scaling'])
def test_init_stores_zero_and_gives_the_default_output(kind):
  scale, y, nnx_scale, y_nnx = _init_both(kind, True)
  _, y_default, _, y_nnx_default = _init_both(kind, False)
  chex.assert_trees_all_equal(scale, jnp.zeros(C))
  chex.assert_trees_all_equal(nnx_scale, jnp.zeros(C))
  chex.assert_trees_all_equal(y, y_default)
  chex.assert_trees_all_equal(y_nnx, y_nnx_default)


def test_scale_init_initialises_gamma():
  x = nc.x()
  v = nl.RMSNorm(**{ZC: True}, scale_init=nn.initializers.constant(1.5)
                 ).init(jax.random.key(0), x)
  chex.assert_trees_all_equal(v['params']['scale'], jnp.full(C, 0.5))


@pytest.mark.parametrize('kind', ['layernorm', 'batchnorm'])
def test_fold_with_zero_centered_scale_keeps_the_logits(kind):
  norms = {s: dict(ft.OFFLINE[kind], **{ZC: True}) for s in ft.SITES}
  model = ft.UserModel(norms)
  variables = ft.trained_variables(model)
  for site in ft.SITES:  # the stored gamma - 1 was moved off 0
    assert np.any(np.asarray(variables['params'][site]['scale']) != 0)
  new_variables, replacements = folding.fold_norms(variables,
                                                   ft.norm_sites(norms))
  for replacement in replacements.values():
    assert ZC not in replacement.options
  new_model = ft.UserModel(ft.folded_norms(norms, replacements))
  ft.check_logits(f'fold_norms {kind} zero_centered_scale (f32)', model,
                  variables, new_model, new_variables, 2e-5)
