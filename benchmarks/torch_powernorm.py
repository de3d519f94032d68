"""PowerNorm in PyTorch as the official code computes it: the peer to time.

A re-statement of `MaskPowerNorm` (sIncerass/powernorm,
`fairseq/modules/norms/mask_powernorm.py`) from the project's specification
(`powernorm_un_spec.md` §1.3-1.4), in the official structure: `GroupScaling1D`
through ordinary autograd, then an `autograd.Function` whose backward is the
approximate one and updates `ema_gz` in place. It is not the official file
(that is not vendored here); `benchmarks/norms.py` times it next to normjax
when torch is installed, and `tests/benchmark_test.py` checks it against
`normjax.functional.power_norm` so that the comparison is like for like.
"""

from __future__ import annotations

import torch


class _PowerFunction(torch.autograd.Function):
  """z = x / d with the official approximate backward (spec §1.4)."""

  @staticmethod
  def forward(ctx, x, weight, bias, running_phi, ema_gz, mask, eps,
              alpha_fwd, alpha_bkw, step, warmup):
    ctx.eps, ctx.alpha_bkw = eps, alpha_bkw
    var = (x[mask] ** 2).mean(dim=0)  # psi_B^2 over the real rows
    if step <= warmup:
      z = x / (var + eps).sqrt()
    else:
      z = x / (running_phi + eps).sqrt()
    y = weight * z + bias
    ctx.save_for_backward(z, var, weight, ema_gz)
    if step < warmup:
      running_phi.mul_((step - 1) / step).add_(var / step)
    running_phi.mul_(alpha_fwd).add_((1 - alpha_fwd) * var)
    return y

  @staticmethod
  def backward(ctx, dy):
    z, var, weight, ema_gz = ctx.saved_tensors
    g = dy * weight
    approx = g - (1 - ctx.alpha_bkw) * ema_gz * z
    ema_gz.add_((approx * z).mean(dim=0))  # over all rows, pads included
    dx = approx / (var + ctx.eps).sqrt()
    return (dx, (dy * z).sum(dim=0), dy.sum(dim=0), None, None, None, None,
            None, None, None, None)


class MaskPowerNorm(torch.nn.Module):
  """x [..., C] and mask [...] (True for real tokens), as normjax's layout."""

  def __init__(self, features: int, num_groups: int = 1,
               warmup_steps: int = 10000, eps: float = 1e-5,
               alpha_fwd: float = 0.9, alpha_bkw: float = 0.9):
    super().__init__()
    self.weight = torch.nn.Parameter(torch.ones(features))
    self.bias = torch.nn.Parameter(torch.zeros(features))
    self.register_buffer('running_phi', torch.ones(features))
    self.register_buffer('ema_gz', torch.zeros(features))
    self.num_groups, self.warmup_steps, self.eps = num_groups, warmup_steps, eps
    self.alpha_fwd, self.alpha_bkw, self.iters = alpha_fwd, alpha_bkw, 0

  def group_scaling(self, x):
    """GroupScaling1D: x / sqrt(mean over each group of x^2 + 1e-5)."""
    shape = x.shape
    xg = x.reshape(*shape[:-1], self.num_groups, shape[-1] // self.num_groups)
    moment2 = (xg * xg).mean(dim=-1, keepdim=True)
    return (xg / (moment2 + 1e-5).sqrt()).reshape(shape)

  def forward(self, x, mask):
    self.iters += 1
    shape = x.shape
    xs = self.group_scaling(x).reshape(-1, shape[-1])
    y = _PowerFunction.apply(
        xs, self.weight, self.bias, self.running_phi, self.ema_gz,
        mask.reshape(-1), self.eps, self.alpha_fwd, self.alpha_bkw,
        self.iters, self.warmup_steps)
    return y.reshape(shape)
