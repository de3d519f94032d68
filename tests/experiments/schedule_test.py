"""The learning-rate schedules (optax) equal their formulas over every step."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import train_lib
from experiments.configs import wmt


def inverse_sqrt(count, peak, warmup, init):
  """fairseq's inverse_sqrt, as train_lib wrote it by hand before optax."""
  warmup = max(warmup, 1)
  count = jnp.asarray(count, jnp.float32)
  warm = init + count * (peak - init) / warmup
  decay = peak * jnp.sqrt(warmup / jnp.maximum(count, 1.0))
  return jnp.where(count < warmup, warm, decay)


def cosine(count, peak, warmup, floor, total):
  """Transformer-XL's warmup and cosine annealing, as train_lib wrote them."""
  total = max(total, 1)
  count = jnp.asarray(count, jnp.float32)
  annealed = floor + (peak - floor) * 0.5 * (
      1 + jnp.cos(jnp.pi * jnp.minimum(count, total) / total))
  if warmup <= 0:
    return annealed
  return jnp.where(count < warmup, peak * count / warmup, annealed)


def schedule(**fields):
  return train_lib.make_schedule(ml_collections.ConfigDict(fields))


def assert_equal_everywhere(lr, reference, last, peak):
  """Equal at every update count 0..`last`, both boundaries included.

  Relative 1e-6, except in the first warmup steps: optax.linear_schedule
  computes (init - peak) * (1 - count / warmup) + peak, whose float32
  cancellation is up to 1.2e-10 (8e-8 of the peak) where the rate is near
  0; hence the absolute 1e-7 * peak. After the warmup they were measured
  equal bit for bit.
  """
  count = np.arange(last + 1, dtype=np.int32)
  got, want = np.asarray(lr(count)), np.asarray(reference(count))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7 * peak)


@pytest.mark.parametrize('warmup', [0, 1, 4, 8000])
def test_inverse_sqrt_equals_the_formula(warmup):
  lr = schedule(kind='inverse_sqrt', peak_lr=1.5e-3, warmup_steps=warmup,
                warmup_init_lr=1e-7)
  assert_equal_everywhere(
      lr, lambda c: inverse_sqrt(c, 1.5e-3, warmup, 1e-7), 4 * warmup + 50,
      1.5e-3)


@pytest.mark.parametrize('warmup,floor,total', [
    (0, 0.0, 20000), (0, 1e-5, 7), (100, 0.0, 1000), (2, 1e-6, 6),
    (5, 0.0, 0)])
def test_cosine_equals_the_formula(warmup, floor, total):
  lr = schedule(kind='cosine', peak_lr=2.5e-4, warmup_steps=warmup,
                min_lr=floor, decay_steps=total)
  assert_equal_everywhere(
      lr, lambda c: cosine(c, 2.5e-4, warmup, floor, total),
      max(total, warmup) + 20, 2.5e-4)


def test_inverse_sqrt_schedule_matches_fairseq():
  lr = train_lib.make_schedule(wmt.get_config('layernorm').schedule)
  near = lambda x: pytest.approx(x, rel=1e-6, abs=1e-7 * 3e-3)
  assert float(lr(0)) == near(1e-7)
  assert float(lr(4000)) == near(1e-7 + 4000 * (3e-3 - 1e-7) / 8000)
  assert float(lr(8000)) == near(3e-3)
  assert float(lr(32000)) == near(3e-3 * 0.5)


def test_unknown_kind_is_an_error():
  with pytest.raises(ValueError, match='inverse_sqrt'):
    schedule(kind='linear', peak_lr=1.0, warmup_steps=0)
