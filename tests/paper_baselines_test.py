"""The official baselines' exact semantics: the PowerNorm paper's BN and UN1d's pad mask.

* `paper_batchnorm` (the official MaskSyncBatchNorm, the "BN" row of the
  PowerNorm paper) against its NumPy reference over padded steps (f64 to
  1e-12 relative), against a torch re-statement of the official module
  (written here from its math, when torch is installed), under vmap with an
  axis name (one global batch), and measured against flax-style `batchnorm`.
* `unified_norm(mean_over='official_masked')` (the official UN1d given a
  pad mask) against the reference, and how it differs from 'padded' and
  'valid'.
"""

import conftest
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import normjax
from normjax import functional as nf
from normjax._src.layer_norm import group_scale

B, T, C = 3, 5, 8
STEPS = 8


def batches(dtype, steps=STEPS, seed=0):
  """Padded batches [B, T, C] (row 0 full, the others shorter), channel
  scales and offsets varying, and cotangents with non-zero pad entries."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):
    lengths = rng.integers(1, T + 1, size=B)
    lengths[0] = T
    mask = np.arange(T)[None, :] < lengths[:, None]
    x = (rng.normal(size=(B, T, C)) * rng.uniform(0.3, 3.0, size=(1, 1, C))
         + rng.normal(size=(1, 1, C)))
    out.append((x.astype(dtype), mask, rng.normal(size=(B, T, C)).astype(dtype)))
  return out


def params(dtype, seed=1):
  rng = np.random.default_rng(seed)
  return {'scale': jnp.asarray(rng.uniform(0.5, 1.5, C), dtype),
          'bias': jnp.asarray(rng.normal(size=C), dtype)}


def grad_step(fn, **options):
  @jax.jit
  def step(x, p, state, mask, dy):
    def loss(x, p):
      y, new = fn(x, p, state, mask=mask, **options)
      return jnp.sum(y * dy), (y, new)
    (dx, dp), (y, new) = jax.grad(loss, (0, 1), has_aux=True)(x, p)
    return y, dx, dp, new
  return step


def rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300))


# ---------------------------------------------------------------------------
# The PowerNorm paper's BN.


def test_paper_batchnorm_matches_reference_step_by_step(float_dtype):
  momentum = 0.9  # not the default (the torch test runs the defaults)
  tol = 1e-12 if float_dtype == 'float64' else 2e-5
  p = params(float_dtype)
  state = nf.init_paper_batch_norm_state(C, float_dtype)
  reference = ref.PaperBatchNormRef(C, momentum=momentum)
  step = grad_step(nf.paper_batch_norm, momentum=momentum)
  tag = f'paper_batchnorm m={momentum} [{float_dtype}]'
  for x, mask, dy in batches(float_dtype):
    y, dx, dp, state = step(jnp.asarray(x), p, state, jnp.asarray(mask),
                            jnp.asarray(dy))
    want_y = reference.forward(x.reshape(-1, C), mask.reshape(-1), True,
                               p['scale'], p['bias'])
    want_dx, want_ds, want_db = reference.backward(dy.reshape(-1, C))
    for what, got, want in [
        ('y', y.reshape(-1, C), want_y), ('dx', dx.reshape(-1, C), want_dx),
        ('dscale', dp['scale'], want_ds), ('dbias', dp['bias'], want_db),
        ('running_mean', state.running_mean, reference.mean),
        ('running_var', state.running_var, reference.var)]:
      error = rel(got, want)
      conftest.record_deviation(f'{tag}: {what} (max rel)', error)
      assert error <= tol, (what, error)
    # Point 4: pads output the bias, exactly.
    pads = ~mask
    np.testing.assert_array_equal(
        np.asarray(y)[pads], np.broadcast_to(np.asarray(p['bias']),
                                             (pads.sum(), C)))
  x, mask, _ = batches(float_dtype, 1, seed=9)[0]
  y, _ = nf.paper_batch_norm(jnp.asarray(x), p, state, mask=jnp.asarray(mask),
                             use_running_average=True, momentum=momentum)
  want = reference.forward(x.reshape(-1, C), mask.reshape(-1), False,
                           p['scale'], p['bias'])
  assert rel(y.reshape(-1, C), want) <= tol


def _torch_mask_sync_bn(torch, x, pad, weight, bias, running_mean,
                        running_var, momentum=0.05, eps=1e-5):
  """The official module's training forward, restated from its math:
  x [T, B, C], pad [B, T] True for pads; running stats updated in place."""
  a = x / torch.sqrt((x * x).mean(dim=2, keepdim=True) + 1e-5)  # LayerScaling
  real = ~pad.transpose(0, 1)
  u = a.clone()
  u[~real] = a[real].mean(dim=0)         # pads <- mean of the real tokens
  t, b, c = a.shape
  z = torch.nn.functional.batch_norm(u.reshape(t * b, c), running_mean,
                                     running_var, weight, bias, True,
                                     momentum, eps)
  return z.reshape(t, b, c)


@pytest.mark.parametrize('float_dtype', ['float32', 'float64'])
def test_paper_batchnorm_matches_torch(float_dtype):
  torch = pytest.importorskip('torch')
  tdtype = getattr(torch, float_dtype)
  tol = 1e-12 if float_dtype == 'float64' else 2e-5
  rm = torch.zeros(C, dtype=tdtype)
  rv = torch.ones(C, dtype=tdtype)
  with jax.enable_x64(float_dtype == 'float64'):
    p = params(float_dtype)
    weight = torch.tensor(np.asarray(p['scale']), dtype=tdtype,
                          requires_grad=True)
    bias = torch.tensor(np.asarray(p['bias']), dtype=tdtype,
                        requires_grad=True)
    state = nf.init_paper_batch_norm_state(C, float_dtype)
    step = grad_step(nf.paper_batch_norm)  # the defaults: official values
    for x, mask, dy in batches(float_dtype):
      y, dx, dp, state = step(jnp.asarray(x), p, state, jnp.asarray(mask),
                              jnp.asarray(dy))
      xt = torch.tensor(x.transpose(1, 0, 2).copy(), requires_grad=True)
      weight.grad = bias.grad = None
      yt = _torch_mask_sync_bn(torch, xt, torch.tensor(~mask), weight, bias,
                               rm, rv)
      (yt * torch.tensor(dy.transpose(1, 0, 2).copy())).sum().backward()
      tr = lambda v: v.detach().numpy().transpose(1, 0, 2)
      for what, got, want in [
          ('y', y, tr(yt)), ('dx', dx, tr(xt.grad)),
          ('dscale', dp['scale'], weight.grad.numpy()),
          ('dbias', dp['bias'], bias.grad.numpy()),
          ('running_mean', state.running_mean, rm.numpy()),
          ('running_var', state.running_var, rv.numpy())]:
        error = rel(got, want)
        conftest.record_deviation(
            f'paper_batchnorm vs torch [{float_dtype}]: {what} (max rel)',
            error)
        assert error <= tol, (what, error)


@pytest.mark.parametrize('float_dtype', ['float64'])
def test_paper_batchnorm_vmap_axis_name_is_one_global_batch(float_dtype):
  """Members of a vmapped axis share sums of a, squared deviations and real
  and total counts: each member's output is its slice of the joint batch."""
  tol = 1e-12
  with jax.enable_x64(True):
    _check_vmap(float_dtype, tol)


def _check_vmap(float_dtype, tol):
  data = batches(float_dtype, 2)
  xs = jnp.asarray(np.stack([d[0] for d in data]))      # [2, B, T, C]
  masks = jnp.asarray(np.stack([d[1] for d in data]))
  dys = jnp.asarray(np.stack([d[2] for d in data]))
  p = params(float_dtype)
  state = nf.init_paper_batch_norm_state(C, float_dtype)
  member = grad_step(nf.paper_batch_norm, axis_name='members')
  y, dx, dp, new = jax.vmap(member, in_axes=(0, None, None, 0, 0),
                            axis_name='members')(xs, p, state, masks, dys)
  joint = grad_step(nf.paper_batch_norm)
  y_j, dx_j, dp_j, new_j = joint(xs.reshape(2 * B, T, C), p, state,
                                 masks.reshape(2 * B, T),
                                 dys.reshape(2 * B, T, C))
  assert rel(y.reshape(2 * B, T, C), y_j) <= tol
  assert rel(dx.reshape(2 * B, T, C), dx_j) <= tol
  for name in ('scale', 'bias'):  # each member's share of the joint sum
    assert rel(dp[name].sum(0), dp_j[name]) <= tol
  for i in range(2):
    assert rel(new.running_mean[i], new_j.running_mean) <= tol
    assert rel(new.running_var[i], new_j.running_var) <= tol
  # Without the axis name each member has its own statistics (as the
  # official need_sync=False runs): a different result.
  y_local, _, _, _ = jax.vmap(grad_step(nf.paper_batch_norm),
                              in_axes=(0, None, None, 0, 0))(
                                  xs, p, state, masks, dys)
  assert rel(y_local.reshape(2 * B, T, C), y_j) > 1e-3


def test_paper_batchnorm_differs_from_flax_style_batchnorm():
  """How far the paper's BN is from `batchnorm` on the same padded batch,
  and that the four points account for all of it."""
  x, mask, _ = batches('float64', 1, seed=3)[0]
  with jax.enable_x64(True):
    x, mask, p = jnp.asarray(x), jnp.asarray(mask), params('float64')
    paper, s_paper = nf.paper_batch_norm(
        x, p, nf.init_paper_batch_norm_state(C, jnp.float64), mask=mask)
    flax_bn, s_flax = nf.batch_norm(
        x, p, nf.init_batch_norm_state(C, jnp.float64), mask=mask,
        momentum=0.95)
    real = np.asarray(mask)
    diff = rel(np.asarray(paper)[real], np.asarray(flax_bn)[real])
    conftest.record_deviation('paper_batchnorm vs flax batchnorm: y real '
                              '(max rel difference)', diff)
    assert diff > 0.1, diff
    # Undo (1) and (2) by hand: flax BN of the LayerScaled input, with its
    # variance shrunk by |V| / N, gives the paper's real outputs exactly.
    a = group_scale(x, 1, 1e-5)
    n_real, n = float(real.sum()), float(real.size)
    mu = np.asarray(a)[real].mean(0)
    var = np.asarray(a)[real].var(0) * n_real / n
    z = (np.asarray(a) - mu) / np.sqrt(var + 1e-5)
    want = z * np.asarray(p['scale']) + np.asarray(p['bias'])
    assert rel(np.asarray(paper)[real], want[real]) < 1e-12
    # (3): the unbiased running variance over all N rows.
    np.testing.assert_allclose(
        s_paper.running_var, 0.95 + 0.05 * var * n / (n - 1), rtol=1e-12)
    assert rel(s_paper.running_var, s_flax.var) > 1e-3


# ---------------------------------------------------------------------------
# UN1d given a pad mask.

UN_OPTIONS = dict(window_size=2, warmup_steps=3, compensation_delay=4,
                  compensation_clamp=1.5)


def _un_run(mean_over, dtype):
  """(y, dx) per step and the reference's deviations over STEPS steps."""
  fn = nf.unified_norm
  options = dict(UN_OPTIONS, mean_over=mean_over)
  state = nf.init_unified_norm_state(C, 2, dtype)
  reference = ref.UnifiedNormRef(C, **options)
  p = params(dtype)

  @jax.jit
  def step(x, state, mask, dy):
    back = normjax.backward_stats(state)

    def loss(x, back):
      y, new = fn(x, p, state._replace(**back), mask=mask, **options)
      return jnp.sum(y * dy), (y, new)
    (dx, dback), (y, new) = jax.grad(loss, (0, 1), has_aux=True)(x, back)
    return y, dx, new._replace(**normjax.apply_backward_stats(back, dback))

  outs, worst = [], {}
  for x, mask, dy in batches(dtype):
    y, dx, state = step(jnp.asarray(x), state, jnp.asarray(mask),
                        jnp.asarray(dy))
    want_y = reference.forward(x.reshape(-1, C), mask.reshape(-1), True,
                               p['scale'], p['bias'])
    want_dx = reference.backward(dy.reshape(-1, C))[0]
    for what, got, want in [('y', y.reshape(-1, C), want_y),
                            ('dx', dx.reshape(-1, C), want_dx),
                            ('ema_gz', state.ema_gz, reference.nu),
                            ('running_var', state.running_var, reference.R)]:
      worst[what] = max(worst.get(what, 0.0), rel(got, want))
    outs.append((np.asarray(y), np.asarray(dx)))
  return outs, worst


def test_unified_official_masked_mode(float_dtype):
  tol = 1e-12 if float_dtype == 'float64' else 5e-5
  runs = {}
  for mode in ('official_masked', 'valid', 'padded'):
    runs[mode], worst = _un_run(mode, float_dtype)
    for what, error in worst.items():
      conftest.record_deviation(
          f'unified {mode} [{float_dtype}]: {what} (max rel)', error)
      assert error <= tol, (mode, what, error)
  masked = runs['official_masked']
  # Forward statistic over the real tokens, as 'valid': the same y.
  for (y, _), (y_valid, _) in zip(masked, runs['valid']):
    np.testing.assert_allclose(y, y_valid, rtol=tol, atol=tol)
  # ... but the gradient statistic and correction over every row: dx
  # differs from 'valid' at every step (and from 'padded' from step 1 on,
  # whose forward statistic counts the pads).
  for (_, dx), (_, dx_valid) in zip(masked, runs['valid']):
    assert rel(dx, dx_valid) > 1e-3
  for (y, dx), (y_pad, dx_pad) in zip(masked, runs['padded']):
    assert rel(y, y_pad) > 1e-3 and rel(dx, dx_pad) > 1e-3
