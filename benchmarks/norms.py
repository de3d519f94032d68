"""Speed of normjax's norms against flax.linen, PyTorch and memory bandwidth.

Run from the repository root (both forms print the same report):

    python benchmarks/norms.py                       # (4096, 1024), ~30 s
    python -m benchmarks.norms --quick               # (256, 128), 3 reps, CI
    python benchmarks/norms.py --markdown bench.md   # also write the table

x: f32 (rows // 128, 128, features); the mask (~10% pads) matters only to
norms with batch statistics. fwd: jitted forward (training mode if
stateful). "(XLA path)" rows: the same function traced with the fused CPU
kernel off (`normjax.functional.use_cpu_kernel(False)`), i.e. before the
kernel. fwd+bwd: a jitted training step of the layer, `jax.grad` of
sum(y * dy) wrt x, params and the backward-statistics state (PowerNorm
`ema_gz`; UN `ema_gz`, `bwd_window`), returning y, the new state and grads.
Bound: jitted `jnp.copy(x)`, checked to write a new buffer. GB/s counts
minimal traffic in arrays of x.nbytes: fwd reads x, writes y (2); fwd+bwd
reads x, dy, writes y, dx (4); copy 2. After warm-up, each round calls
every function once, each library's functions (normjax, flax, torch, the
copy) as a block that starts with the process's other threads idle, in a
shuffled order (drift and cache effects hit all alike), every call after
the caches are evicted by every core (`benchmarks.timing`, where both are
measured); medians of wall times, with block_until_ready. The target ratios
are paired: the median over rounds of the two times of the same round.

PyTorch (optional: `pip install torch`, CPU): torch.nn.LayerNorm and RMSNorm
are timed in the same rounds, forward under no_grad and forward + backward
of (y * dy).sum(), with torch's threads set to the core count, and so is
the official PowerNorm algorithm written in torch (`benchmarks.torch_powernorm`,
the peer the performance issue names). Without torch those rows and targets
read "not measured".

"(own pool)" and "normal stores" rows: the same jitted functions with the
kernels' rows threaded on normjax's own pool instead of XLA's, and with y
and dx written by normal stores instead of streaming ones (`kernel_rows.h`),
switched at call time: the before of those two changes, in the same rounds.

Allocator: XLA:CPU mallocs each call's temp buffer (48-64 MiB for fwd+bwd
here) and glibc maps blocks >= 32 MiB afresh: a page fault per 4 KiB per
call, which made fwd+bwd 2-4x slower in this VM. Unless tcmalloc is
preloaded, main() sets glibc mallopt (1 arena, no mmap, no trim) so buffers
are reused; `--no-malloc-tuning` keeps glibc's default.
"""

import argparse
import os
import statistics

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import traffic
from benchmarks.timing import cache_evictor, paired_ratio, timed_rounds
from normjax import functional as nf
from normjax._src import cpu_kernel

FLAX_LN = 'flax LayerNorm'
XLA_LN = 'normjax LayerNorm (XLA path)'
TORCH_LN, TORCH_RMS = 'torch LayerNorm', 'torch RMSNorm'
TORCH_BN = 'torch BatchNorm (no mask)'
TORCH_PN = 'torch PowerNorm train (official algorithm)'
LN, RMS, BN = 'normjax LayerNorm', 'normjax RMSNorm', 'normjax BatchNorm (mask)'
BN_NO_MASK = 'normjax BatchNorm (no mask)'
PN, UN = 'normjax PowerNorm train (mask)', 'normjax UnifiedNorm train (mask)'
PN_WARMUP = 'normjax PowerNorm train, in warmup (mask)'
# Rows timed with the kernels' rows threaded on normjax's own pool instead of
# XLA's (cpu_kernel.row_threading): the before of that change, same rounds.
# (label, row, the row it switches)
LN_OWN, PN_OWN = f'{LN} (own pool)', f'{PN} (own pool)'
OWN_POOL = (('LayerNorm', LN_OWN, LN), ('PowerNorm train (mask)', PN_OWN, PN))
# Rows timed with the kernels writing y and dx with normal stores instead of
# streaming ones (cpu_kernel.stream_stores): the before of that change, same
# rounds. (label, row, the row it switches)
LN_RFO, PN_RFO = f'{LN} (normal stores)', f'{PN[:-1]}, normal stores)'
BN_RFO = f'{BN_NO_MASK[:-1]}, normal stores)'
NORMAL_STORES = (('LayerNorm', LN_RFO, LN), ('BatchNorm (no mask)', BN_RFO,
                                              BN_NO_MASK),
                 ('PowerNorm train (mask)', PN_RFO, PN))
FLAX_RMS, FLAX_BN = 'flax RMSNorm', 'flax BatchNorm (mask)'


def _torch_cases(x: np.ndarray, dy: np.ndarray, mask: np.ndarray):
  """{name: (fwd, fwd+bwd)} for torch.nn.LayerNorm/RMSNorm and the official
  PowerNorm algorithm (`benchmarks.torch_powernorm`), if torch is installed."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {}
  torch.set_num_threads(os.cpu_count() or 1)
  xt = torch.from_numpy(np.array(x)).requires_grad_(True)
  dyt = torch.from_numpy(np.array(dy))
  c = x.shape[-1]
  from benchmarks import torch_powernorm  # pylint: disable=g-import-not-at-top
  masked = (torch.from_numpy(np.array(mask)),)
  out = {}
  class RowBatchNorm(torch.nn.Module):  # BatchNorm1d over [rows, C] views
    def __init__(self):
      super().__init__()
      self.bn = torch.nn.BatchNorm1d(c, momentum=0.01)

    def forward(self, v):
      return self.bn(v.reshape(-1, c)).reshape(v.shape)

  for name, layer, args in (
      (TORCH_LN, torch.nn.LayerNorm(c, eps=1e-6), ()),
      (TORCH_RMS, torch.nn.RMSNorm(c, eps=1e-6), ()),
      (TORCH_BN, RowBatchNorm(), ()),
      (TORCH_PN, torch_powernorm.MaskPowerNorm(c, num_groups=4,
                                               warmup_steps=4000), masked)):
    def fwd(layer=layer, args=args):
      with torch.no_grad():
        layer(xt, *args)

    def fwd_bwd(layer=layer, args=args):
      xt.grad = None
      layer.zero_grad(set_to_none=True)
      layer(xt, *args).backward(dyt)
    out[name] = (fwd, fwd_bwd)
  return out


def _cases(c: int):
  """[(name, apply(x, mask, p, s) -> (y, s'), p, s, backward fields|None)]."""
  p = {'scale': jnp.ones((c,)), 'bias': jnp.zeros((c,))}
  p_scale, pn = {'scale': p['scale']}, dict(num_groups=4, warmup_steps=4000)
  none = nf.EmptyState()
  pn_warmup = nf.init_power_norm_state(c)  # step 0 of warmup_steps 4000
  pn_state = pn_warmup._replace(step=jnp.asarray(4000, pn_warmup.step.dtype))

  def nj(fn, **kw):  # per-token norms accept the mask and ignore it
    return lambda x, m, p, s: fn(x, p, s, mask=m, **kw)

  def xla_path(apply):  # traced with the fused CPU kernel off: the "before"
    def f(*args):
      with nf.use_cpu_kernel(False):
        return apply(*args)
    return f

  def flax_case(name, module, p):
    stats = module.init(jax.random.key(0), jnp.ones((2, 1, c))).get(
        'batch_stats')

    def apply(x, m, p, s):
      if stats is None:
        return module.apply({'params': p}, x), s
      y, new = module.apply({'params': p, 'batch_stats': s}, x,
                            mask=m[..., None], mutable=['batch_stats'])
      return y, new['batch_stats']
    return name, apply, p, stats or {}, ()

  return [
      ('normjax LayerNorm', nj(nf.layer_norm), p, none, ()),
      (XLA_LN, xla_path(nj(nf.layer_norm)), p, none, ()),
      flax_case(FLAX_LN, nn.LayerNorm(epsilon=1e-6), p),
      ('normjax RMSNorm', nj(nf.rms_norm), p_scale, none, ()),
      ('normjax RMSNorm (XLA path)', xla_path(nj(nf.rms_norm)), p_scale,
       none, ()),
      flax_case('flax RMSNorm', nn.RMSNorm(epsilon=1e-6), p_scale),
      ('normjax GroupScaling (4)', nj(nf.group_scaling, num_groups=4), None,
       none, ()),
      (BN, nj(nf.batch_norm), p, nf.init_batch_norm_state(c), ()),
      (BN_NO_MASK, lambda x, m, p, s: nf.batch_norm(x, p, s), p,
       nf.init_batch_norm_state(c), ()),
      ('normjax BatchNorm (mask, XLA path)', xla_path(nj(nf.batch_norm)), p,
       nf.init_batch_norm_state(c), ()),
      flax_case('flax BatchNorm (mask)',
                nn.BatchNorm(use_running_average=False), p),
      ('normjax paper BN (mask)', nj(nf.paper_batch_norm), p,
       nf.init_paper_batch_norm_state(c), ()),
      ('normjax paper BN (mask, XLA path)', xla_path(nj(nf.paper_batch_norm)),
       p, nf.init_paper_batch_norm_state(c), ()),
      ('normjax PN-V (mask)', nj(nf.pn_v, num_groups=4), p,
       nf.init_pn_v_state(c), ()),
      ('normjax PN-V (mask, XLA path)', xla_path(nj(nf.pn_v, num_groups=4)),
       p, nf.init_pn_v_state(c), ()),
      ('normjax PowerNorm train (mask)', nj(nf.power_norm, **pn), p, pn_state,
       ('ema_gz',)),
      ('normjax PowerNorm train (mask, XLA path)',
       xla_path(nj(nf.power_norm, **pn)), p, pn_state, ('ema_gz',)),
      (PN_WARMUP, nj(nf.power_norm, **pn), p, pn_warmup, ('ema_gz',)),
      ('normjax PowerNorm eval', nj(nf.power_norm, use_running_average=True,
                                    **pn), p, pn_state, None),
      ('normjax UnifiedNorm train (mask)',
       nj(nf.unified_norm, warmup_steps=4000), p,
       nf.init_unified_norm_state(c, 4), ('ema_gz', 'bwd_window')),
      ('normjax UnifiedNorm train (mask, XLA path)',
       xla_path(nj(nf.unified_norm, warmup_steps=4000)), p,
       nf.init_unified_norm_state(c, 4), ('ema_gz', 'bwd_window')),
  ]


def _train_step(apply, fields):
  """Jitted fwd+bwd: grads of sum(y * dy) wrt x, params, backward stats."""
  def step(x, dy, m, p, s):
    def loss(x, p, b):
      st = s._replace(**b) if b else s
      y, new = apply(x, m, p, st)
      return jnp.sum(y * dy), (y, new)
    b = {f: getattr(s, f) for f in fields}
    grads, (y, new) = jax.grad(loss, (0, 1, 2), has_aux=True)(x, p, b)
    return y, new, grads
  return jax.jit(step)


def switched(f, restore: tuple[str, int], mode: str):
  """`f` with the kernels' row threading on `mode` (a
  `cpu_kernel.ROW_THREADING`) for the call, through the raw ctypes switch
  (~0.3 us a call; with the wrapper ~4 us a timed call, measured where one
  thread runs); returns None once the result is ready, so that `timed_rounds`
  does not block again."""
  switch = cpu_kernel._row_threading_fn()  # pylint: disable=protected-access
  index = cpu_kernel.ROW_THREADING.index
  before, min_elements = index(restore[0]), int(restore[1])

  def call(*args):
    switch(index(mode), 0)
    try:
      jax.block_until_ready(f(*args))
    finally:
      switch(before, min_elements)
  return call


def stream_threshold(f, min_bytes: int):
  """`f` with the kernels' streaming-store threshold at `min_bytes` (0: the
  default; cpu_kernel.STREAM_NEVER: normal stores only) for the call,
  through the raw ctypes switch; returns None once the result is ready,
  before the switch goes back, since the kernels read it when they run."""
  switch = cpu_kernel._stream_bytes_fn()  # pylint: disable=protected-access

  def call(*args):
    before = switch(-1)
    switch(min_bytes)
    try:
      jax.block_until_ready(f(*args))
    finally:
      switch(before)
  return call


def run(rows: int = 4096, features: int = 1024, reps: int = 50,
        warmup: int = 5, quick: bool = False, torch: bool = True
        ) -> list[dict]:
  """Times every norm (and torch's, if installed and `torch`); one dict per
  row of the table."""
  if quick:
    rows, features, reps, warmup = 256, 128, 3, 1
  t = min(128, rows)
  if rows % t:
    raise ValueError(f'rows={rows} must be a multiple of {t}.')
  rng, shape = np.random.default_rng(0), (rows // t, t, features)
  x = jnp.asarray(rng.standard_normal(shape, np.float32) + 0.5)
  dy = jnp.asarray(rng.standard_normal(shape, np.float32))
  lengths = rng.integers(int(0.8 * t), t + 1, size=shape[0])
  mask = jnp.asarray(np.arange(t)[None, :] < lengths[:, None])

  copy = jax.jit(jnp.copy)  # XLA emits a `copy`; check it writes new memory
  if copy(x).unsafe_buffer_pointer() == x.unsafe_buffer_pointer():
    raise RuntimeError('the copy bound was optimised away')
  fns = {('copy', 'fwd'): (copy, (x,))}
  cases = _cases(features)
  for name, apply, p, s, fields in cases:
    fns[name, 'fwd'] = (jax.jit(apply), (x, mask, p, s))
    if fields is not None:
      fns[name, 'bwd'] = (_train_step(apply, fields), (x, dy, mask, p, s))
  switched_names = []  # the rows of OWN_POOL and NORMAL_STORES
  if cpu_kernel.available():
    restore = cpu_kernel.row_threading()
    for rows_switched, switch in (
        (OWN_POOL, lambda f: switched(f, restore, 'own')),
        (NORMAL_STORES,
         lambda f: stream_threshold(f, cpu_kernel.STREAM_NEVER))):
      for _, name, base in rows_switched:
        for kind in ('fwd', 'bwd'):
          f, args = fns[base, kind]
          fns[name, kind] = (switch(f), args)
        switched_names.append(name)
  torch_cases = (_torch_cases(np.asarray(x), np.asarray(dy), np.asarray(mask))
                 if torch else {})
  for name, (fwd, fwd_bwd) in torch_cases.items():
    fns[name, 'fwd'], fns[name, 'bwd'] = (fwd, ()), (fwd_bwd, ())
  samples = timed_rounds(fns, warmup, reps, None if quick else cache_evictor(),
                         library=lambda key: key[0].split()[0])
  ms = {k: statistics.median(v) for k, v in samples.items()}

  def gbps(n_arrays, t_ms):  # minimal traffic: n_arrays of x.nbytes
    return n_arrays * x.nbytes / (t_ms * 1e-3) / 1e9

  def row(name, f, b=None):
    c, bwd = ms['copy', 'fwd'], b is not None
    return dict(norm=name, shape=shape, reps=reps, fwd_ms=f, fwd_bwd_ms=b,
                samples=(samples[name, 'fwd'], samples.get((name, 'bwd'))),
                fwd_vs_flax_ln=f / ms[FLAX_LN, 'fwd'],
                fwd_bwd_vs_flax_ln=b / ms[FLAX_LN, 'bwd'] if bwd else None,
                fwd_gbps=gbps(2, f), fwd_bwd_gbps=gbps(4, b) if bwd else None,
                fwd_pct_copy=100 * c / f,
                fwd_bwd_pct_copy=200 * c / b if bwd else None)
  samples['copy (bound)', 'fwd'] = samples['copy', 'fwd']
  names = [n for n, *_ in cases] + switched_names + list(torch_cases)
  return [row('copy (bound)', ms['copy', 'fwd'])] + [
      row(n, ms[n, 'fwd'], ms.get((n, 'bwd'))) for n in names]


# Each trained norm's row and its least traffic in fwd+bwd, in arrays of x
# (`benchmarks.traffic`, where the counts are explained). The GB/s columns
# count 4; the bound targets count these.
TRAFFIC = {name: traffic.ARRAYS[family][1] for name, family in (
    (LN, 'LayerNorm'), (RMS, 'RMSNorm'),
    ('normjax GroupScaling (4)', 'GroupScaling'), (BN, 'BatchNorm'),
    (BN_NO_MASK, 'BatchNorm'), ('normjax paper BN (mask)', 'paper BN'),
    ('normjax PN-V (mask)', 'PN-V'), (PN, 'PowerNorm'),
    (PN_WARMUP, 'PowerNorm (warmup)'), (UN, 'UN'))}
BOUND_PCT = 85  # every trained norm's fwd+bwd, % of its own traffic bound
# label, norm, peer, bound, compared modes (0 fwd, 1 fwd+bwd): paired ratios.
TARGETS = (
    ('LayerNorm vs flax', LN, FLAX_LN, 1.0, (0, 1)),
    ('LayerNorm vs torch', LN, TORCH_LN, 1.0, (0, 1)),
    ('RMSNorm vs flax', RMS, FLAX_RMS, 1.0, (0, 1)),
    ('RMSNorm vs torch', RMS, TORCH_RMS, 1.0, (0, 1)),
    ('BatchNorm vs flax', BN, FLAX_BN, 1.0, (0, 1)),
    ('BatchNorm (no mask) vs torch', BN_NO_MASK, TORCH_BN, 1.0, (0, 1)),
    ('PowerNorm train fwd+bwd vs normjax LayerNorm', PN, LN, 1.25, (1,)))
BEFORE_AFTER = (  # label, after, before: the fused CPU kernel's effect
    ('LayerNorm', LN, XLA_LN),
    ('RMSNorm', RMS, 'normjax RMSNorm (XLA path)'),
    ('PowerNorm train', PN, 'normjax PowerNorm train (mask, XLA path)'),
    ('UnifiedNorm train', UN, 'normjax UnifiedNorm train (mask, XLA path)'),
    ('BatchNorm', BN, 'normjax BatchNorm (mask, XLA path)'),
    ('paper BN', 'normjax paper BN (mask)',
     'normjax paper BN (mask, XLA path)'),
    ('PN-V', 'normjax PN-V (mask)', 'normjax PN-V (mask, XLA path)'))


def bound_pct(row: dict, arrays: int) -> float:
  """fwd+bwd time at the copy bound for `arrays` arrays of x, % of the
  measured time (100: as fast as copying that much memory)."""
  return row['fwd_bwd_pct_copy'] * arrays / 4


def _switched_lines(samples: dict, switched_rows: tuple, what: str
                    ) -> list[str]:
  """'{label}, {what}: a/b fwd+bwd, fwd' for each (label, row, base) of
  `switched_rows` that was timed: the base row against its switched twin."""
  lines = []
  for label, name, base in switched_rows:
    if name in samples:
      r = [paired_ratio(samples[base][i], samples[name][i]) for i in (0, 1)]
      lines.append(f'{label}, {what}: {r[1]:.2f}x fwd+bwd, {r[0]:.2f}x fwd')
  return lines


def ratios(results: list[dict]) -> list[str]:
  """The performance targets, each marked ok or MISSED, then the kernels'
  before/after and the speed-up over the official PowerNorm in torch."""
  samples = {d['norm']: d['samples'] for d in results}
  rows = {d['norm']: d for d in results}
  lines = []
  for label, a, b, bound, modes in TARGETS:
    if b not in samples:
      lines.append(f'{label}: not measured ({b} is not installed)')
      continue
    r = {('fwd', 'fwd+bwd')[i]: paired_ratio(samples[a][i], samples[b][i])
         for i in modes}
    detail = ', '.join(f'{k} {v:.2f}x' for k, v in r.items())
    worst = max(r.values())
    lines.append(f'{label}: {worst:.2f}x  ({detail}; target <= {bound}: '
                 f'{"ok" if worst <= bound else "MISSED"})')
  for name, arrays in TRAFFIC.items():
    pct = bound_pct(rows[name], arrays)
    lines.append(f'{name} fwd+bwd at its own traffic bound ({arrays} arrays '
                 f'of x): {pct:.0f}% (target >= {BOUND_PCT}%: '
                 f'{"ok" if pct >= BOUND_PCT else "MISSED"})')
  for label, after, before in BEFORE_AFTER:
    r = [paired_ratio(samples[before][i], samples[after][i]) for i in (0, 1)]
    lines.append(f'{label}, fused CPU kernel vs XLA path: {r[1]:.2f}x faster '
                 f'fwd+bwd, {r[0]:.2f}x fwd')
  for switched_rows, what, pn, ln, both in (
      (OWN_POOL, "rows on XLA's pool / on normjax's own pool", PN_OWN, LN_OWN,
       "both on normjax's own pool"),
      (NORMAL_STORES, 'streaming stores / normal stores', PN_RFO, LN_RFO,
       'both with normal stores')):
    lines += _switched_lines(samples, switched_rows, what)
    if pn in samples and ln in samples:
      r = paired_ratio(samples[pn][1], samples[ln][1])
      lines.append(f'PowerNorm train fwd+bwd vs normjax LayerNorm, {both} '
                   f'(before): {r:.2f}x')
  if BN_RFO in samples and TORCH_BN in samples:
    r = [paired_ratio(samples[BN_RFO][i], samples[TORCH_BN][i])
         for i in (0, 1)]
    lines.append(f'BatchNorm (no mask) vs torch, normal stores (before): '
                 f'{r[1]:.2f}x fwd+bwd, {r[0]:.2f}x fwd')
  if TORCH_PN in samples:
    r = paired_ratio(samples[TORCH_PN][1], samples[PN][1])
    lines.append(f'PowerNorm train fwd+bwd, normjax vs the official '
                 f'algorithm in torch: {r:.1f}x faster')
  return lines


COLUMNS = (('norm', 'norm', 's'), ('fwd ms', 'fwd_ms', '.3f'),
           ('fwd+bwd ms', 'fwd_bwd_ms', '.3f'),
           ('fwd / flax LN fwd', 'fwd_vs_flax_ln', '.2f'),
           ('fwd+bwd / flax LN fwd+bwd', 'fwd_bwd_vs_flax_ln', '.2f'),
           ('GB/s fwd', 'fwd_gbps', '.1f'),
           ('GB/s fwd+bwd', 'fwd_bwd_gbps', '.1f'),
           ('% of copy bound fwd', 'fwd_pct_copy', '.0f'),
           ('% of copy bound fwd+bwd', 'fwd_bwd_pct_copy', '.0f'))


def markdown(results: list[dict]) -> str:
  def cells(values):
    return '| ' + ' | '.join(values) + ' |'
  lines = [cells(c[0] for c in COLUMNS), cells('---' for _ in COLUMNS)]
  for d in results:
    lines.append(cells('—' if d[k] is None else format(d[k], fmt)
                       for _, k, fmt in COLUMNS))
  return '\n'.join(lines)


def machine_info(malloc: str = '?') -> str:
  with open('/proc/cpuinfo') as fh:
    cpu = next((l.split(':', 1)[1].strip() for l in fh
                if l.startswith('model name')), '?')
  tcmalloc = 'tcmalloc' in os.environ.get('LD_PRELOAD', '')
  load = ', '.join(f'{v:.2f}' for v in os.getloadavg())
  return (f'cpu: {cpu}; cores: {os.cpu_count()}; load average: {load}\n'
          f'jax {jax.__version__}, flax {flax.__version__}, backend '
          f'{jax.default_backend()}; tcmalloc in LD_PRELOAD: '
          f"{'yes' if tcmalloc else 'no'}; malloc: {malloc}")


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--rows', type=int, default=4096)
  ap.add_argument('--features', type=int, default=1024)
  ap.add_argument('--reps', type=int, default=50)
  ap.add_argument('--warmup', type=int, default=5)
  ap.add_argument('--quick', action='store_true',
                  help='(256, 128), 3 reps: a smoke test for CI')
  ap.add_argument('--markdown', metavar='PATH', help='write the table here')
  ap.add_argument('--no-malloc-tuning', action='store_true',
                  help="keep glibc's default (page faults on big buffers)")
  a = ap.parse_args(argv)
  from experiments.runtime import tune_malloc  # pylint: disable=g-import-not-at-top
  malloc = tune_malloc(a.no_malloc_tuning)
  if not a.quick and a.reps < 20:
    ap.error('--reps must be >= 20 (use --quick for a smoke run)')
  results = run(a.rows, a.features, a.reps, a.warmup, a.quick)
  text = '\n'.join([
      machine_info(malloc),
      f"x: {results[0]['shape']} float32, medians of {results[0]['reps']} reps",
      '', markdown(results), '', *ratios(results)])
  print(text)
  if a.markdown:
    with open(a.markdown, 'w') as fh:
      fh.write(text + '\n')


if __name__ == '__main__':
  main()
