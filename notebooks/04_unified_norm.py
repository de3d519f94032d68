# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Unified Normalization: window smoothing and outlier filtration at work
#
# UN (Yang et al., 2022) normalises with the *geometric mean* of the last
# M_f batch quadratic means instead of the current one, and with outlier
# filtration on it skips a batch whose statistic makes the window's
# arithmetic and geometric means drift apart (AM - GM > M_f rho), keeping
# the running statistic R instead.
#
# Here the Flax NNX module `normjax.nnx.UnifiedNorm` (in training mode, its
# running statistics updated in place) is fed a stream of batches whose
# scale fluctuates (log-normal, as text activations do) with three outlier
# batches 30x larger. The statistic UN actually normalised with is read off its
# output: sigma2 + eps = mean(x^2) / mean(y^2) per channel (no affine).

# %%
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from flax import nnx

from normjax import nnx as nnorm
from experiments import dynamics

STEPS, FEATURES, ROWS, WINDOW, WARMUP = 120, 4, 256, 4, 20
OUTLIERS = (50, 80, 81)
rng = np.random.default_rng(0)
scale = np.exp(0.3 * rng.standard_normal(STEPS))
scale[list(OUTLIERS)] *= 30.0
batches = scale[:, None, None] * rng.standard_normal((STEPS, ROWS, FEATURES))


def stream(filtration):
  norm = nnorm.UnifiedNorm(
      FEATURES, window_size=WINDOW, warmup_steps=WARMUP,
      outlier_filtration=filtration, compensation_delay=WARMUP,
      use_scale=False, use_bias=False, rngs=nnx.Rngs(0))
  step = nnx.jit(lambda norm, x: norm(x))  # train mode: updates its BatchStats
  batch_stat, used, running, skips = [], [], [], []
  for t in range(STEPS):
    x = jnp.asarray(batches[t], jnp.float32)  # the same stream for both
    y = step(norm, x)
    batch_stat.append(float(jnp.mean(x**2)))
    used.append(float(jnp.mean(jnp.mean(x**2, 0) / jnp.mean(y**2, 0))))
    running.append(float(jnp.mean(norm.running_var[...])))
    skips.append(int(norm.skip_count[...]))
  return dict(batch=np.array(batch_stat), used=np.array(used),
              running=np.array(running), skips=np.array(skips))


plain, filtered = stream(False), stream(True)
skipped_at = np.nonzero(np.diff(filtered['skips'], prepend=0))[0] + 1
print('outlier batches (1-based steps):', [t + 1 for t in OUTLIERS])
print('batches UN skipped:', skipped_at.tolist())

# %%
t = np.arange(1, STEPS + 1)
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), sharey=True)
for ax, run, title in ((axes[0], plain, 'window smoothing only'),
                       (axes[1], filtered, 'with outlier filtration')):
  ax.plot(t, run['batch'], color='lightgray', label='batch statistic $s_t$')
  ax.plot(t, run['used'], label=r'normalised with $\sigma^2_t$')
  ax.plot(t, run['running'], '--', label='running R (evaluation)')
  ax.axvline(WARMUP, color='gray', lw=0.8)
  ax.set(yscale='log', xlabel='step', title=title)
for s in skipped_at:
  axes[1].axvline(s, color='red', lw=0.6, alpha=0.6)
axes[0].legend(fontsize=8)
fig.tight_layout()
fig.savefig(dynamics.figure_path('unified_norm.png'), dpi=110)

# %% [markdown]
# What the measurements say (printed below): smoothing narrows the spread of
# the statistic on ordinary batches, but an outlier inside the window lifts
# sigma2 for the next M_f - 1 steps. Filtration keeps the outlier out of the
# window (it stores R in its slot), so those steps are normalised as usual;
# the skipped batch itself is normalised with its own statistic, and R takes
# it in full. On a stream this noisy the filter also fires on many ordinary
# batches (it compares AM - GM with M_f times the window's variance of
# sqrt(F), one scalar for all channels).

# %%
outlier_steps = np.array(OUTLIERS) + 1                      # 1-based
in_window = np.array([np.any((s >= outlier_steps) & (s < outlier_steps + WINDOW))
                      for s in t])
ordinary = (t > WARMUP + WINDOW) & ~in_window
after = np.isin(t, np.concatenate([outlier_steps + k for k in range(1, WINDOW)])
                ) & ~np.isin(t, outlier_steps)
spread = lambda v: np.std(np.log(v[ordinary]))
level = np.median(plain['batch'][ordinary])
print(f'ordinary batches: log-spread of s_t {spread(plain["batch"]):.3f}, '
      f'of the smoothed sigma2 {spread(plain["used"]):.3f}')
print(f'steps after an outlier: sigma2 / typical level up to '
      f'{plain["used"][after].max() / level:.1f}x without filtration, '
      f'{filtered["used"][after].max() / level:.1f}x with it')
print(f'skipped: {len(skipped_at)} batches, {np.isin(outlier_steps, skipped_at).sum()} '
      f'of the {len(OUTLIERS)} outliers among them')
assert spread(plain['used']) < spread(plain['batch'])
assert filtered['used'][after].max() < plain['used'][after].max()
