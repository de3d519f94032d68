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
# # Folding: identical outputs, and what it buys at inference
#
# In evaluation BatchNorm, PN-V, PowerNorm and UN are per-channel affine maps
# of fixed statistics, so `experiments.fold.fold_affine` folds them into the
# next linear layer; a LayerNorm model becomes a pre-RMSNorm one
# (`to_pre_rmsnorm`). `benchmarks.inference.run` builds each pair, checks that
# the folded model's logits equal the original's, and times jitted forward
# passes in interleaved rounds (paired ratios against LayerNorm).
# This runs its small size; `python -m benchmarks.inference` the README's.

# %%
import matplotlib.pyplot as plt

from benchmarks import inference
from experiments import dynamics
from experiments.runtime import tune_malloc

malloc = tune_malloc()
result = inference.run(batch=8, length=64, d_model=128, layers=4, reps=15)
print(inference.report(result, malloc))

# %%
rows = result['rows']
fig, ax = plt.subplots(figsize=(7, 3.2))
ax.barh([r['model'] for r in rows], [r['speedup_vs_layernorm'] for r in rows])
ax.axvline(1.0, color='gray', lw=0.8)
ax.set(xlabel='tokens/s relative to LayerNorm (paired median)',
       title=f"d_model {result['size']['d_model']}, {result['size']['layers']} "
             f"layers, {result['batch']} x {result['size']['length']} tokens")
fig.tight_layout()
fig.savefig(dynamics.figure_path('folding.png'), dpi=110)

# %% [markdown]
# `run` raised if any folded model's logits differed from its original by
# more than 1e-5 of the largest logit; the deviations themselves are tested in
# `tests/experiments/fold_test.py`.
