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
# # Where the norm sits: gradient norm and activation variance by depth
#
# One 6-layer LayerNorm LM on the embedded corpus, five placements
# (`model.placement`): Post-LN (Vaswani et al.), Pre-LN, Peri-LN (a norm on
# both the input and the output of each sublayer), Mix-LN (Post-LN for the
# first quarter of the layers, Pre-LN after) and LayerNorm Scaling (Pre-LN with
# layer l's norm output times 1/sqrt(l)). The probes record every layer's
# gradient norm and the variance of every norm's input, which for Pre-LN is the
# residual stream. Means over the probed steps of a short run.

# %%
import matplotlib.pyplot as plt
import numpy as np

from experiments import dynamics

PLACEMENTS = ('post', 'pre', 'peri', 'mix', 'lns')
LAYERS, STEPS, EVERY = 6, 60, 5
runs = {
    p: dynamics.probed_lm_run(
        'ptb_layernorm,demo', steps=STEPS, probe_every=EVERY, name=p,
        overrides={'model.placement': p, 'model.num_decoder_layers': LAYERS,
                   'model.d_model': 64, 'model.ffn_dim': 128,
                   'data.batch_size': 16, 'data.seq_len': 32})
    for p in PLACEMENTS}
for p, run in runs.items():
  print(f'{p:5s} {run.seconds:4.0f} s, loss {run.losses[0]:.2f} -> '
        f'{run.losses[-10:].mean():.2f}')

# %%
def by_depth(run, metric, sites):
  return np.array([run.series(s, metric)[1].mean() for s in sites])

layers = [f'decoder/layer_{i}' for i in range(LAYERS)]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for p, run in runs.items():
  axes[0].plot(range(1, LAYERS + 1), by_depth(run, 'grad_norm', layers),
               'o-', label=p)
  sites = [s for s in run.sites('act_var') if s.endswith('attention_norm')]
  axes[1].plot(range(1, len(sites) + 1), by_depth(run, 'act_var', sites),
               'o-', label=p)
axes[0].set(yscale='log', xlabel='layer', ylabel='||grad||',
            title='gradient norm by depth')
axes[1].set(yscale='log', xlabel='layer',
            ylabel='variance of the attention norm input',
            title='activation variance by depth')
axes[0].legend()
fig.tight_layout()
fig.savefig(dynamics.figure_path('placements.png'), dpi=110)

# %% [markdown]
# Pre-LN's residual stream grows with depth while its gradients shrink towards
# the top (the "curse of depth" that LayerNorm Scaling targets); Post-LN keeps
# the stream at unit scale and its gradients are largest near the output.

# %%
for p, run in runs.items():
  g = by_depth(run, 'grad_norm', layers)
  sites = [s for s in run.sites('act_var') if s.endswith('attention_norm')]
  v = by_depth(run, 'act_var', sites)
  print(f'{p:5s} grad norm layer 1 / layer {LAYERS}: {g[0] / g[-1]:6.2f}   '
        f'input variance layer {LAYERS} / layer 1: {v[-1] / v[0]:7.2f}')
pre = by_depth(runs['pre'], 'act_var',
               [s for s in runs['pre'].sites('act_var')
                if s.endswith('attention_norm')])
assert pre[-1] > pre[0], 'the pre-LN residual stream should grow with depth'
