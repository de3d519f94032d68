"""LayerNorm / RMSNorm speed over array sizes: normjax, flax.linen, PyTorch.

Run from the repository root:

    python -m benchmarks.sizes            # 2^14 .. 2^24 elements, ~2-3 min
    python -m benchmarks.sizes --quick    # 2^12 elements, 3 reps: CI smoke

x: f32 (rows, 1024), rows = N / 1024 for N = 2^14, 2^15, ..., 2^24 elements
(16 to 16384 rows; the quick run: 4 rows), standard normal + 0.5; dy
standard normal. Per size, in interleaved rounds
(`benchmarks.timing.timed_rounds`: after warm-up each round calls every
function once, torch's as a block of their own that starts with the
process's other threads idle; medians of wall times with block_until_ready):

* fwd: jitted forward, `y = norm(x)`; torch: the module under no_grad.
* fwd+bwd: a jitted `jax.grad` of sum(y * dy) wrt x and the params
  (as `benchmarks.norms._train_step`); torch: forward and `y.backward(dy)`.

for normjax (`normjax.functional.layer_norm` / `rms_norm`: the fused C++ CPU
kernel), flax.linen LayerNorm / RMSNorm (epsilon 1e-6, as normjax's) and
torch.nn.LayerNorm / RMSNorm (if torch is installed; threads = CPU count).
normjax threads rows on XLA's intra-op pool by default; "normjax own pool"
and "normjax spawn" are the same compiled function with the kernels' row
threading switched, at call time, to normjax's own persistent pool
(`cpu_kernel.row_threading(pool='own')`) and to the first path, std::threads
spawned per call (`pool='spawn'`); one thread per 2^18 elements in all three
(normjax/_src/kernel_rows.h), so the three are compared in the same rounds.
Their times include the switch (two ctypes calls and a Python wrapper: ~4 us
a call, visible below 2^19 elements, where one thread runs in all three).

Ratios (normjax / flax, normjax / torch, xla pool / own pool, xla pool /
spawn) are paired: the median over rounds of the two times of the same
round, so load drift on a shared machine cancels. GB/s counts the minimal
traffic in arrays of x.nbytes (N * 4 bytes): fwd reads x and writes y,
GB/s = 2 * 4N / t; fwd+bwd reads x and dy and writes y and dx,
GB/s = 4 * 4N / t (as benchmarks.norms).

Reps per size: as many rounds as fit in ~5 s (at least 15, at most 400).
The log-log figure (time vs elements, fwd+bwd and fwd, one line per
library) goes to benchmarks/figures/sizes.png ($TMPDIR in quick mode).
"""

import argparse
import os
import statistics
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.norms import machine_info, switched
from benchmarks.timing import paired_ratio, timed_rounds
from experiments.runtime import tune_malloc
from normjax import functional as nf
from normjax._src import cpu_kernel

FEATURES = 1024
SIZES = tuple(range(14, 25))  # log2 of the elements
QUICK_SIZES = (12,)  # 4 rows: a smoke run (the compiles dominate)
NORMS = ('LayerNorm', 'RMSNorm')
LIBS = ('normjax', 'normjax own pool', 'normjax spawn', 'flax', 'torch')
SWITCHED = {'normjax own pool': 'own', 'normjax spawn': 'spawn'}
MODES = ('fwd', 'fwd+bwd')
FIGURE = os.path.join(os.path.dirname(__file__), 'figures', 'sizes.png')
BUDGET_S = 5.0  # timed rounds per size


def _jax_cases(c: int) -> dict:
  """{(norm, lib): (apply(x, p) -> y, params)} for normjax and flax."""
  ones = jnp.ones((c,), jnp.float32)
  ln_p, rms_p = {'scale': ones, 'bias': jnp.zeros_like(ones)}, {'scale': ones}
  cases = {('LayerNorm', 'normjax'): (lambda x, p: nf.layer_norm(x, p)[0],
                                      ln_p),
           ('RMSNorm', 'normjax'): (lambda x, p: nf.rms_norm(x, p)[0], rms_p)}
  for norm, module, p in (('LayerNorm', nn.LayerNorm(epsilon=1e-6), ln_p),
                          ('RMSNorm', nn.RMSNorm(epsilon=1e-6), rms_p)):
    cases[norm, 'flax'] = (
        lambda x, p, module=module: module.apply({'params': p}, x), p)
  return cases


def _step(apply):
  """Jitted fwd+bwd: grads of sum(y * dy) wrt x and the params."""
  return jax.jit(jax.grad(lambda x, p, dy: jnp.sum(apply(x, p) * dy), (0, 1)))


def _torch_cases(x: np.ndarray, dy: np.ndarray) -> dict:
  """{(norm, 'torch', mode): fn} if torch is installed."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {}
  torch.set_num_threads(os.cpu_count() or 1)
  xt = torch.from_numpy(np.array(x)).requires_grad_(True)
  dyt = torch.from_numpy(np.array(dy))
  c, out = x.shape[-1], {}
  for norm, layer in (('LayerNorm', torch.nn.LayerNorm(c, eps=1e-6)),
                      ('RMSNorm', torch.nn.RMSNorm(c, eps=1e-6))):
    def fwd(layer=layer):
      with torch.no_grad():
        layer(xt)

    def fwd_bwd(layer=layer):
      xt.grad = None
      layer.zero_grad(set_to_none=True)
      layer(xt).backward(dyt)
    out[norm, 'torch', 'fwd'], out[norm, 'torch', 'fwd+bwd'] = fwd, fwd_bwd
  return out


def _library(key) -> str:  # torch's calls form a block of their own
  return 'torch' if key[1] == 'torch' else 'jax'


def _measure(log2n: int, features: int, reps: int | None) -> list[dict]:
  """Times every (norm, library, mode) at 2^log2n elements."""
  n = 1 << log2n
  rows = max(1, n // features)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((rows, features), np.float32) + 0.5)
  dy = jnp.asarray(rng.standard_normal((rows, features), np.float32))
  kernel = cpu_kernel.available()
  restore = cpu_kernel.row_threading() if kernel else None
  fns = {}
  for (norm, lib), (apply, p) in _jax_cases(features).items():
    fwd, step = jax.jit(apply), _step(apply)
    fns[norm, lib, 'fwd'] = (fwd, (x, p))
    fns[norm, lib, 'fwd+bwd'] = (step, (x, p, dy))
    if lib == 'normjax' and kernel:
      for name, mode in SWITCHED.items():
        fns[norm, name, 'fwd'] = (switched(fwd, restore, mode), (x, p))
        fns[norm, name, 'fwd+bwd'] = (switched(step, restore, mode),
                                      (x, p, dy))
  for key, fn in _torch_cases(np.asarray(x), np.asarray(dy)).items():
    fns[key] = (fn, ())
  if reps is None:  # as many rounds as fit in BUDGET_S
    probe = timed_rounds(fns, 1, 2, library=_library)
    round_ms = sum(statistics.median(v) for v in probe.values())
    reps = int(min(400, max(15, 1e3 * BUDGET_S / round_ms)))
  samples = timed_rounds(fns, 1, reps, library=_library)
  out = []
  for norm in NORMS:
    r = dict(norm=norm, log2n=log2n, elements=n, shape=(rows, features),
             reps=reps)
    for mode in MODES:
      for lib in LIBS:
        s = samples.get((norm, lib, mode))
        r[f'{lib} {mode} us'] = 1e3 * statistics.median(s) if s else None
      nj = samples[norm, 'normjax', mode]
      for lib, key in (('flax', 'vs flax'), ('torch', 'vs torch'),
                       ('normjax own pool', 'xla vs own'),
                       ('normjax spawn', 'xla vs spawn')):
        s = samples.get((norm, lib, mode))
        r[f'{key} {mode}'] = paired_ratio(nj, s) if s else None
      arrays = 2 if mode == 'fwd' else 4
      r[f'GB/s {mode}'] = arrays * 4 * n / (r[f'normjax {mode} us'] * 1e3)
    r['samples'] = {k[1:]: v for k, v in samples.items() if k[0] == norm}
    out.append(r)
  return out


def run(quick: bool = False, reps: int | None = None,
        sizes: tuple[int, ...] | None = None,
        features: int = FEATURES) -> list[dict]:
  """One dict per (norm, size): times in us, paired ratios, GB/s."""
  if sizes is None:
    sizes = QUICK_SIZES if quick else SIZES
  if quick and reps is None:
    reps = 3
  rows = []
  for log2n in sizes:
    rows += _measure(log2n, features, reps)
  return rows


def _fmt(v, fmt):
  return '—' if v is None else format(v, fmt)


COLUMNS = (  # header, key, format; per mode
    ('normjax us', 'normjax {} us', '.1f'),
    ('own pool us', 'normjax own pool {} us', '.1f'),
    ('spawn us', 'normjax spawn {} us', '.1f'),
    ('flax us', 'flax {} us', '.1f'),
    ('torch us', 'torch {} us', '.1f'),
    ('normjax / flax', 'vs flax {}', '.2f'),
    ('normjax / torch', 'vs torch {}', '.2f'),
    ('xla pool / own pool', 'xla vs own {}', '.2f'),
    ('xla pool / spawn', 'xla vs spawn {}', '.2f'),
    ('GB/s', 'GB/s {}', '.1f'))


def markdown(rows: list[dict]) -> str:
  """A table per mode (fwd+bwd, then fwd); one line per norm and size."""
  def cells(values):
    return '| ' + ' | '.join(values) + ' |'
  out = []
  for mode in ('fwd+bwd', 'fwd'):
    head = ['norm', 'shape', 'elements', 'reps'] + [h for h, _, _ in COLUMNS]
    out += [f'{mode}:', '', cells(head), cells('---' for _ in head)]
    for r in rows:
      out.append(cells(
          [r['norm'], f"{r['shape'][0]}x{r['shape'][1]}", f"2^{r['log2n']}",
           str(r['reps'])]
          + [_fmt(r[k.format(mode)], f) for _, k, f in COLUMNS]))
    out.append('')
  return '\n'.join(out).rstrip('\n')


def targets(rows: list[dict]) -> list[str]:
  """normjax <= flax and <= torch at every size, fwd+bwd and fwd."""
  lines = []
  for norm in NORMS:
    mine = [r for r in rows if r['norm'] == norm]
    for mode in MODES:
      for lib, key in (('flax', 'vs flax'), ('torch', 'vs torch')):
        label = f'{norm} {mode} vs {lib} at every size'
        got = [(r[f'{key} {mode}'], r['log2n']) for r in mine
               if r[f'{key} {mode}'] is not None]
        if not got:
          lines.append(f'{label}: not measured ({lib} is not installed)')
          continue
        worst, at = max(got)
        lines.append(f'{label}: {worst:.2f}x (worst, at 2^{at}; target <= 1.0:'
                     f' {"ok" if worst <= 1.0 else "MISSED"})')
  return lines


def figure(rows: list[dict], path: str = FIGURE) -> str:
  """Log-log time vs elements, a panel per (mode, norm); returns the path."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(2, len(NORMS), figsize=(11, 8), squeeze=False)
  for i, mode in enumerate(('fwd+bwd', 'fwd')):
    for j, norm in enumerate(NORMS):
      ax, pts = axes[i, j], [r for r in rows if r['norm'] == norm]
      for lib, style in zip(LIBS, ('o-', 'd:', 'x--', 's-', '^-')):
        xy = [(r['elements'], r[f'{lib} {mode} us']) for r in pts
              if r[f'{lib} {mode} us'] is not None]
        if xy:
          ax.plot(*zip(*xy), style, label=lib)
      ax.set_xscale('log', base=2)
      ax.set_yscale('log')
      ax.set_xlabel(f'elements (rows x {pts[0]["shape"][1]})' if pts
                    else 'elements')
      ax.set_ylabel(f'{mode} time (us)')
      ax.set_title(f'{norm} {mode}')
      ax.grid(True, which='both', alpha=0.3)
      ax.legend()
  fig.suptitle('LayerNorm / RMSNorm on the CPU by array size (f32, medians)')
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--quick', action='store_true',
                  help='2^12 elements, 3 reps: a smoke test for CI')
  ap.add_argument('--reps', type=int, default=None,
                  help='rounds per size (default: what fits in ~5 s)')
  ap.add_argument('--figure', default=None,
                  help=f'default {FIGURE} ($TMPDIR/sizes.png with --quick)')
  ap.add_argument('--no-malloc-tuning', action='store_true',
                  help="keep glibc's default (page faults on big buffers)")
  a = ap.parse_args(argv)
  malloc = tune_malloc(a.no_malloc_tuning)
  rows = run(a.quick, a.reps)
  path = a.figure or (os.path.join(tempfile.gettempdir(), 'sizes.png')
                      if a.quick else FIGURE)
  print('\n'.join([machine_info(malloc), '', markdown(rows), '',
                   *targets(rows), '', f'figure: {figure(rows, path)}']))


if __name__ == '__main__':
  main()
