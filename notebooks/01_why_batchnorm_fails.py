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
# # Why BatchNorm fails in Transformers
#
# Shen et al. (ICML 2020, Fig. 2) compare how far a BatchNorm's *batch*
# statistics stray from its *running* statistics during training: for a CNN on
# images the distance shrinks and stays small; for a Transformer on text it
# stays large and fluctuates. The running statistics are what the model uses
# at evaluation, so a large gap means train and test see different networks.
#
# Here both sides are measured with the same probes (`normjax.probes`):
# `mean_dist` = (1/C) sum_c |mu_B - mu| and `var_dist` = (1/C) sum_c |sigma2_B - sigma2|,
# per BatchNorm, against the running statistics held before the batch.
# Images: scikit-learn's 8x8 digits (real, bundled). Text: the project's
# embedded story corpus with a 2-layer BatchNorm Transformer LM.

# %%
import matplotlib.pyplot as plt

from experiments import dynamics

STEPS, EVERY = 150, 5

# %%
cnn = dynamics.probed_cnn_run(steps=STEPS, probe_every=EVERY)
lm = dynamics.probed_lm_run(
    'ptb_batchnorm_flax,demo', steps=STEPS, probe_every=EVERY,
    overrides={'model.d_model': 64, 'model.ffn_dim': 128,
               'data.batch_size': 16, 'data.seq_len': 32},
    name='Transformer LM, text')
print(f'CNN: {cnn.seconds:.0f} s, loss {cnn.losses[0]:.2f} -> {cnn.losses[-1]:.2f}')
print(f'LM:  {lm.seconds:.0f} s, loss {lm.losses[0]:.2f} -> {lm.losses[-1]:.2f}')

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
for ax, metric, label in zip(axes, ('mean_dist', 'var_dist'),
                             (r'$|\mu_B-\mu|$', r'$|\sigma^2_B-\sigma^2|$')):
  for run, style in ((cnn, '-'), (lm, '-')):
    steps, values = run.mean_over_sites(metric)
    ax.plot(steps, values, style, label=run.name)
  ax.set_yscale('log')
  ax.set_xlabel('step')
  ax.set_title(f'{label}, mean over BatchNorm layers')
  ax.legend()
fig.tight_layout()
fig.savefig(dynamics.figure_path('bn_fluctuation.png'), dpi=110)

# %% [markdown]
# The last third of training, summarised (printed below). In this short
# run the variance statistic is the one that separates them: the image
# model's settles close to its running value, the text model's stays several
# times further away and keeps fluctuating, as in the paper's Fig. 2 (5x
# at d_model 64 here; about 25x in a 40-step run of the `demo` model, d_model
# 128). The mean
# statistic is about as far in both. The distances are absolute, so they
# also reflect each model's activation scale.

# %%
for run in (cnn, lm):
  for metric in ('mean_dist', 'var_dist'):
    steps, values = run.mean_over_sites(metric)
    tail = values[steps > 2 * STEPS // 3]
    print(f'{run.name:24s} {metric}: mean {tail.mean():.4f}, '
          f'std {tail.std():.4f} over steps > {2 * STEPS // 3}')
lm_tail = lm.mean_over_sites('var_dist')[1][-10:].mean()
cnn_tail = cnn.mean_over_sites('var_dist')[1][-10:].mean()
assert lm_tail > 3 * cnn_tail, (lm_tail, cnn_tail)
