"""Short probed training runs for the notebooks (notebooks/*.py).

    run = dynamics.probed_lm_run('ptb_batchnorm_flax,demo', steps=150,
                                 probe_every=5)
    run.series('decoder/layer_0/ffn_norm', 'var_dist')  # (steps, values)

`probed_lm_run` trains the language model of `experiments.language_model`
(a preset and dotted overrides, as on the command line) in this process,
with no checkpoints or evaluation, and keeps every step's loss and every
probe (`experiments.probing`). `probed_cnn_run` trains a small CNN with
normjax BatchNorm on scikit-learn's 8x8 digits (real images, no download),
the image side of the PowerNorm paper's Fig. 2 comparison.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import normjax
from experiments import configs
from experiments import probing
from experiments import sharding
from experiments.configs import lm as lm_configs

Series = tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass
class Run:
  """A finished probed run: per-step losses and {(site, metric): series}."""
  name: str
  losses: np.ndarray                    # [steps] training loss per token
  probes: dict[tuple[str, str], Series]
  seconds: float

  def series(self, site: str, metric: str) -> Series:
    if (site, metric) not in self.probes:
      raise KeyError(f'{self.name}: no probe {metric!r} at {site!r}; have '
                     f'{sorted(set(m for _, m in self.probes))} at '
                     f'{sorted(set(s for s, _ in self.probes))}')
    return self.probes[(site, metric)]

  def sites(self, metric: str) -> list[str]:
    """Sites with `metric`, in depth order (layer_2 before layer_10)."""
    return sorted({s for s, m in self.probes if m == metric}, key=_depth_key)

  def mean_over_sites(self, metric: str) -> Series:
    sites = self.sites(metric)
    if not sites:
      raise KeyError(f'{self.name}: no site has probe {metric!r}')
    steps = self.series(sites[0], metric)[0]
    return steps, np.mean([self.series(s, metric)[1] for s in sites], axis=0)


def figure_path(name: str) -> str:
  """notebooks/figures/<name> of this checkout (created if missing)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  folder = os.path.join(root, 'notebooks', 'figures')
  os.makedirs(folder, exist_ok=True)
  return os.path.join(folder, name)


def _depth_key(site: str) -> tuple:
  parts = []
  for p in site.split('/'):
    parts.append((0, int(p[6:])) if p.startswith('layer_') and p[6:].isdigit()
                 else (1, p))
  return tuple(parts)


def lm_config(preset: str, overrides: Mapping[str, Any] | None = None):
  """An LM config from `preset[,modifier...]` and dotted overrides; unknown
  keys and wrong types raise, as on the command line."""
  config = configs.build(lm_configs.PRESETS, preset, lm_configs.MODIFIERS)
  if overrides:
    config.update_from_flattened_dict(dict(overrides))
  return config


def probed_lm_run(preset: str, steps: int, probe_every: int = 5,
                  overrides: Mapping[str, Any] | None = None,
                  exact_gradient: bool = False, name: str | None = None
                  ) -> Run:
  """Trains `preset` for `steps` steps, probing every `probe_every`-th."""
  from experiments import language_model  # pylint: disable=g-import-not-at-top
  config = lm_config(preset, {**(overrides or {}),
                              'train.probe_every': probe_every,
                              'train.probe_exact_gradient': exact_gradient,
                              'train.num_steps': steps})
  start = time.time()
  with tempfile.TemporaryDirectory() as workdir:
    exp = language_model.Experiment(config, workdir)
    state, batches = exp.state, iter(exp.batcher)
    losses, rows = [], []
    with jax.set_mesh(exp.mesh):
      for step in range(1, steps + 1):
        batch = sharding.global_batch(next(batches), exp.mesh)
        probed = step % probe_every == 0
        state, metrics = (exp.probe_step if probed else exp.train_step)(
            state, batch)
        if probed:
          rows += [(step, *r) for r in probing.split_keys(
              metrics.pop('probes'))]
        losses.append(float(metrics['loss']))
  if not np.all(np.isfinite(losses)):
    raise FloatingPointError(f'{preset}: non-finite loss at step '
                             f'{int(np.argmin(np.isfinite(losses))) + 1}')
  return Run(name or preset, np.array(losses), probing.to_series(rows),
             time.time() - start)


# ------------------------------------------------------- images (digits) --


class DigitsCNN(nn.Module):
  """conv3x3(16)-BN-relu, conv3x3(32)-BN-relu, mean-pool, dense(10)."""

  @nn.compact
  def __call__(self, x, train: bool):
    for i, width in enumerate((16, 32)):
      x = nn.Conv(width, (3, 3), name=f'conv_{i}')(x)
      x = normjax.linen.BatchNorm(momentum=0.9, name=f'layer_{i}')(
          x, not train)
      x = nn.relu(x)
    return nn.Dense(10, name='head')(jnp.mean(x, axis=(1, 2)))


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits: [1797, 8, 8, 1] float32 in [0, 1], labels."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  return images, digits.target.astype(np.int32)


def probed_cnn_run(steps: int, probe_every: int = 5, batch_size: int = 64,
                   lr: float = 1e-2, seed: int = 0) -> Run:
  """Trains `DigitsCNN` with Adam, probing its BatchNorms."""
  images, labels = load_digits()
  model = DigitsCNN()
  variables = nn.unbox(model.init(jax.random.PRNGKey(seed), images[:2],
                                  train=False))
  params, batch_stats = variables['params'], variables['batch_stats']
  tx = optax.adam(lr)
  opt_state = tx.init(params)

  def make_step(probe: bool):
    mutable = ['batch_stats', normjax.probes.PROBES] if probe else [
        'batch_stats']

    @jax.jit
    def step_fn(params, batch_stats, opt_state, x, y):
      def loss_fn(p):
        logits, updates = model.apply(
            {'params': p, 'batch_stats': batch_stats}, x, train=True,
            mutable=mutable)
        loss = optax.softmax_cross_entropy_with_integer_labels(
            logits, y).mean()
        return loss, updates
      (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params)
      upd, opt_state = tx.update(grads, opt_state, params)
      extra = {}
      if probe:
        extra = {**probing.norm_probes(updates[normjax.probes.PROBES]),
                 **probing.gradient_probes(grads)}
      return (optax.apply_updates(params, upd), updates['batch_stats'],
              opt_state, loss, extra)
    return step_fn

  plain, probed = make_step(False), make_step(True)
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(images))
  start, losses, rows, pos = time.time(), [], [], 0
  for step in range(1, steps + 1):
    if pos + batch_size > len(order):
      order, pos = rng.permutation(len(images)), 0
    idx = order[pos:pos + batch_size]
    pos += batch_size
    fn = probed if step % probe_every == 0 else plain
    params, batch_stats, opt_state, loss, extra = fn(
        params, batch_stats, opt_state, images[idx], labels[idx])
    rows += [(step, *r) for r in probing.split_keys(extra)]
    losses.append(float(loss))
  return Run('digits CNN', np.array(losses), probing.to_series(rows),
             time.time() - start)
