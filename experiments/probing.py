"""Training-dynamics probes of a train step, and the tidy file they go to.

Turned on by `--config.train.probe_every=N`: every N-th step runs a probed
variant of the train step (same update, bit for bit) that also returns

  <norm site>/act_var, act_max          every norm (normjax.probes)
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
  for path, leaf in normjax.probes.flatten(_unfreeze(tree)).items():
    groups.setdefault(layer_of(path), []).append(leaf)
  return groups


def _unfreeze(tree: Any) -> dict:
  return {k: _unfreeze(v) if isinstance(v, Mapping) else v
          for k, v in tree.items()}


def _sq(leaves) -> Array:
  return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)


def _dot(a, b) -> Array:
  return sum(jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32))
             for x, y in zip(a, b))


def gradient_probes(grads: Any, exact_grads: Any = None) -> dict[str, Array]:
  """Per-layer and total gradient norms; cosines with `exact_grads`."""
  out = {}
  groups = _by_layer(grads)
  exact = _by_layer(exact_grads) if exact_grads is not None else None
  for name, leaves in groups.items():
    out[f'{name}/grad_norm'] = jnp.sqrt(_sq(leaves))
  out['model/grad_norm'] = jnp.sqrt(sum(_sq(v) for v in groups.values()))
  if exact is not None:
    def cosine(a, b):
      return _dot(a, b) / jnp.maximum(jnp.sqrt(_sq(a) * _sq(b)), 1e-30)
    for name, leaves in groups.items():
      out[f'{name}/grad_cosine'] = cosine(leaves, exact[name])
    every = [x for v in groups.values() for x in v]
    every_exact = [x for name in groups for x in exact[name]]
    out['model/grad_cosine'] = cosine(every, every_exact)
  return out


def state_probes(batch_stats: Any, grad_stats: Any) -> dict[str, Array]:
  """PowerNorm's/UN's gradient statistic and UN's outlier-skip count."""
  out = {}
  for path, leaf in normjax.probes.flatten(_unfreeze(grad_stats)).items():
    site, name = path.rsplit('/', 1)
    if name == 'ema_gz':
      out[f'{site}/grad_stat'] = jnp.mean(jnp.abs(leaf.astype(jnp.float32)))
  for path, leaf in normjax.probes.flatten(_unfreeze(batch_stats)).items():
    site, name = path.rsplit('/', 1)
    if name == 'skip_count':
      out[f'{site}/skip_count'] = jnp.sum(leaf).astype(jnp.float32)
  return out


def norm_probes(sown: Any) -> dict[str, Array]:
  """The norms' sown 'probes' collection as {'<site>/<metric>': value}."""
  return dict(normjax.probes.flatten(_unfreeze(sown)))


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
      writer = csv.writer(f)
      for key, value in sorted(values.items()):
        site, metric = key.rsplit('/', 1)
        writer.writerow((step, site, metric, repr(float(value))))


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
  series: dict[tuple[str, str], list[tuple[int, float]]] = {}
  for row in _read_rows(path):
    series.setdefault((row['site'], row['metric']), []).append(
        (int(row['step']), float(row['value'])))
  return {k: (np.array([s for s, _ in v]), np.array([x for _, x in v]))
          for k, v in series.items()}
