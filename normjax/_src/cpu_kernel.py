"""Fused LayerNorm / RMSNorm kernel for XLA:CPU, with the XLA math elsewhere.

XLA:CPU compiles a LayerNorm training step into several loops, and its
reductions over products (sum(dy * scale * x_hat)) run far below memory speed:
the jitted forward+backward of a (4096, 1024) f32 LayerNorm took 20-26 ms on
the project's 2-core CPU, where PyTorch's kernel takes 4 ms. `cpu_kernel.cc`
does it as torch does: one pass over memory per direction, the row kept in
L1 for the rest, the statistics and the backward formula fused.

`per_token_norm(x, scale, bias, eps=, center=, fallback=)` is differentiable
(custom_vjp: the backward recomputes x_hat from x and two floats per row),
shards over the leading axes under `jax.jit` (custom_partitioning: every row
is independent; dscale/dbias are summed over the shards), and runs `fallback`
(the same math in jnp) on GPU/TPU via `jax.lax.platform_dependent`.

The kernel is compiled once per machine with the system C++ compiler into
`$NORMJAX_KERNEL_CACHE` (default `~/.cache/normjax`), announced on stderr
with its path and time, and only where JAX's default backend is the CPU:
on a GPU/TPU machine nothing is built or called. It is built at first use,
not when the package is installed, because it is compiled for the machine
it runs on (`-march=native`) against the installed jax's FFI headers: a
wheel built elsewhere would carry the wrong instructions or ABI. Without a
compiler the norms warn once and use the XLA path. `NORMJAX_CPU_KERNEL=0` turns the kernel
off; `use_cpu_kernel(False)` does so inside a `with` block. Both act when a
function is traced: a function jitted before keeps its compiled choice.

Rows are threaded over XLA's intra-op pool (`kernel_rows.h`);
`row_threading(pool=, min_elements=)` switches it at run time for
measurement (`NORMJAX_KERNEL_POOL=1`: normjax's own persistent pool, 0:
std::threads spawned per call). Outputs of 8 MiB and more are written with
streaming (non-temporal) stores; `stream_stores(min_bytes=)` moves that
threshold (`NORMJAX_KERNEL_STREAM_BYTES`). Neither changes a bit of the
results' values.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import AxisType, NamedSharding, PartitionSpec

Array = jax.Array

_SOURCES = tuple(os.path.join(os.path.dirname(__file__), name)
                 for name in ('cpu_kernel.cc', 'power_kernel.cc'))
_HEADERS = (os.path.join(os.path.dirname(__file__), 'kernel_rows.h'),)
_FLAGS = ('-O3', '-march=native', '-fopenmp-simd', '-fno-math-errno',
          '-std=c++17', '-shared', '-fPIC', '-w')
_FORWARD, _BACKWARD = 'normjax_per_token_norm_fwd', 'normjax_per_token_norm_bwd'
# FFI target name -> exported handler symbol (power_kernel.cc's are used by
# power_kernel.py).
_TARGETS = {
    _FORWARD: 'NormjaxPerTokenNormForward',
    _BACKWARD: 'NormjaxPerTokenNormBackward',
    'normjax_power_stats': 'NormjaxPowerStats',
    'normjax_power_apply': 'NormjaxPowerApply',
    'normjax_power_forward': 'NormjaxPowerForward',
    'normjax_power_bwd': 'NormjaxPowerBackward',
    'normjax_power_columns': 'NormjaxPowerColumns',
}
_enabled = [os.environ.get('NORMJAX_CPU_KERNEL', '1') != '0']
_library: list[ctypes.CDLL] = []  # the loaded kernels, once `_load` ran


@contextlib.contextmanager
def use_cpu_kernel(enabled: bool) -> Iterator[None]:
  """Turns the fused CPU kernel on or off for functions traced inside."""
  previous, _enabled[0] = _enabled[0], enabled
  try:
    yield
  finally:
    _enabled[0] = previous


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as fh:
      return next((l for l in fh if l.startswith('flags')), '')
  except OSError:
    return platform.processor()


def _build() -> str:
  """Compiles the kernels (once per machine and source); returns the path."""
  compiler = shutil.which(os.environ.get('CXX', 'g++'))
  if compiler is None:
    raise RuntimeError('no C++ compiler (set CXX or install g++)')
  sources = []
  for name in _SOURCES + _HEADERS:
    with open(name, 'rb') as fh:
      sources.append(fh.read())
  key = hashlib.sha256(b'\0'.join([
      *sources, ' '.join(_FLAGS).encode(), jax.__version__.encode(),
      compiler.encode(), _cpu_model().encode()])).hexdigest()[:16]
  cache = os.environ.get('NORMJAX_KERNEL_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'normjax')
  path = os.path.join(cache, f'cpu_kernel_{key}.so')
  if os.path.exists(path):
    return path
  os.makedirs(cache, exist_ok=True)
  print(f'normjax: compiling the fused CPU norm kernel into {path} (once '
        'per machine and version) ...', file=sys.stderr, end=' ', flush=True)
  start = time.perf_counter()
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=cache)
  os.close(fd)
  try:
    cmd = [compiler, *_FLAGS, f'-I{jax.ffi.include_dir()}', *_SOURCES, '-o',
           tmp]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
      raise RuntimeError(f'{" ".join(cmd)} failed: {done.stderr[-2000:]}')
    os.replace(tmp, path)  # atomic: concurrent builders never see half a file
    print(f'done in {time.perf_counter() - start:.1f} s', file=sys.stderr,
          flush=True)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


@functools.cache
def _load() -> bool:
  """Builds and registers the kernel; False (with one warning) if it cannot."""
  if platform.system() != 'Linux':
    return False
  try:
    lib = ctypes.cdll.LoadLibrary(_build())
    _library[:] = [lib]
    for target, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(
          target, jax.ffi.pycapsule(getattr(lib, symbol)), platform='cpu')
  except (OSError, RuntimeError, AttributeError) as e:
    warnings.warn(
        f'normjax: the fused CPU LayerNorm/RMSNorm kernel is unavailable '
        f'({e}); using the XLA path, about 3x slower on CPU. Set '
        'NORMJAX_CPU_KERNEL=0 to silence this.', RuntimeWarning, stacklevel=3)
    return False
  return True


ROW_THREADING = ('spawn', 'own', 'xla')  # kernel_rows.h's RowThreading
STREAM_NEVER = 1 << 62  # a streaming threshold above any array


def row_threading(pool: str | None = None,
                  min_elements: int | None = None) -> tuple[str, int]:
  """Sets how the kernels thread rows; returns (pool, min_elements) in effect.

  For measurement (benchmarks/sizes.py): `pool` is 'xla' (the default: XLA's
  intra-op pool, shared with XLA's own work), 'own' (normjax's persistent
  pool) or 'spawn' (std::threads spawned per call, the first
  implementation); `min_elements` is the elements per thread (one thread
  below it; 0: the default, 2^18). None keeps the current value. Acts at
  call time, not trace time, for every kernel in the process. Raises
  ValueError for another `pool`, RuntimeError without the kernel.
  """
  if pool is not None and pool not in ROW_THREADING:
    raise ValueError(f'pool={pool!r}: use one of {ROW_THREADING}')
  got = _row_threading_fn()(
      -1 if pool is None else ROW_THREADING.index(pool),
      -1 if min_elements is None else int(min_elements))
  return ROW_THREADING[got >> 60], got & ((1 << 60) - 1)


@functools.cache
def _row_threading_fn():
  if not _load() or not _library:
    raise RuntimeError('the fused CPU kernel is not loaded')
  fn = _library[0].NormjaxSetRowThreading
  fn.restype, fn.argtypes = ctypes.c_int64, (ctypes.c_int, ctypes.c_int64)
  return fn


def stream_stores(min_bytes: int | None = None) -> int:
  """Sets from what output size (bytes) the kernels write with streaming
  stores, which skip reading each line before it is written; returns the
  threshold in effect.

  For measurement: 0 restores the default (8 MiB, `kernel_rows.h`), a size
  larger than any array (`STREAM_NEVER`) turns them off, None keeps the
  current value. Acts at call time for every kernel in the process; the values
  computed do not change. Raises ValueError for a negative size,
  RuntimeError without the kernel.
  """
  if min_bytes is not None and min_bytes < 0:
    raise ValueError(f'min_bytes={min_bytes}: use a size >= 0 (0: default)')
  return _stream_bytes_fn()(-1 if min_bytes is None else int(min_bytes))


@functools.cache
def _stream_bytes_fn():
  if not _load() or not _library:
    raise RuntimeError('the fused CPU kernel is not loaded')
  fn = _library[0].NormjaxSetStreamBytes
  fn.restype, fn.argtypes = ctypes.c_int64, (ctypes.c_int64,)
  return fn


def available() -> bool:
  """Whether per-token norms will use the fused kernel: enabled, JAX's
  default backend is the CPU, and the kernel built (`_load`)."""
  return _enabled[0] and jax.default_backend() == 'cpu' and _load()


def _struct(shape, like: Array) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, like.dtype)


def _forward_call(x, scale, bias, eps, center):
  rows = x.shape[:-1]
  return jax.ffi.ffi_call(
      _FORWARD, (_struct(x.shape, x), _struct(rows, x), _struct(rows, x)),
      vmap_method='sequential')(x, scale, bias, eps=np.float32(eps),
                                center=center)


def _backward_call(x, scale, mu, r, dy, center):
  feat = x.shape[-1:]
  return jax.ffi.ffi_call(
      _BACKWARD, (_struct(x.shape, x), _struct(feat, x), _struct(feat, x)),
      vmap_method='sequential')(x, scale, mu, r, dy, center=center)


def _row_spec(arg_shape) -> tuple:
  """The sharding of the leading (row) axes of x; the feature axis whole."""
  spec = tuple(arg_shape.sharding.spec)
  rank = len(arg_shape.shape)
  return (spec + (None,) * rank)[:rank - 1]


def _mesh_axes(row_spec: tuple) -> tuple[str, ...]:
  names = []
  for entry in row_spec:
    if entry is not None:
      names.extend((entry,) if isinstance(entry, str) else entry)
  return tuple(names)


@functools.partial(custom_partitioning, static_argnums=(3, 4))
def _forward(x, scale, bias, eps, center):
  return _forward_call(x, scale, bias, eps, center)


def _forward_shardings(mesh, arg_shapes):
  rows = _row_spec(arg_shapes[0])
  return (NamedSharding(mesh, PartitionSpec(*rows, None)),
          NamedSharding(mesh, PartitionSpec(*rows)),
          NamedSharding(mesh, PartitionSpec(*rows)))


def _forward_partition(eps, center, mesh, arg_shapes, result_shape):
  del result_shape
  out = _forward_shardings(mesh, arg_shapes)
  whole = NamedSharding(mesh, PartitionSpec())
  lower = lambda x, s, b: _forward_call(x, s, b, eps, center)
  return mesh, lower, out, (out[0], whole, whole)


_forward.def_partition(
    partition=_forward_partition,
    infer_sharding_from_operands=lambda eps, center, mesh, args, res:
    _forward_shardings(mesh, args),
    sharding_rule='... c, c, c -> ... c, ..., ...')


@functools.partial(custom_partitioning, static_argnums=(5,))
def _backward(x, scale, mu, r, dy, center):
  return _backward_call(x, scale, mu, r, dy, center)


def _backward_shardings(mesh, arg_shapes):
  whole = NamedSharding(mesh, PartitionSpec())
  rows = _row_spec(arg_shapes[0])
  return NamedSharding(mesh, PartitionSpec(*rows, None)), whole, whole


def _backward_partition(center, mesh, arg_shapes, result_shape):
  del result_shape
  rows = _row_spec(arg_shapes[0])
  x_sharding, whole, _ = _backward_shardings(mesh, arg_shapes)
  row_sharding = NamedSharding(mesh, PartitionSpec(*rows))
  axes = _mesh_axes(rows)

  def lower(x, s, mu, r, dy):
    dx, ds, db = _backward_call(x, s, mu, r, dy, center)
    if axes:  # each shard summed its own rows
      ds, db = jax.lax.psum((ds, db), axes)
    return dx, ds, db
  return (mesh, lower, (x_sharding, whole, whole),
          (x_sharding, whole, row_sharding, row_sharding, x_sharding))


_backward.def_partition(
    partition=_backward_partition,
    infer_sharding_from_operands=lambda center, mesh, args, res:
    _backward_shardings(mesh, args),
    sharding_rule='... c, c, ..., ..., ... c -> ... c, c, c')


def _batched(args, in_batched, axis_size):
  """Every argument with the vmapped axis in front."""
  return [a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
          for a, b in zip(args, in_batched)]


@functools.cache
def _forward_vmappable(eps: float, center: bool):
  """`_forward` under vmap: one call when the parameters are shared."""
  @jax.custom_batching.custom_vmap
  def forward(x, scale, bias):
    return _forward(x, scale, bias, eps, center)

  @forward.def_vmap
  def rule(axis_size, in_batched, x, scale, bias):
    x, scale, bias = _batched((x, scale, bias), in_batched, axis_size)
    if in_batched[1] or in_batched[2]:  # per-member parameters: a loop
      outs = jax.lax.map(lambda a: forward(*a), (x, scale, bias))
    else:  # the vmapped axis is one more row axis
      outs = forward(x, scale[0], bias[0])
    return outs, (True,) * 3
  return forward


@functools.cache
def _backward_vmappable(center: bool):
  """`_backward` under vmap; dscale/dbias per vmapped member."""
  @jax.custom_batching.custom_vmap
  def backward(x, scale, mu, r, dy):
    return _backward(x, scale, mu, r, dy, center)

  @backward.def_vmap
  def rule(axis_size, in_batched, x, scale, mu, r, dy):
    x, scale, mu, r, dy = _batched((x, scale, mu, r, dy), in_batched,
                                   axis_size)
    if in_batched[1]:
      outs = jax.lax.map(lambda a: backward(*a), (x, scale, mu, r, dy))
      return outs, (True,) * 3
    dx, _, _ = backward(x, scale[0], mu, r, dy)
    shift = x[..., :1] if center else 0.0
    x_hat = ((x - shift) - mu[..., None]) * r[..., None]
    rows = tuple(range(1, x.ndim - 1))
    return (dx, jnp.sum(dy * x_hat, rows), jnp.sum(dy, rows)), (True,) * 3
  return backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused(x, scale, bias, eps, center):
  return _forward_vmappable(eps, center)(x, scale, bias)[0]


def _fused_fwd(x, scale, bias, eps, center):
  y, mu, r = _forward_vmappable(eps, center)(x, scale, bias)
  return y, (x, scale, mu, r)


def _fused_bwd(eps, center, residuals, dy):
  del eps
  return _backward_vmappable(center)(*residuals, dy)


_fused.defvjp(_fused_fwd, _fused_bwd)


def _sharded_type(x: Array) -> bool:
  """Whether `x`'s type carries sharding: an `AxisType.Explicit` mesh, or a
  `shard_map` body (varying manual axes).

  custom_partitioning works on the partitioner's shardings, not on sharded
  types, so these take the XLA path.
  """
  mesh = getattr(getattr(jax.typeof(x), 'sharding', None), 'mesh', None)
  types = getattr(mesh, 'axis_types', ())
  return any(t in (AxisType.Explicit, AxisType.Manual) for t in types)


def per_token_norm(x: Array, scale: Array, bias: Array, *, eps: float,
                   center: bool, fallback: Callable[[Array, Array, Array],
                                                    Array]) -> Array:
  """LayerNorm (center) or RMSNorm of float32 `x` over its last axis.

      y = (x - mean) / sqrt(var + eps) * scale + bias      (center)
      y = x / sqrt(mean(x^2) + eps) * scale + bias          (not center)

  The fused kernel on CPU; `fallback(x, scale, bias)` on other platforms
  (and where the kernel is unavailable).
  """
  if not available() or _sharded_type(x):
    return fallback(x, scale, bias)
  return jax.lax.platform_dependent(
      x, scale, bias, cpu=lambda *a: _fused(*a, eps, center),
      default=fallback)
