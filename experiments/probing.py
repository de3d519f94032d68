"""Training-dynamics probes of a train step, and the tidy file they go to.

Turned on by `--config.train.probe_every=N`: every N-th step runs a probed
variant of the train step (same update, bit for bit) that also returns

  <norm site>/act_var, act_max,         every norm (normjax.probes)
              nonfinite_frac
  <norm site>/mean_dist, var_dist       BatchNorm: |mu_B - mu|, |sigma2_B - sigma2|
  <norm site>/qm_dist                   PowerNorm, PN-V, UN: |psi2_B - phi|
  <norm site>/grad_stat                 PowerNorm, UN: mean_c |u_c| after the step
  <norm site>/skip_count                UN: batches filtered as outliers so far
  <layer>/grad_norm                     ||grad|| of each layer's parameters
  model/grad_norm                       ||grad|| of all parameters
  <layer>/grad_cosine, model/grad_cosine
      with `train.probe_exact_gradient`: cosine between the gradient the
      step uses (PowerNorm's approximate backward) and exact autodiff of
      the same forward pass (`normjax.functional.power_norm_autodiff`)

A layer is the path up to its `layer_<i>` component ('decoder/layer_3'), or
the top-level module ('embedding'). The values go to TensorBoard under
`probes/` and to `<workdir>/probes.csv` with columns step, site, metric,
value: one row per number (`read_probes` loads it).
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import normjax

Array = jax.Array

_LAYER = re.compile(r'^layer_\d+$')
COLUMNS = ('step', 'site', 'metric', 'value')


def layer_of(path: str) -> str:
  """'decoder/layer_3/ffn/fc1/kernel' -> 'decoder/layer_3'; else the first
  component ('embedding/embedding' -> 'embedding')."""
  parts = path.split('/')
  for i, part in enumerate(parts):
    if _LAYER.match(part):
      return '/'.join(parts[:i + 1])
  return parts[0]


def _by_layer(tree: Any) -> dict[str, list[Array]]:
  groups: dict[str, list[Array]] = {}
  for path, leaf in normjax.probes.flatten(tree).items():
    groups.setdefault(layer_of(path), []).append(leaf)
  return groups


def _sq(leaves) -> Array:
  return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)


def _dot(a, b) -> Array:
  return sum(jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32))
             for x, y in zip(a, b))


def gradient_probes(grads: Any, exact_grads: Any = None) -> dict[str, Array]:
  """Per-layer and total gradient norms; cosines with `exact_grads`."""
  out = {}
  groups = _by_layer(grads)
  sq = {name: _sq(leaves) for name, leaves in groups.items()}
  for name, value in sq.items():
    out[f'{name}/grad_norm'] = jnp.sqrt(value)
  total = sum(sq.values())
  out['model/grad_norm'] = jnp.sqrt(total)
  if exact_grads is not None:
    exact = _by_layer(exact_grads)
    sq_exact = {name: _sq(exact[name]) for name in groups}
    dots = {name: _dot(groups[name], exact[name]) for name in groups}

    def cosine(dot, a, b):
      return dot / jnp.maximum(jnp.sqrt(a * b), 1e-30)
    for name in groups:
      out[f'{name}/grad_cosine'] = cosine(dots[name], sq[name], sq_exact[name])
    out['model/grad_cosine'] = cosine(sum(dots.values()), total,
                                      sum(sq_exact.values()))
  return out


def state_probes(batch_stats: Any, grad_stats: Any) -> dict[str, Array]:
  """PowerNorm's/UN's gradient statistic and UN's outlier-skip count."""
  out = {}
  for path, leaf in normjax.probes.flatten(grad_stats).items():
    site, name = path.rsplit('/', 1)
    if name == 'ema_gz':
      out[f'{site}/grad_stat'] = jnp.mean(jnp.abs(leaf.astype(jnp.float32)))
  for path, leaf in normjax.probes.flatten(batch_stats).items():
    site, name = path.rsplit('/', 1)
    if name == 'skip_count':
      out[f'{site}/skip_count'] = jnp.sum(leaf).astype(jnp.float32)
  return out


def norm_probes(sown: Any) -> dict[str, Array]:
  """The norms' sown 'probes' collection as {'<site>/<metric>': value}."""
  return normjax.probes.flatten(sown)


# ------------------------------------------------------------ the file --


class ProbeLog:
  """Appends probe values to <workdir>/probes.csv (tidy: one row a number).

  On a resumed run, `ProbeLog(workdir, resume_step=s)` first drops the rows
  of steps after `s`, which the killed run wrote after its last checkpoint,
  so that the file matches an uninterrupted run.
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, 'probes.csv')
    rows = []
    if os.path.exists(self.path):
      rows = [r for r in _read_rows(self.path) if int(r['step']) <= resume_step]
    with open(self.path, 'w', newline='') as f:
      writer = csv.writer(f)
      writer.writerow(COLUMNS)
      writer.writerows([r[c] for c in COLUMNS] for r in rows)

  def write(self, step: int, values: Mapping[str, float]) -> None:
    with open(self.path, 'a', newline='') as f:
      csv.writer(f).writerows(
          (step, site, metric, repr(float(value)))
          for site, metric, value in split_keys(values))


def split_keys(values: Mapping[str, Any]) -> list[tuple[str, str, Any]]:
  """{'<site>/<metric>': v} -> sorted [(site, metric, v)]."""
  return [(*key.rsplit('/', 1), value)
          for key, value in sorted(values.items())]


def to_series(rows) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
  """(step, site, metric, value) rows -> {(site, metric): (steps, values)}."""
  series: dict[tuple[str, str], list[tuple[int, float]]] = {}
  for step, site, metric, value in rows:
    series.setdefault((site, metric), []).append((int(step), float(value)))
  return {k: (np.array([s for s, _ in v]), np.array([x for _, x in v]))
          for k, v in series.items()}


def _read_rows(path: str) -> list[dict[str, str]]:
  with open(path, newline='') as f:
    reader = csv.DictReader(f)
    if tuple(reader.fieldnames or ()) != COLUMNS:
      raise ValueError(f'{path}: not a probes file (columns {COLUMNS}, got '
                       f'{reader.fieldnames}); move it away or delete it.')
    return list(reader)


def read_probes(path: str) -> dict[tuple[str, str], tuple[np.ndarray,
                                                          np.ndarray]]:
  """probes.csv (or its workdir) -> {(site, metric): (steps, values)}."""
  if os.path.isdir(path):
    path = os.path.join(path, 'probes.csv')
  return to_series([r[c] for c in COLUMNS] for r in _read_rows(path))
