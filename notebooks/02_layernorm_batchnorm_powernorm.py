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
# # LayerNorm vs BatchNorm vs PN-V vs PowerNorm
#
# The same small Transformer LM (embedded story corpus) with each norm at every
# site: training curves, how far each norm's batch statistic strays from its
# running one, and how far PowerNorm's approximate gradient is from the exact
# gradient of the same forward pass (cosine similarity, `grad_cosine`:
# `normjax.functional.power_norm_autodiff` gives the exact one).
#
# PowerNorm's warmup is 40 steps here: before it the forward uses batch
# statistics, after it the running quadratic mean.

# %%
import matplotlib.pyplot as plt
import numpy as np

from experiments import dynamics

STEPS, EVERY, WARMUP = 200, 5, 40
SMALL = {'model.d_model': 64, 'model.ffn_dim': 128, 'data.batch_size': 16,
         'data.seq_len': 32}
KINDS = ('layernorm', 'batchnorm', 'pn_v', 'powernorm')
# The textbook (flax-style) masked BatchNorm; ptb_batchnorm is the paper's.
PRESETS = {k: f'ptb_{k}_flax,demo' if k == 'batchnorm' else f'ptb_{k},demo'
           for k in KINDS}
runs = {}
for kind in KINDS:
  overrides = dict(SMALL)
  if kind == 'powernorm':
    overrides.update({f'model.norms.{s}.warmup_steps': WARMUP
                      for s in ('decoder_attention', 'decoder_ffn')})
  runs[kind] = dynamics.probed_lm_run(
      PRESETS[kind], steps=STEPS, probe_every=EVERY, overrides=overrides,
      exact_gradient=kind == 'powernorm', name=kind)
  print(f'{kind:10s} {runs[kind].seconds:5.0f} s  final loss '
        f'{runs[kind].losses[-20:].mean():.3f}')

# %%
def smooth(v, k=10):
  return np.convolve(v, np.ones(k) / k, mode='valid')

fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
for kind, run in runs.items():
  axes[0].plot(np.arange(len(smooth(run.losses))) + 10, smooth(run.losses),
               label=kind)
axes[0].set(xlabel='step', ylabel='training loss (10-step mean)',
            title='training curves', ylim=(None, 6))
for kind in ('batchnorm', 'pn_v', 'powernorm'):
  metric = 'var_dist' if kind == 'batchnorm' else 'qm_dist'
  steps, values = runs[kind].mean_over_sites(metric)
  axes[1].plot(steps, values, label=f'{kind} ({metric})')
axes[1].set(yscale='log', xlabel='step',
            title='batch vs running statistic, mean over sites')
axes[1].legend()
steps, cosine = runs['powernorm'].series('model', 'grad_cosine')
axes[2].plot(steps, cosine, label='all parameters')
for site in runs['powernorm'].sites('grad_cosine'):
  if site.startswith('decoder/layer_'):
    axes[2].plot(*runs['powernorm'].series(site, 'grad_cosine'), ':',
                 label=site)
axes[2].axvline(WARMUP, color='gray', lw=0.8)
axes[2].set(xlabel='step', ylabel='cosine', ylim=(0, 1.02),
            title='PowerNorm: approximate vs exact gradient')
axes[2].legend(fontsize=8)
axes[0].legend()
fig.tight_layout()
fig.savefig(dynamics.figure_path('norm_comparison.png'), dpi=110)

# %%
steps, cosine = runs['powernorm'].series('model', 'grad_cosine')
print(f'grad cosine in warmup: {cosine[steps <= WARMUP].mean():.3f}, '
      f'after: {cosine[steps > WARMUP].mean():.3f} '
      f'(min {cosine.min():.3f})')
assert np.all(np.isfinite(cosine)) and cosine.min() > 0
