"""The GPU/TPU path: norms in bf16 and f32 against the copy bandwidth, the
norms' results against the CPU, and the bf16 train steps' MFU.

On the lent machine (one GPU; no network needed), from the repository root:

    python -m benchmarks.accelerator --out=$OUT/accelerator.md

The project's GPU image (python3 3.12, jax 0.11 with CUDA, flax, optax,
orbax) lacks ml-collections, which the train steps' configs need (the other
sections run without it): carry its pure-Python wheel (76 KB; its needs,
absl-py and PyYAML, are there). Once, here, in the repository root:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: \
        --python-version 3.12 -d .whl ml-collections==1.1.0

and on the machine (carry `.whl`, timeout_s 420):

    python3 -m pip install -q --no-index --no-deps --no-compile \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site; \
    PYTHONUNBUFFERED=1 python3 -m benchmarks.accelerator \
        --out=$OUT/accelerator.md

It takes about 4-5 minutes on one H100 (a hard internal budget of 270 s, `--budget`;
sections past it are reported as skipped), writing the report to `--out`
and its raw numbers to the same path with `.json`, both rewritten after
every section so that a killed run still leaves what it measured. The
correctness check needs the CPU backend beside the GPU: a JAX_PLATFORMS
without 'cpu' gets it added.
Without a GPU/TPU it prints "skipped" unless `--force` (all sections on the
CPU at tiny sizes, a check of the script: 100-150 s on 2 cores, most of it
compiling the six train steps; `tests/accelerator_test.py`). `--size=smoke`
runs the tiny sizes on a GPU too (a first check, ~1 minute).

Entry points: `run(size='', out=None, budget_s=None, ...)` -> a dict of raw
numbers ('smoke' for tiny sizes), `markdown(result)` -> the report, as
`python -m benchmarks` calls them.

Sections, each in its own try (an error is printed in the report and the
next section runs):

1. Device: kind, memory, jax version; the copy bandwidth measured (a jitted
   copy of a 1 GiB array, checked to write a new buffer; bf16 and f32;
   2 x bytes / time); the matmul peak measured (jitted 8192^3 matmul, bf16,
   f32 at default precision and at `highest`).
2. Correctness against the CPU: each normjax norm's jitted train-mode
   fwd+bwd (y, new state, grads of sum(y * dy) wrt x, params and the
   backward statistics) on the accelerator and on `jax.devices('cpu')[0]`
   from the same inputs: f32 against f32 (tolerance `F32_TOL`), bf16 inputs
   against f32 on the CPU of the same (bf16-rounded) values (`BF16_TOL`).
   The error of each array is max|a - b| / max|b|; a norm PASSes when every
   array is within tolerance. Where the default backend is not the CPU the
   fused CPU kernel must never have been built or called
   (`cpu_kernel._load` never ran): checked at the end of the run too.
3. Norms: every trained norm and flax.linen's LayerNorm/RMSNorm/BatchNorm
   (peers) at `SHAPES`, bf16 and f32, params f32 (as in a bf16 model), fwd
   (training mode) and fwd+bwd as in 2. Each call is timed as a burst of
   `calls` back-to-back dispatches ended by one `block_until_ready`
   (per-call time = burst / calls, so the launch latency overlaps), rounds
   interleaved in a shuffled order; medians. GB/s counts the interface
   traffic (fwd 2, fwd+bwd 4 arrays of x.nbytes: x, dy in, y, dx out);
   "% copy" is that over the measured copy bandwidth of the dtype;
   "% copy (algorithm)" counts each norm's own minimal traffic of a
   separate forward and backward (`TRAFFIC`). A "launch floor" row times a
   trivial jitted function the same way: at (32, 128, 1024) a call can be
   shorter than its dispatch (then it reads near the floor); the larger
   shape is the bandwidth measurement.
4. Train steps: translation (the `wmt` model, 6+6 layers of d 1024, on the
   synthetic task, `TRANSLATION_TOKENS` target tokens per step) and the
   LM (`ptb_*`, the paper's PTB model) with `model.dtype='bfloat16'`,
   LayerNorm, PowerNorm, then UN while the budget lasts: compile time,
   step time (a burst of `steps` steps on one batch), tokens/s (non-pad
   target tokens) and MFU = model FLOP/s / the measured bf16 peak, with
   the model FLOPs per token of `experiments.sweeps.cost.flops_per_step`
   (6 x weights passed + attention; the vocabulary the experiment built).

Time on an H100 (estimated; nothing here was run on a GPU yet): ~10 s to
import and start, ~5 s device, ~20 s correctness (16 GPU and 8 CPU
compiles), ~60 s norms (88 GPU compiles of ~0.3-1 s, the norms stop
starting new (shape, dtype) groups at 55% of the budget), then train steps
in the order LM/translation x LayerNorm, PowerNorm, UN, each started only
while the budget has room for its set-up and compile (`COMPILE_GUESS_S`;
10-60 s each on a GPU, the wmt-size model the longest).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import traffic
from benchmarks.norms import _train_step  # norms imports no `experiments`
from normjax import functional as nf
from normjax._src import cpu_kernel

TRAFFIC = traffic.ARRAYS  # (fwd, fwd+bwd) arrays of x per norm family
SHAPES = {'': ((32, 128, 1024), (256, 128, 2048)), 'smoke': ((2, 16, 64),)}
DTYPES = ('bfloat16', 'float32')
F32_TOL, BF16_TOL = 1e-4, 2e-2  # bf16 on the CPU: <= 3.4e-3
TRANSLATION_TOKENS = 8192
COMPILE_GUESS_S = {'lm': 30.0, 'translation': 75.0}  # set-up + compile
BUDGET_S = 270.0
TRAIN_NORMS = ('layernorm', 'powernorm', 'unified')
TASKS = ('lm', 'translation')


class Budget:
  """Seconds left of the run's time budget."""

  def __init__(self, seconds: float):
    self.seconds, self.start = seconds, time.perf_counter()

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def left(self) -> float:
    return self.seconds - self.elapsed()


class OutOfTime(Exception):
  pass


# ----------------------------------------------------------------- device --


def device_info() -> dict:
  dev = jax.devices()[0]
  try:
    stats = dev.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  return dict(backend=jax.default_backend(), platform=dev.platform,
              kind=dev.device_kind, count=jax.device_count(),
              memory_gib=stats.get('bytes_limit', 0) / 2**30,
              jax=jax.__version__)


def burst_ms(f: Callable, args: tuple, calls: int) -> float:
  """ms per call of `calls` back-to-back dispatches and one block."""
  t0 = time.perf_counter()
  for _ in range(calls):
    out = f(*args)
  jax.block_until_ready(out)
  return 1e3 * (time.perf_counter() - t0) / calls


def best_ms(f: Callable, args: tuple, rounds: int, calls: int) -> float:
  jax.block_until_ready(f(*args))  # compiles
  return min(burst_ms(f, args, calls) for _ in range(rounds))


def copy_bandwidth(nbytes: int, dtype: str, rounds: int = 5,
                   calls: int = 5) -> float:
  """GB/s of a jitted copy (read + write) of an nbytes array."""
  x = jnp.full((nbytes // jnp.dtype(dtype).itemsize,), 1.5, dtype)
  copy = jax.jit(jnp.copy)
  y = copy(x)
  if y.unsafe_buffer_pointer() == x.unsafe_buffer_pointer():
    raise RuntimeError('the copy was optimised away')
  if float(y[-1]) != 1.5:
    raise RuntimeError('the copy wrote wrong values')
  return 2 * x.nbytes / (1e-3 * best_ms(copy, (x,), rounds, calls)) / 1e9


def matmul_peak(n: int, dtype: str, precision=None, rounds: int = 5,
                calls: int = 5) -> float:
  """FLOP/s of a jitted n^3 matmul (best burst)."""
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), dtype)
  b = jax.random.normal(kb, (n, n), dtype)
  f = jax.jit(lambda a, b: jnp.matmul(a, b, precision=precision))
  return 2 * n**3 / (1e-3 * best_ms(f, (a, b), rounds, calls))


def device_section(size: str) -> dict:
  smoke = size == 'smoke'
  nbytes, n = (2**22, 256) if smoke else (2**30, 8192)
  info = device_info()
  info.update(copy_bytes=nbytes, matmul_n=n, errors=[])

  def measure(label, fn, *args):  # one failure leaves the others
    try:
      return fn(*args)
    except Exception as e:  # pylint: disable=broad-except
      info['errors'].append(f'{label}: {_error(e)}')
      return math.nan
  info['copy_gbps'] = {d: measure(f'copy {d}', copy_bandwidth, nbytes, d)
                       for d in DTYPES}
  info['peak_tflops'] = {
      label: measure(label, matmul_peak, n, dtype, precision) / 1e12
      for label, dtype, precision in (
          ('bfloat16', 'bfloat16', None), ('float32', 'float32', None),
          ('float32 (precision=highest)', 'float32',
           jax.lax.Precision.HIGHEST))}
  return info


# ------------------------------------------------------------------ norms --


@dataclasses.dataclass
class Case:
  """One norm: apply(x, mask, params, state) -> (y, state); init(c) ->
  (params, state); the backward-statistics fields differentiated."""
  name: str
  family: str  # key of TRAFFIC
  apply: Callable
  init: Callable
  fields: tuple[str, ...] = ()
  peer: bool = False  # flax.linen: timed, not compared against the CPU

  def __post_init__(self):
    self.fwd = jax.jit(self.apply)
    self.step = _train_step(self.apply, self.fields)


def _affine(c: int) -> dict:
  return {'scale': jnp.ones((c,)), 'bias': jnp.zeros((c,))}


def _normjax(name, family, fn, state_init, fields=(), scale_only=False,
             **kw) -> Case:
  def init(c):
    p = _affine(c)
    if scale_only:
      p = {'scale': p['scale']}
    if family == 'GroupScaling':
      p = None
    return p, state_init(c)

  def apply(x, m, p, s):  # per-token norms accept the mask and ignore it
    return fn(x, p, s, mask=m, **kw)
  return Case(name, family, apply, init, fields)


def _flax(name, family, make: Callable[[], nn.Module]) -> Case:
  module = make()

  def init(c):
    variables = module.init(jax.random.key(0), jnp.ones((2, 1, c)))
    return variables['params'], variables.get('batch_stats', {})

  def apply(x, m, p, s):
    if not s:
      return module.apply({'params': p}, x), s
    y, new = module.apply({'params': p, 'batch_stats': s}, x,
                          mask=m[..., None], mutable=['batch_stats'])
    return y, new['batch_stats']
  return Case(name, family, apply, init, peer=True)


def norm_cases(dtype: str) -> list[Case]:
  """Every trained norm of normjax, then the flax.linen peers (computing in
  `dtype`, params f32)."""
  none = lambda c: nf.EmptyState()  # pylint: disable=unnecessary-lambda-assignment
  pn = dict(num_groups=4, warmup_steps=4000)
  d = jnp.dtype(dtype)
  return [
      _normjax('LayerNorm', 'LayerNorm', nf.layer_norm, none),
      _normjax('RMSNorm', 'RMSNorm', nf.rms_norm, none, scale_only=True),
      _normjax('GroupScaling (4)', 'GroupScaling', nf.group_scaling, none,
               num_groups=4),
      _normjax('BatchNorm', 'BatchNorm', nf.batch_norm,
               nf.init_batch_norm_state),
      _normjax('paper BN (paper_batch_norm)', 'paper BN',
               nf.paper_batch_norm, nf.init_paper_batch_norm_state),
      _normjax('PN-V', 'PN-V', nf.pn_v, nf.init_pn_v_state, num_groups=4),
      _normjax('PowerNorm', 'PowerNorm (warmup)', nf.power_norm,
               nf.init_power_norm_state, ('ema_gz',), **pn),
      _normjax('PowerNorm after warmup', 'PowerNorm', nf.power_norm,
               lambda c: nf.init_power_norm_state(c)._replace(
                   step=jnp.asarray(pn['warmup_steps'], jnp.int32)),
               ('ema_gz',), **pn),
      _normjax('UN (unified_norm)', 'UN', nf.unified_norm,
               lambda c: nf.init_unified_norm_state(c, 4),
               ('ema_gz', 'bwd_window'), warmup_steps=4000),
      _flax('flax LayerNorm', 'LayerNorm',
            lambda: nn.LayerNorm(epsilon=1e-6, dtype=d)),
      _flax('flax RMSNorm', 'RMSNorm',
            lambda: nn.RMSNorm(epsilon=1e-6, dtype=d)),
      _flax('flax BatchNorm', 'BatchNorm',
            lambda: nn.BatchNorm(use_running_average=False, dtype=d)),
  ]


def norm_inputs(shape, seed: int = 0):
  """f32 numpy x, dy and a mask with ~10% pads."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape, np.float32) + 0.5
  dy = rng.standard_normal(shape, np.float32)
  t = shape[1]
  lengths = rng.integers(int(0.8 * t), t + 1, size=shape[0])
  mask = np.arange(t)[None, :] < lengths[:, None]
  return x, dy, mask


def device_inputs(shape, dtype: str):
  """x, dy and a ~10%-pad mask made on the default device (fast at any
  size; the correctness check uses `norm_inputs`)."""
  kx, kd, km = jax.random.split(jax.random.key(0), 3)
  x = (jax.random.normal(kx, shape) + 0.5).astype(dtype)
  dy = jax.random.normal(kd, shape).astype(dtype)
  t = shape[1]
  lengths = jax.random.randint(km, (shape[0], 1), int(0.8 * t), t + 1)
  return x, dy, jnp.arange(t)[None, :] < lengths


def _put(tree, device):
  return jax.device_put(tree, device)


def time_group(fns: dict, rounds: int, calls: int
               ) -> tuple[dict, dict, dict]:
  """{key: median ms per call}, {key: compile+first-call s}, {key: error};
  rounds of bursts, one per function, in a shuffled order. A function
  whose first call fails is left out (its error kept)."""
  first, errors = {}, {}
  for k, (f, args) in list(fns.items()):
    t0 = time.perf_counter()
    try:
      jax.block_until_ready(f(*args))
    except Exception as e:  # pylint: disable=broad-except
      errors[k] = _error(e)
      del fns[k]
    first[k] = time.perf_counter() - t0
  samples, order, rng = {k: [] for k in fns}, list(fns), random.Random(0)
  for _ in range(rounds):
    rng.shuffle(order)
    for k in order:
      samples[k].append(burst_ms(*fns[k], calls))
  return {k: statistics.median(v) for k, v in samples.items()}, first, errors


def bench_group(cases: list[Case], shape, dtype: str, copy_gbps: float,
                rounds: int, calls: int, forward: bool = True) -> list[dict]:
  """Rows of one (shape, dtype): launch floor, copy, every case (its fwd
  only if `forward`, and fwd+bwd)."""
  dev = jax.devices()[0]
  x, dy, mask = _put(device_inputs(shape, dtype), dev)
  floor = jax.jit(lambda x: x[0, 0, :1])
  fns = {('launch floor', 'fwd'): (floor, (x,)),  # the bursts' floor
         ('copy (same x)', 'fwd'): (jax.jit(jnp.copy), (x,))}
  for case in cases:
    p, s = _put(case.init(shape[-1]), dev)
    if forward:
      fns[case.name, 'fwd'] = (case.fwd, (x, mask, p, s))
    fns[case.name, 'bwd'] = (case.step, (x, dy, mask, p, s))
  ms, first, errors = time_group(fns, rounds, calls)
  rows = []
  for name in ['launch floor', 'copy (same x)'] + [c.name for c in cases]:
    case = next((c for c in cases if c.name == name), None)
    f, b = ms.get((name, 'fwd')), ms.get((name, 'bwd'))
    row = dict(norm=name, shape=list(shape), dtype=dtype, fwd_ms=f,
               fwd_bwd_ms=b, compile_s=first.get((name, 'fwd'), 0.0)
               + first.get((name, 'bwd'), 0.0),
               algorithm_arrays=TRAFFIC[case.family] if case else None,
               error=errors.get((name, 'bwd'), errors.get((name, 'fwd'))))
    if name != 'launch floor':
      row.update(traffic(f, b, row['algorithm_arrays'], x.nbytes, copy_gbps))
    rows.append(row)
  return rows


def traffic(fwd_ms, fwd_bwd_ms, arrays, nbytes: int, copy_gbps: float
            ) -> dict:
  """GB/s at the interface traffic (fwd 2, fwd+bwd 4 arrays of nbytes) and
  % of the copy bandwidth, also at the algorithm's own `arrays`."""
  def gbps(n, ms):
    return n * nbytes / (1e-3 * ms) / 1e9
  out = {}
  for key, ms, interface, i in (('fwd', fwd_ms, 2, 0),
                                ('fwd_bwd', fwd_bwd_ms, 4, 1)):
    if not ms:
      continue
    out[f'{key}_gbps'] = gbps(interface, ms)
    out[f'{key}_pct_copy'] = 100 * out[f'{key}_gbps'] / copy_gbps
    if arrays:
      out[f'{key}_pct_copy_algorithm'] = 100 * gbps(arrays[i], ms) / copy_gbps
  return out


def norms_section(cases: dict, size: str, copy_gbps: dict, budget: Budget,
                  stop_at: float, forward: bool = True) -> dict:
  """Every (shape, dtype) group while the run is before `stop_at` s."""
  rounds, calls = (2, 2) if size == 'smoke' else (10, 10)
  rows, skipped = [], []
  for shape in SHAPES[size]:
    for dtype in DTYPES:
      if budget.elapsed() > stop_at:
        skipped.append(f'{shape} {dtype}')
        continue
      rows += bench_group(cases[dtype], shape, dtype, copy_gbps[dtype],
                          rounds, calls, forward)
  return dict(rows=rows, skipped=skipped, rounds=rounds, calls=calls,
              forward=forward)


# ------------------------------------------------------------ correctness --


def kernel_guard() -> dict:
  """Where the default backend is not the CPU, the fused CPU kernel must
  never have been built or called (`cpu_kernel._load` never ran)."""
  backend = jax.default_backend()
  built = cpu_kernel._load.cache_info().currsize > 0  # pylint: disable=protected-access
  applies = backend != 'cpu'
  return dict(backend=backend, kernel_loaded=built, applies=applies,
              ok=not (applies and built))


def run_step(case: Case, device, x, dy, mask, dtype: str):
  """(y, new state, grads) of the case's fwd+bwd on `device`, as f32 numpy."""
  p, s = case.init(x.shape[-1])
  args = _put((jnp.asarray(x, dtype), jnp.asarray(dy, dtype),
               jnp.asarray(mask), p, s), device)
  out = case.step(*args)
  return jax.tree.map(lambda a: np.asarray(a, np.float32), out)


def accelerator_outputs(case: Case, x, dy, mask, dtype: str):
  """The case's outputs on the default device (a seam for tests)."""
  return run_step(case, jax.devices()[0], x, dy, mask, dtype)


OUTPUTS = ('y', 'state', 'dx', 'dparams', 'dstats')  # of Case.step


def _label(path) -> str:
  """'dparams['scale']' for the path (2, 1, 'scale') of step's output."""
  keys = jax.tree_util.keystr(path)
  first, rest = path[0].idx, jax.tree_util.keystr(path[1:])
  if first == 2:
    first, rest = 2 + path[1].idx, jax.tree_util.keystr(path[2:])
  return (OUTPUTS[first] + rest) if first < len(OUTPUTS) else keys


def relative_errors(got, want) -> dict[str, float]:
  """{array: max|got - want| / max|want|} over step's output tree."""
  errors = {}
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree.leaves(want)):
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    diff = float(np.max(np.abs(a - b))) if b.size else 0.0
    if not np.all(np.isfinite(a)):
      diff = math.inf
    errors[_label(path)] = diff / scale if scale else diff
  return errors


def check_case(case: Case, f32_case: Case, x, dy, mask, dtype: str) -> dict:
  """The case on the accelerator in `dtype` against f32 on the CPU."""
  cpu = jax.devices('cpu')[0]
  if dtype != 'float32':  # the CPU sees the same (rounded) values
    x = np.asarray(jnp.asarray(x, dtype), np.float32)
    dy = np.asarray(jnp.asarray(dy, dtype), np.float32)
  got = accelerator_outputs(case, x, dy, mask, dtype)
  want = run_step(f32_case, cpu, x, dy, mask, 'float32')
  errors = relative_errors(got, want)
  groups = {'y': ('y',), 'state': ('state',),
            'grads': ('dx', 'dparams', 'dstats')}
  worst = {n: max((e for k, e in errors.items() if k.startswith(prefixes)),
                  default=0.0) for n, prefixes in groups.items()}
  tol = F32_TOL if dtype == 'float32' else BF16_TOL
  worst_path = max(errors, key=errors.get)
  return dict(norm=case.name, dtype=dtype, tol=tol, worst=worst,
              worst_array=worst_path, max_rel_error=errors[worst_path],
              passed=all(e <= tol for e in errors.values()))


def correctness_section(cases: dict, size: str) -> dict:
  shape = SHAPES[size][0]
  x, dy, mask = norm_inputs(shape, seed=1)
  rows = []
  f32 = {c.name: c for c in cases['float32']}
  for dtype in ('float32', 'bfloat16'):
    for case in cases[dtype]:
      if case.peer:
        continue
      try:
        rows.append(check_case(case, f32[case.name], x, dy, mask, dtype))
      except Exception as e:  # pylint: disable=broad-except
        rows.append(dict(norm=case.name, dtype=dtype, passed=False,
                         error=_error(e)))
  guard = kernel_guard()
  return dict(shape=list(shape), rows=rows, kernel_guard=guard,
              passed=all(r['passed'] for r in rows) and guard['ok'])


# ------------------------------------------------------------ train steps --

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the train steps' code path imports of the `experiments` extra (not
# tensorflow_datasets, array_record, tensorboardX, matplotlib: the GPU
# image lacks those, and ml_collections, which must be carried as a wheel).
TRAIN_NEEDS = ('ml_collections', 'optax', 'orbax.checkpoint', 'sacrebleu',
               'sentencepiece', 'tqdm', 'absl')


def import_experiments() -> None:
  """Makes `import experiments` work where its extra is only partly
  installed: its import-time check (which exits) is narrowed to
  `TRAIN_NEEDS`; a missing one of those raises here."""
  if 'experiments' in sys.modules:
    return
  path = os.path.join(ROOT, 'experiments', '_requirements.py')
  spec = importlib.util.spec_from_file_location('experiments._requirements',
                                                path)
  requirements = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(requirements)
  needed = {m: d for m, d in requirements.REQUIRED.items()
            if m in TRAIN_NEEDS}
  absent = requirements.missing(needed)
  if absent:
    raise RuntimeError(f'the train steps need {absent} (not installed): '
                       'carry their wheels (benchmarks.accelerator docstring)')
  requirements.check = lambda required=None: None
  sys.modules['experiments._requirements'] = requirements


def train_config(task: str, norm: str, size: str):
  """The preset with bf16 compute and synthetic data."""
  from experiments.configs import lm, wmt  # pylint: disable=g-import-not-at-top
  if task == 'lm':
    config = lm.get_config(f'ptb_{norm}' + (f',{size}' if size else ''))
  else:
    config = wmt.get_config(f'{norm},{size}' if size else norm)
  config.unlock()
  config.model.dtype = 'bfloat16'
  config.data.source = 'synthetic'
  if task == 'translation' and not size:  # the wmt model, synthetic task
    config.data.update(dict(vocab='word', vocab_size=0, lowercase=False,
                            max_len=64, max_tokens=TRANSLATION_TOKENS,
                            synthetic_train=4000, synthetic_valid=50,
                            synthetic_test=50))
  if task == 'lm' and not size:  # fewer synthetic lines: faster to make
    config.data.update(dict(synthetic_train_lines=5000,
                            synthetic_valid_lines=200,
                            synthetic_test_lines=200))
  config.lock()
  return config


def model_flops_per_token(task: str, norm: str, config, vocab: int) -> float:
  """experiments.sweeps.cost's training FLOPs per target token."""
  from experiments.sweeps import cost  # pylint: disable=g-import-not-at-top
  c = config.copy_and_resolve_references()
  c.unlock()
  c.data.vocab_size = vocab
  flops, tokens = cost.flops_per_step(
      'lm' if task == 'lm' else 'wmt', f'ptb_{norm}', c)
  return flops / tokens


def time_train_step(task: str, norm: str, size: str, steps: int,
                    peak_flops: float, workdir: str) -> dict:
  """Compile, then `steps` steps on one batch; one row."""
  from benchmarks.train_steps import _tokens  # pylint: disable=g-import-not-at-top
  from experiments import language_model, sharding, translation  # pylint: disable=g-import-not-at-top
  config = train_config(task, norm, size)
  t0 = time.perf_counter()
  module = language_model if task == 'lm' else translation
  exp = module.Experiment(config, workdir)
  setup_s = time.perf_counter() - t0
  params = sum(x.size for x in jax.tree.leaves(exp.state.params))
  raw = next(iter(exp.batcher))
  state = exp.state
  with jax.set_mesh(exp.mesh):
    batch = sharding.global_batch(raw, exp.mesh)
    t0 = time.perf_counter()
    state, metrics = exp.train_step(state, batch)
    jax.block_until_ready((state, metrics))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
      state, metrics = exp.train_step(state, batch)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - t0) / steps
  tokens = _tokens(raw)
  per_token = model_flops_per_token(task, norm, config, exp.data.vocab.size)
  tps = tokens / step_s
  loss = metrics.get('loss') if isinstance(metrics, dict) else None
  return dict(task=task, norm=norm, size=size or 'full', params=params,
              tokens=tokens, vocab=exp.data.vocab.size,
              batch_shape={k: list(np.shape(v)) for k, v in raw.items()},
              setup_s=setup_s, compile_s=compile_s, step_ms=1e3 * step_s,
              tokens_per_s=tps, flops_per_token=per_token,
              mfu=per_token * tps / peak_flops,
              loss=None if loss is None else float(loss))


def train_section(size: str, peak_flops: float, budget: Budget,
                  norms=TRAIN_NORMS, tasks=TASKS, steps: int | None = None,
                  on_row: Callable[[], None] = lambda: None) -> dict:
  steps = steps or (2 if size == 'smoke' else 10)
  import_experiments()
  rows, skipped, errors = [], [], []
  with tempfile.TemporaryDirectory() as tmp:
    for norm in norms:
      for task in tasks:
        guess = 0.0 if size == 'smoke' else COMPILE_GUESS_S[task]
        if budget.left() < guess:
          skipped.append(f'{task} {norm}')
          continue
        try:
          rows.append(time_train_step(task, norm, size, steps, peak_flops,
                                      os.path.join(tmp, f'{task}_{norm}')))
        except (Exception, SystemExit) as e:  # pylint: disable=broad-except
          errors.append(f'{task} {norm}: {_error(e)}')
        on_row()
  return dict(rows=rows, skipped=skipped, errors=errors, steps=steps)


# -------------------------------------------------------------------- run --


def _error(e: BaseException) -> str:
  return ''.join(traceback.format_exception(e)[-6:]).strip()


def _section(result: dict, name: str, fn: Callable[[], Any],
             budget: Budget, save: Callable[[], None]) -> Any:
  """Runs fn into result['sections'][name]; errors are recorded."""
  t0 = time.perf_counter()
  try:
    if budget.left() <= 0:
      raise OutOfTime(f'the {budget.seconds:.0f} s budget is spent')
    out = fn()
  except OutOfTime as e:
    out = dict(not_run=str(e))
  except (Exception, SystemExit) as e:  # pylint: disable=broad-except
    out = dict(error=_error(e))
  out['seconds'] = time.perf_counter() - t0
  result['sections'][name] = out
  save()
  print(f"accelerator: {name} done in {out['seconds']:.1f} s (run "
        f"{budget.elapsed():.0f} s){'; ERROR' if 'error' in out else ''}"
        f"{'; not run' if 'not_run' in out else ''}",
        file=sys.stderr, flush=True)
  return out


def save_report(result: dict, out: str | None) -> None:
  """The markdown report to `out`, the raw numbers beside it (.json)."""
  if not out:
    return
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, 'w') as fh:
    fh.write(markdown(result) + '\n')
  with open(os.path.splitext(out)[0] + '.json', 'w') as fh:
    json.dump(result, fh, indent=1, default=str)


def run(size: str = '', out: str | None = None,
        budget_s: float | None = None, train_norms=TRAIN_NORMS,
        tasks=TASKS, time_forward: bool = True) -> dict:
  """All sections; size '' (the full run) or 'smoke' (tiny, for tests).
  `time_forward=False` times the norms' fwd+bwd only (fewer compiles)."""
  budget = Budget(BUDGET_S if budget_s is None else budget_s)
  result = dict(size=size or 'full', budget_s=budget.seconds, sections={})

  def save():
    result['elapsed_s'] = budget.elapsed()
    save_report(result, out)

  device = _section(result, 'device', lambda: device_section(size), budget,
                    save)
  cases = {d: norm_cases(d) for d in DTYPES}
  _section(result, 'correctness', lambda: correctness_section(cases, size),
           budget, save)
  copy_gbps = device.get('copy_gbps') or {d: math.nan for d in DTYPES}
  _section(result, 'norms', lambda: norms_section(
      cases, size, copy_gbps, budget, stop_at=0.55 * budget.seconds,
      forward=time_forward),
           budget, save)
  peak = device.get('peak_tflops', {}).get('bfloat16', math.nan) * 1e12
  _section(result, 'train steps', lambda: train_section(
      size, peak, budget, train_norms, tasks, on_row=save), budget, save)
  result['kernel_guard'] = kernel_guard()
  save()
  return result


# --------------------------------------------------------------- markdown --


def _fmt(v, spec: str) -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return '—'
  return format(v, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  lines = ['| ' + ' | '.join(header) + ' |',
           '| ' + ' | '.join('---' for _ in header) + ' |']
  return lines + ['| ' + ' | '.join(r) + ' |' for r in rows]


def _device_md(d: dict) -> list[str]:
  lines = [f"device: {d['kind']} ({d['platform']}, {d['count']} device(s), "
           f"{d['memory_gib']:.1f} GiB), jax {d['jax']}, default backend "
           f"{d['backend']}"]
  lines += [f"copy bandwidth ({d['copy_bytes'] / 2**20:.0f} MiB, jitted copy, "
            'read + write): ' + ', '.join(
                f'{k} {v:.0f} GB/s' for k, v in d['copy_gbps'].items())]
  lines += [f"matmul peak ({d['matmul_n']}^3, jitted): " + ', '.join(
      f'{k} {v:.1f} TFLOP/s' for k, v in d['peak_tflops'].items())]
  for e in d.get('errors', []):
    lines += ['ERROR:', '```', e, '```']
  return lines


def _correctness_md(d: dict) -> list[str]:
  g = d['kernel_guard']
  guard = ('not applicable (default backend is the CPU)' if not g['applies']
           else 'PASS (never built)' if g['ok'] else 'FAIL (it was loaded)')
  lines = [f"x {tuple(d['shape'])}; accelerator vs jax.devices('cpu')[0] "
           f'(f32); error = max|a - b| / max|b| per array; tolerance f32 '
           f'{F32_TOL:g}, bf16 {BF16_TOL:g}', '',
           f'fused CPU kernel never built on this backend: {guard}', '']
  rows = [[r['norm'], r['dtype'], *(
      [_fmt(r['worst'][k], '.1e') for k in ('y', 'state', 'grads')]
      + [r['worst_array']] if 'worst' in r else ['ERROR (below)'] * 4),
            'PASS' if r['passed'] else 'FAIL'] for r in d['rows']]
  lines += _table(['norm', 'dtype', 'y', 'new state', 'grads',
                   'worst array', 'result'], rows)
  lines += ['', f"correctness: {'PASS' if d['passed'] else 'FAIL'}"]
  for r in d['rows']:
    if r.get('error'):
      lines += ['', f"ERROR {r['norm']} {r['dtype']}:", '```', r['error'],
                '```']
  return lines


def _norm_cells(r: dict) -> list[str]:
  arrays = r['algorithm_arrays']
  return [r['norm'], r['dtype'], 'x'.join(map(str, r['shape'])),
          _fmt(r['fwd_ms'], '.4f'), _fmt(r['fwd_bwd_ms'], '.4f'),
          *[_fmt(r.get(k), '.0f') for k in (
              'fwd_gbps', 'fwd_bwd_gbps', 'fwd_pct_copy', 'fwd_bwd_pct_copy',
              'fwd_pct_copy_algorithm', 'fwd_bwd_pct_copy_algorithm')],
          '{}, {}'.format(*arrays) if arrays else '—',
          _fmt(r['compile_s'], '.1f')]


def _norms_md(d: dict) -> list[str]:
  lines = [f"medians of {d['rounds']} rounds of {d['calls']}-call bursts; "
           'GB/s: fwd 2, fwd+bwd 4 arrays of x; % copy: of the measured copy '
           "bandwidth of the dtype; (algorithm): the norm's own minimal "
           'traffic of a separate fwd and bwd (`TRAFFIC`: arrays of x)', '']
  rows = [_norm_cells(r) for r in d['rows']
          if r['fwd_ms'] or r['fwd_bwd_ms']]
  lines += _table(['norm', 'dtype', 'x', 'fwd ms', 'fwd+bwd ms', 'fwd GB/s',
                   'fwd+bwd GB/s', '% copy fwd', '% copy fwd+bwd',
                   '% copy fwd (algorithm)', '% copy fwd+bwd (algorithm)',
                   'arrays (fwd, fwd+bwd)', 'compile s'], rows)
  if d['skipped']:
    lines += ['', 'skipped (time budget): ' + '; '.join(d['skipped'])]
  for r in d['rows']:
    if r.get('error'):
      lines += ['', f"ERROR {r['norm']} {r['dtype']} {r['shape']}:", '```',
                r['error'], '```']
  return lines


def _train_md(d: dict) -> list[str]:
  lines = [f"bf16 compute (`model.dtype='bfloat16'`), synthetic data, "
           f"{d['steps']} steps on one batch after the compiling one; MFU = "
           'model FLOPs per token (experiments.sweeps.cost) x tokens/s / '
           'the measured bf16 matmul peak', '']
  rows = [[r['task'], r['size'], r['norm'], f"{r['params']:,}",
           str(r['vocab']),
           str(r['tokens']), _fmt(r['compile_s'], '.1f'),
           _fmt(r['step_ms'], '.2f'), _fmt(r['tokens_per_s'], '.0f'),
           _fmt(r['flops_per_token'] / 1e9, '.3f'),
           _fmt(100 * r['mfu'], '.1f')] for r in d['rows']]
  lines += _table(['task', 'preset', 'norm', 'parameters', 'vocabulary',
                   'tokens/step',
                   'compile s', 'step ms', 'tokens/s', 'GFLOP/token',
                   'MFU %'], rows)
  for label in ('skipped', 'errors'):
    if d[label]:
      lines += ['', f'{label}: ' + '; '.join(d[label])]
  return lines


SECTIONS = (('device', 'Device, copy bandwidth, matmul peak', _device_md),
            ('correctness', 'Correctness against the CPU', _correctness_md),
            ('norms', 'Norms: fwd and fwd+bwd, bf16 and f32', _norms_md),
            ('train steps', 'Train steps (bf16) and MFU', _train_md))


def markdown(result: dict) -> str:
  lines = [f"**Accelerator benchmark** ({result['size']}; budget "
           f"{result['budget_s']:.0f} s, elapsed "
           f"{result.get('elapsed_s', 0):.0f} s)"]
  for key, title, render in SECTIONS:
    lines += ['', f'#### {title}', '']
    d = result['sections'].get(key)
    if d is None:
      lines.append('not run')
    elif 'not_run' in d:
      lines.append(f"not run: {d['not_run']}")
    elif 'error' in d:
      lines += ['ERROR:', '```', d['error'], '```']
    else:
      try:
        lines += render(d)
      except Exception as e:  # pylint: disable=broad-except
        lines += ['ERROR rendering:', '```', _error(e), '```']
      lines.append(f"\n({d['seconds']:.1f} s)")
  g = result.get('kernel_guard')
  if g:
    lines += ['', f"fused CPU kernel guard at the end: backend {g['backend']},"
              f" kernel loaded {g['kernel_loaded']}: "
              f"{'PASS' if g['ok'] else 'FAIL'}"]
  return '\n'.join(lines)


def keep_cpu_backend() -> None:
  """Adds 'cpu' to a JAX_PLATFORMS that lacks it (the correctness check
  needs the CPU backend beside the accelerator); before backends start."""
  platforms = jax.config.jax_platforms
  if platforms and 'cpu' not in platforms.split(','):
    jax.config.update('jax_platforms', f'{platforms},cpu')


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(
      description=' '.join(__doc__.split('\n\n')[0].split()))
  ap.add_argument('--out', help='write the report here (and .json beside)')
  ap.add_argument('--budget', type=float, default=BUDGET_S,
                  help='seconds; sections past it are skipped')
  ap.add_argument('--force', action='store_true',
                  help='run on the CPU too, at smoke sizes (a check)')
  ap.add_argument('--size', choices=('', 'smoke'), default=None,
                  help="'smoke': tiny sizes (default on the CPU)")
  ap.add_argument('--train_norms', default=','.join(TRAIN_NORMS),
                  help='comma-separated; empty: no train steps')
  ap.add_argument('--tasks', default=','.join(TASKS))
  a = ap.parse_args(argv)
  keep_cpu_backend()
  if jax.default_backend() == 'cpu' and not a.force:
    print('accelerator benchmark: skipped (backend cpu; no GPU/TPU here; '
          '--force runs it at smoke sizes)')
    return
  size = a.size
  if size is None:
    size = 'smoke' if jax.default_backend() == 'cpu' else ''
  norms = tuple(n for n in a.train_norms.split(',') if n)
  tasks = tuple(t for t in a.tasks.split(',') if t)
  print(markdown(run(size, a.out, a.budget, norms, tasks)), flush=True)


if __name__ == '__main__':
  main()
