"""Each norm's least memory traffic per training step: the one place it is written.

In arrays of x's size, as (forward, forward + backward) with the forward and
the backward run separately (a training step):

- per-token norms (LayerNorm, RMSNorm, GroupScaling): the forward reads x and
  writes y (2); the backward reads x and dy and writes dx (3): 5;
- PowerNorm after its warmup normalises by phi_{t-1}, known before the pass,
  and sums psi2 while it writes y: 2 and 5, as a per-token norm;
- PowerNorm in its warmup needs every row's statistic before any row is
  normalised, so its forward reads x twice: 3 and 6;
- the exact batch norms (BatchNorm, the paper's BN, PN-V) also read x twice
  in the forward, and x and dy twice in the backward (dx needs column sums
  over every row first): 3 and 8; so does UN (its correction needs the
  gradient statistic over every row first).

`benchmarks.norms` (CPU) and `benchmarks.accelerator` (GPU/TPU) hold each
norm to a share of these counts times its measured copy time.
"""

ARRAYS = {
    'LayerNorm': (2, 5), 'RMSNorm': (2, 5), 'GroupScaling': (2, 5),
    'BatchNorm': (3, 8), 'paper BN': (3, 8), 'PN-V': (3, 8),
    'PowerNorm': (2, 5), 'PowerNorm (warmup)': (3, 6), 'UN': (3, 8),
}
