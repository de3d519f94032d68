"""PowerNorm with its approximate backward, and PN-V.

Shen, Yao, Gholami, Mahoney, Keutzer. "PowerNorm: Rethinking Batch
Normalization in Transformers", ICML 2020, https://arxiv.org/abs/2003.07845.
The semantics are those of the official code (sIncerass/powernorm,
`fairseq/modules/norms/mask_powernorm.py`), including its GroupScaling,
warmup and pad handling.

The official backward updates a buffer (`ema_gz`) in place. JAX has no
mutation, so `ema_gz` enters the custom_vjp core as an input and its update
comes back as that input's *cotangent*: differentiate the loss with respect
to `state.ema_gz` (the `'grad_stats'` collection of the Flax module) as well
as the parameters, then add the result to the state with
`normjax.apply_backward_stats`. It never goes through the optimizer.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from normjax._src import batch_kernel, common, power_kernel, rules
from normjax._src import definition as nd
from normjax._src.layer_norm import check_num_groups, group_scale

Array = jax.Array


class PowerNormState(NamedTuple):
  """State of PowerNorm. Leaves are [features] (or [groups, features])."""
  running_phi: Array  # phi: running quadratic mean, init 1 (forward pass).
  ema_gz: Array       # u: running gradient statistic, init 0 (backward pass).
  step: Array         # t: int32 training forward calls so far, init 0.

  BACKWARD_FIELDS = ('ema_gz',)  # updated through their cotangents


def init_power_norm_state(features: int, dtype=jnp.float32,
                          num_batch_groups: int = 1) -> PowerNormState:
  """The fresh state of `power_norm`: running quadratic mean phi 1,
  backward statistic ema_gz 0 per feature, step 0 (counts the warmup)."""
  state = PowerNormState(running_phi=jnp.ones((features,), dtype),
                         ema_gz=jnp.zeros((features,), dtype),
                         step=jnp.zeros((), jnp.int32))
  return common.group_state(state, num_batch_groups)


_BACKWARD = contextvars.ContextVar('power_norm_backward',
                                   default='approximate')


@contextlib.contextmanager
def power_norm_autodiff() -> Iterator[None]:
  """Within this block PowerNorm's `backward=None` means 'autodiff'.

  It acts at trace time: the functions traced inside use ordinary autodiff
  through PowerNorm's forward pass, which lets a train step compare the
  approximate gradient with the exact one of the same forward (the probes'
  `grad_cosine`) without a second model.
  """
  token = _BACKWARD.set('autodiff')
  try:
    yield
  finally:
    _BACKWARD.reset(token)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _pn_core(xs, denom, bwd_denom, row_weight, has_data, ema_gz, alpha_bkw,
             axis_name):
  """z = xs / denom, with the approximate backward of the official code.

  Args:
    xs: [..., C] GroupScaled input.
    denom: [C] normaliser of the forward pass.
    bwd_denom: [C] normaliser of the backward pass.
    row_weight: None (every row counts in the gradient statistic and gets the
      correction term, the official behaviour) or a 0/1 [...] array of the
      rows that do.
    has_data: bool scalar; without real tokens the statistic does not move,
      nor when its update is not finite (a non-finite input or cotangent).
    ema_gz: [C] u_{t-1}; the cotangent returned for it is u_t - u_{t-1}.
  """
  del bwd_denom, row_weight, has_data, ema_gz
  return xs / common.feat(denom, xs.ndim)


def _pn_core_fwd(xs, denom, bwd_denom, row_weight, has_data, ema_gz,
                 alpha_bkw, axis_name):
  z = xs / common.feat(denom, xs.ndim)
  return z, (z, bwd_denom, row_weight, has_data, ema_gz)


def _pn_core_bwd(alpha_bkw, axis_name, res, g):
  z, bwd_denom, row_weight, has_data, u = res
  # Without real tokens the step is an evaluation step: no correction.
  correction = common.feat(jnp.where(has_data, (1 - alpha_bkw) * u, 0),
                           z.ndim) * z
  if row_weight is not None:
    correction = correction * row_weight[..., None]
  g_hat = g - correction
  du, _ = common.masked_row_mean(g_hat * z, row_weight, axis_name)
  du = jnp.where(has_data & common.all_finite(du), du, 0).astype(u.dtype)
  return g_hat / common.feat(bwd_denom, z.ndim), None, None, None, None, du


_pn_core.defvjp(_pn_core_fwd, _pn_core_bwd)


POWER_NORM_DOC = """PowerNorm (Shen et al., 2020, https://arxiv.org/abs/2003.07845).

  Training step t (t counts training calls, starting at 1):

      xs    = GroupScaling(x)                     per token, `num_groups`
      psi2  = mean_V(xs^2)                        real tokens V, no gradient
      d     = sqrt(psi2 + eps) if t <= W else sqrt(phi_{t-1} + eps)
      y     = scale * xs / d + bias               at every token
      phi   = phi (t-1)/t + psi2/t   if t < W     (cumulative average)
      phi   = a_f phi + (1 - a_f) psi2            (always, after the line above)

  Approximate backward, with g = scale * dy and z = xs / d:

      g_hat = g - (1 - a_b) u_{t-1} z
      u_t   = u_{t-1} + mean_rows(g_hat z)        every row, pads included
      dxs   = g_hat / sqrt(psi2 + eps)            the batch statistic, even
                                                  after warmup
      dscale = sum(dy z),  dbias = sum(dy),  dx = GroupScaling VJP of dxs.

  Evaluation: y = scale * GroupScaling(x) / sqrt(phi + eps) + bias.

  These are the official code's semantics. Where it differs from the paper's
  Algorithm 2 an option selects the paper's form:
  `backward_denominator='running'` divides the backward by the `d` of the
  forward pass, and `grad_mean_over='valid'` takes the gradient statistic over
  real tokens only (pads then get no correction term). With 'padded' the
  result depends on how much padding the batch carries, as fairseq's did.

  Args:
    x: [batch, ..., features].
    params: optional `{'scale', 'bias'}` of shape [features].
    state: a `PowerNormState` (see `init_power_norm_state`).
    mask: True for real tokens, broadcastable to `x.shape[:-1]`.
    use_running_average: evaluation mode; the state is returned unchanged.
    axis_name: mesh axis name(s) for `shard_map`/`pmap`, over which the
      forward statistic and the gradient statistic are summed. Not needed
      under `jax.jit`, where a sharded batch already gives global statistics.

  Returns:
    `(y, new_state)`, `y` in the dtype of `x`. `new_state.ema_gz` is
    `state.ema_gz`: its update is the cotangent of `state.ema_gz` (see the
    module docstring). A batch without real tokens is normalised with phi and
    leaves the whole state unchanged. So does, for the state and u, a batch
    whose real tokens hold a NaN or an infinity, and u ignores an update
    made non-finite by the cotangent.
  """

PN_V_DOC = """PN-V: batch quadratic-mean normalisation (Shen et al., 2020, §4.1, https://arxiv.org/abs/2003.07845).

  The paper's first step from BatchNorm to PowerNorm: no mean-centring, the
  current batch's quadratic mean in training and ordinary (exact) autodiff
  through it; a running average serves evaluation only.

      xs   = GroupScaling(x)                  (as PowerNorm; optional)
      psi2 = mean_V(xs^2)                     over real tokens V
      y    = scale * xs / sqrt(psi2 + eps) + bias
      phi  = momentum * phi + (1 - momentum) * psi2
      eval: y = scale * xs / sqrt(phi + eps) + bias

  The official repository ships no PN-V; GroupScaling and momentum 0.9 are
  kept from PowerNorm for parity. Arguments as in `power_norm`.
  """


class PNVState(NamedTuple):
  """State of PN-V: the running quadratic mean used only for evaluation."""
  running_phi: Array  # [features] EMA of the batch quadratic mean, init 1.


def init_pn_v_state(features: int, dtype=jnp.float32,
                    num_batch_groups: int = 1) -> PNVState:
  """The fresh state of `pn_v`: running quadratic mean phi 1 per
  feature."""
  return common.group_state(PNVState(running_phi=jnp.ones((features,), dtype)),
                            num_batch_groups)


def _prescale(x: Array, dtype, options: dict[str, Any]) -> Array:
  """x in the statistics dtype, GroupScaled unless disabled."""
  x = x.astype(dtype)
  if options['use_group_scaling']:
    return group_scale(x, options['num_groups'], options['group_scaling_eps'])
  return x


def _group_scaling_core(options: dict[str, Any]) -> tuple[str, dict]:
  """The per-token map left in evaluation: GroupScaling, or nothing."""
  if options['use_group_scaling']:
    return ('group_scaling', {'num_groups': options['num_groups'],
                              'eps': options['group_scaling_eps']})
  return ('none', {})


def _eval_affine(params, state, options, xp) -> nd.EvalAffine:
  """PowerNorm / PN-V evaluation: scale * xs / sqrt(phi + eps) + bias."""
  del xp
  return nd.EvalAffine(
      scale=params['scale'] / (state.running_phi + options['eps']) ** 0.5,
      center=None, bias=params['bias'], core=_group_scaling_core(options))


def _check_group_scaling(options: dict[str, Any], features: int,
                         fn: str) -> None:
  if options['use_group_scaling']:
    check_num_groups(options['num_groups'], features, fn)




def _row_count(x: Array, mask: Array | None, axis_name: Any) -> Array:
  count = (jnp.asarray(x.size // x.shape[-1]) if mask is None
           else jnp.sum(mask))
  if axis_name is not None:
    count = jax.lax.psum(count, axis_name)
  return count


def _denominators(xs, mask, phi_prev, t, options, axis_name):
  """(psi2, has_data, batch denominator, forward denominator) of step t.

  psi2 is the masked quadratic mean of `xs` (phi_{t-1} without real
  tokens); the forward divides by the batch's sqrt(psi2 + eps) in warmup
  and by sqrt(phi_{t-1} + eps) after it.
  """
  eps = options['eps']
  psi2, count = common.masked_row_mean(jnp.square(xs), mask, axis_name)
  has_data = count > 0
  psi2 = jnp.where(has_data, psi2, phi_prev)
  batch_denom = jnp.sqrt(psi2 + eps)
  denom = jnp.where(t <= options['warmup_steps'], batch_denom,
                    jnp.sqrt(phi_prev + eps))
  return psi2, has_data, batch_denom, denom


def _autodiff_forward(x, mask, state, t, params, options, axis_name):
  """(y, psi2) of PowerNorm's forward, for exact autodiff through it."""
  dtype = common.stats_dtype(x)
  xs = _prescale(x, dtype, options)
  psi2, _, _, denom = _denominators(
      xs, mask, state.running_phi.astype(dtype), t, options, axis_name)
  y = common.affine(xs / common.feat(denom, xs.ndim), params, dtype)
  return y, jax.lax.stop_gradient(psi2)


def _xla_approximate(x, mask, state, t, scale, bias, options, axis_name):
  """(y, psi2) of the approximate rule, in jnp (`_pn_core`)."""
  dtype = common.stats_dtype(x)
  xs = _prescale(x, dtype, options)
  psi2, has_data, batch_denom, denom = _denominators(
      jax.lax.stop_gradient(xs), mask, state.running_phi.astype(dtype), t,
      options, axis_name)
  bwd_denom = (batch_denom if options['backward_denominator'] == 'batch'
               else denom)
  row_weight = None
  if options['grad_mean_over'] == 'valid' and mask is not None:
    row_weight = mask.astype(dtype)
  z = _pn_core(xs, denom, bwd_denom, row_weight, has_data,
               state.ema_gz.astype(dtype), options['alpha_bkw'], axis_name)
  return z * common.feat(scale, z.ndim) + common.feat(bias, z.ndim), psi2


def _approximate(x, mask, state, t, params, options, axis_name):
  """(y, psi2) of the approximate rule: the fused CPU kernel where usable."""
  dtype = common.stats_dtype(x)
  xf = x.astype(dtype)
  p = common.filled_params(params, x.shape[-1], dtype)
  scale, bias = p['scale'], p['bias']

  def xla(x_, s_, b_, *_):
    return _xla_approximate(x_, mask, state, t, s_, b_, options, axis_name)

  if not power_kernel.usable(xf, 'power_norm') or axis_name is not None:
    return xla(xf, scale, bias)
  ones = jnp.ones(xf.shape[:-1], dtype)
  stat_w = ones if mask is None else mask.astype(dtype)
  cw = stat_w if options['grad_mean_over'] == 'valid' else ones
  opts = power_kernel.PowerNormOptions(
      options['warmup_steps'], options['alpha_bkw'], options['eps'],
      options['num_groups'] if options['use_group_scaling'] else 0,
      options['group_scaling_eps'],
      options['backward_denominator'] == 'running')
  return power_kernel.on_cpu(
      lambda *a: power_kernel.power_norm_train(*a, opts), xla,
      xf, scale, bias, stat_w, cw, state.running_phi.astype(dtype),
      state.ema_gz.astype(dtype), t)


def _power_norm_train(x, mask, state, params, options, axis_name):
  """One batch group's PowerNorm training step."""
  dtype = common.stats_dtype(x)
  t = state.step + 1
  backward = options['backward'] or _BACKWARD.get()
  if backward == 'autodiff':
    y, psi2 = _autodiff_forward(x, mask, state, t, params, options, axis_name)
  else:
    xg, pg, sg = common.guard_backward_stats(
        x, params, state, options, 'power_norm', PowerNormState.BACKWARD_FIELDS)
    y, psi2 = _approximate(xg, mask, sg, t, pg, options, axis_name)
  update = (_row_count(x, mask, axis_name) > 0) & common.all_finite(psi2)
  phi_prev = state.running_phi.astype(dtype)
  tf = t.astype(dtype)
  phi = jnp.where(t < options['warmup_steps'],
                  phi_prev * (tf - 1) / tf + psi2 / tf, phi_prev)
  a_f = options['alpha_fwd']
  phi = a_f * phi + (1 - a_f) * psi2
  new = state._replace(running_phi=phi, step=t)
  return y, common.keep_if(update, new, state)


_GROUP_SCALING_OPTIONS = (
    nd.Option('num_groups', 1, 'GroupScaling groups (the official runs use '
              'the head count).', check=rules.COUNT),
    nd.Option('use_group_scaling', True, 'False drops GroupScaling (an '
              'ablation).', check=rules.FLAG),
    nd.Option('group_scaling_eps', 1e-5, "GroupScaling's eps (hard-wired to "
              '1e-5 officially).', check=rules.EPS),
)
_NUM_BATCH_GROUPS = nd.Option(
    'num_batch_groups', 1,
    'split the batch axis into this many groups, each with its own '
    'statistics and state, to reproduce the official per-GPU behaviour '
    "whatever the device count. Evaluation uses group 0's state, as the "
    "official checkpoints held rank 0's buffers.", check=rules.COUNT)


def _probe(x, state, options):
  """PowerNorm's / PN-V's statistics input and running quadratic mean."""
  return (_prescale(x, jnp.float32, options),
          {'quad_mean': state.running_phi})


POWER_NORM = nd.register(nd.NormDefinition(
    kind='powernorm', name='power_norm', module='PowerNorm',
    options=(
        nd.Option('warmup_steps', 10000, 'W; official class default 10000, '
                  'the fairseq layers use the learning-rate warmup (8000), '
                  'the final stack norm 1000; 0: no warmup.',
                  check=rules.STEPS),
        nd.Option('alpha_fwd', 0.9, 'decay of phi (official 0.9); 1 freezes '
                  'phi at its warmup value.', check=rules.DECAY),
        nd.Option('alpha_bkw', 0.9, 'decay of u (official 0.9); 1 drops the '
                  'correction term.', check=rules.DECAY),
        nd.Option('eps', 1e-5, 'added to the quadratic mean.',
                  field='epsilon', check=rules.EPS),
        *_GROUP_SCALING_OPTIONS,
        nd.Option('backward_denominator', 'batch',
                  "'batch' (official) or 'running' (paper).",
                  check=rules.one_of('batch', 'running')),
        nd.Option('grad_mean_over', 'padded',
                  "'padded' (official) or 'valid' (paper).",
                  check=rules.one_of('padded', 'valid')),
        _NUM_BATCH_GROUPS,
        nd.Option('freeze_backward_stats', False,
                  common.FREEZE_BACKWARD_STATS_DOC, check=rules.FLAG),
        nd.Option('backward', None,
                  "'approximate' (the rule above) or 'autodiff': exact "
                  'autodiff of the same forward pass (through psi2 in '
                  'warmup; after it phi_{t-1} is a constant), leaving u '
                  "unchanged. None: 'approximate', or 'autodiff' inside "
                  '`normjax.functional.power_norm_autodiff()`.',
                  check=rules.one_of(None, 'approximate', 'autodiff')),
    ),
    doc=POWER_NORM_DOC,
    train=_power_norm_train,
    check=_check_group_scaling,
    init_state=lambda features, dtype, o: init_power_norm_state(
        features, dtype, o['num_batch_groups']),
    backward_stats=PowerNormState.BACKWARD_FIELDS,
    eval_affine=_eval_affine,
    probe=_probe,
    state_maker='init_power_norm_state',
))
power_norm = POWER_NORM.function


def _pn_v_train(x, mask, state, params, options, axis_name):
  """One batch group's PN-V training step."""
  dtype = common.stats_dtype(x)
  phi_prev = state.running_phi.astype(dtype)

  def xla(xf):
    xs = _prescale(xf, dtype, options)
    psi2, count = common.masked_row_mean(jnp.square(xs), mask, axis_name)
    has_data = count > 0
    update = has_data & common.all_finite(psi2)
    psi2 = jnp.where(has_data, psi2, phi_prev)
    y = common.affine(
        xs * common.feat(jax.lax.rsqrt(psi2 + options['eps']), xs.ndim),
        params, dtype)
    return y, jnp.zeros_like(psi2), psi2, update

  opts = batch_kernel.BatchOptions(
      eps=options['eps'], center=False,
      num_groups=options['num_groups'] if options['use_group_scaling'] else 0,
      group_scaling_eps=options['group_scaling_eps'], per_row_keep=False,
      var_over_every_row=False)
  y, _, psi2, update = batch_kernel.train(
      x.astype(dtype), mask, params, jnp.zeros_like(phi_prev), phi_prev,
      opts, 'pn_v', axis_name, xla)
  m = options['momentum']
  phi = m * state.running_phi + (1 - m) * jax.lax.stop_gradient(psi2)
  return y, common.keep_if(update, PNVState(running_phi=phi), state)


PN_V = nd.register(nd.NormDefinition(
    kind='pn_v', name='pn_v', module='PNV',
    options=(
        nd.Option('momentum', 0.9, 'decay of the running quadratic mean.',
                  check=rules.DECAY),
        nd.Option('eps', 1e-5, 'added to the quadratic mean.',
                  field='epsilon', check=rules.EPS),
        *_GROUP_SCALING_OPTIONS,
        _NUM_BATCH_GROUPS,
    ),
    doc=PN_V_DOC,
    train=_pn_v_train,
    check=_check_group_scaling,
    init_state=lambda features, dtype, o: init_pn_v_state(
        features, dtype, o['num_batch_groups']),
    eval_affine=_eval_affine,
    probe=_probe,
    state_maker='init_pn_v_state',
))
pn_v = PN_V.function
