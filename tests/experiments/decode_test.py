"""Beam search on hand-built next-token tables, and translate() on a model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import decode
from experiments import models

PAD, BOS, EOS, A, B = 0, 1, 2, 3, 4
V = 5


def table(rows, steps=4):
  """Next-token probabilities [steps, V(last token), V(next token)].

  `rows[(step, last)] = {token: p}`; every other row puts all mass on EOS.
  """
  t = np.zeros((steps, V, V))
  t[:, :, EOS] = 1.0
  for (step, last), probs in rows.items():
    t[step, last] = 0.0
    for token, p in probs.items():
      t[step, last, token] = p
  return t


def table_search(tables, **kwargs):
  """beam_search on per-sentence Markov tables [B, steps, V, V], jitted."""
  tables = np.asarray(tables)
  log_probs = jnp.log(jnp.asarray(tables, jnp.float32))  # zeros -> -inf
  batch = tables.shape[0]

  def logits_fn(cache, last):
    lp = log_probs[cache['row'], cache['step'], last[:, 0]]
    return lp, dict(row=cache['row'], step=cache['step'] + 1,
                    index=cache['index'] + 1)

  cache = dict(row=jnp.arange(batch), step=jnp.zeros((batch,), jnp.int32),
               index=jnp.zeros((), jnp.int32))  # a scalar leaf, like flax's
  search = jax.jit(functools.partial(decode.beam_search, logits_fn,
                                     batch_size=batch, **kwargs))
  tokens, scores = search(cache)
  return np.asarray(tokens), np.asarray(scores)


def score(tab, seq, alpha):
  """fairseq's score of one EOS-terminated hypothesis."""
  lp, last = 0.0, BOS
  for step, token in enumerate(seq):
    lp += np.log(tab[step, last, token])
    last = token
  return lp / len(seq) ** alpha


def trim(row):
  """Tokens up to and including the first EOS."""
  row = list(row)
  return row[:row.index(EOS) + 1]


# Greedy takes A (0.55) then EOS: 0.22. Beam 2 also keeps B (0.45), whose
# EOS (0.9) gives 0.405: the two searches disagree.
GREEDY_VS_BEAM = table({
    (0, BOS): {A: 0.55, B: 0.45},
    (1, A): {EOS: 0.4, A: 0.3, B: 0.3},
    (1, B): {EOS: 0.9, A: 0.05, B: 0.05},
})

# [A, EOS] has log-prob log 0.30; [B, B, EOS] has log 0.256 but is longer:
# it wins with length_penalty 1 (-0.45 vs -0.60), loses with 0 (-1.36 vs
# -1.20). [A, EOS] is finalized one step before [B, B, EOS].
LENGTH_PENALTY = table({
    (0, BOS): {A: 0.6, B: 0.4},
    (1, A): {EOS: 0.5, A: 0.4, B: 0.1},
    (1, B): {EOS: 0.1, A: 0.1, B: 0.8},
    (2, A): {EOS: 0.8, A: 0.1, B: 0.1},
    (2, B): {EOS: 0.8, A: 0.1, B: 0.1},
})


def test_greedy_and_beam_differ():
  tokens, scores = table_search([GREEDY_VS_BEAM], beam_size=1, max_len=4)
  assert tokens.shape == (1, 1, 4) and scores.shape == (1, 1)
  assert tokens[0, 0].tolist() == [A, EOS, PAD, PAD]
  np.testing.assert_allclose(scores[0, 0], np.log(0.22) / 2, rtol=1e-6)

  tokens, scores = table_search([GREEDY_VS_BEAM], beam_size=2, max_len=4)
  assert tokens.shape == (1, 2, 4)
  assert tokens[0].tolist() == [[B, EOS, PAD, PAD], [A, EOS, PAD, PAD]]
  np.testing.assert_allclose(scores[0], np.log([0.405, 0.22]) / 2, rtol=1e-6)


def test_length_penalty_changes_the_winner():
  long, short = [B, B, EOS], [A, EOS]
  for alpha, best in ((1.0, long), (0.0, short)):
    tokens, scores = table_search([LENGTH_PENALTY], beam_size=2, max_len=4,
                                  length_penalty=alpha)
    hyps = [trim(row) for row in tokens[0]]
    assert hyps[0] == best, alpha
    assert sorted(map(tuple, hyps)) == sorted([tuple(long), tuple(short)])
    expected = [score(LENGTH_PENALTY, h, alpha) for h in hyps]
    np.testing.assert_allclose(scores[0], expected, rtol=1e-6)
    assert scores[0, 0] >= scores[0, 1]
  # Greedy stops at [A, EOS] whatever the penalty.
  tokens, _ = table_search([LENGTH_PENALTY], beam_size=1, max_len=4,
                           length_penalty=1.0)
  assert trim(tokens[0, 0]) == short


def test_eos_handling():
  # EOS is the likeliest token everywhere, but banned at step 0 (min_len 1).
  eager = table({(0, BOS): {EOS: 0.7, A: 0.2, B: 0.1}}, steps=6)
  tokens, scores = table_search([eager], beam_size=2, max_len=6)
  for row, s in zip(tokens[0], scores[0]):
    hyp = trim(row)
    assert len(hyp) == 2 and hyp[0] != EOS
    assert (row[len(hyp):] == PAD).all()  # PAD after EOS
    np.testing.assert_allclose(s, score(eager, hyp, 1.0), rtol=1e-6)

  # EOS never likely: every hypothesis is cut at max_len with a forced EOS.
  never = np.zeros((6, V, V))
  never[:, :, A], never[:, :, B], never[:, :, EOS] = 0.69, 0.3, 0.01
  tokens, scores = table_search([never], beam_size=2, max_len=5)
  assert (tokens[0, :, -1] == EOS).all()
  assert (tokens[0, :, :-1] != EOS).all() and (tokens[0] != PAD).all()
  assert tokens[0, 0].tolist() == [A, A, A, A, EOS]
  assert np.isfinite(scores).all()


def test_finished_beams_stay_finished():
  # [A, EOS] is finalized at step 1 while [B, B, ...] is still live; it must
  # come back unchanged (PAD after EOS) next to the later hypothesis.
  tokens, scores = table_search([LENGTH_PENALTY], beam_size=2, max_len=6)
  rows = {tuple(trim(r)): r for r in tokens[0]}
  assert set(rows) == {(A, EOS), (B, B, EOS)}
  assert rows[(A, EOS)].tolist() == [A, EOS, PAD, PAD, PAD, PAD]
  assert rows[(B, B, EOS)].tolist() == [B, B, EOS, PAD, PAD, PAD]
  assert np.isfinite(scores).all()


def test_batch_of_two():
  both, _ = table_search([GREEDY_VS_BEAM, LENGTH_PENALTY], beam_size=2,
                         max_len=4)
  first, _ = table_search([GREEDY_VS_BEAM], beam_size=2, max_len=4)
  second, _ = table_search([LENGTH_PENALTY], beam_size=2, max_len=4)
  np.testing.assert_array_equal(both[0], first[0])
  np.testing.assert_array_equal(both[1], second[0])
  assert trim(both[0, 0]) == [B, EOS]
  assert trim(both[1, 0]) == [B, B, EOS]


def test_logprobs_or_logits():
  """Unnormalised logits give the same search as log-probabilities."""
  tables = np.asarray([LENGTH_PENALTY])
  lp = jnp.log(jnp.asarray(tables, jnp.float32))

  def logits_fn(cache, last):
    out = lp[0, cache['step'], last[:, 0]] * 1.0 + 3.0  # shifted
    return out, dict(step=cache['step'] + 1)

  tokens, scores = decode.beam_search(
      logits_fn, dict(step=jnp.zeros((1,), jnp.int32)), 1, beam_size=2,
      max_len=4)
  expected_tokens, expected_scores = table_search(tables, beam_size=2,
                                                  max_len=4)
  np.testing.assert_array_equal(tokens, expected_tokens)
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-6)


def tiny_model(norm='layernorm'):
  norms = {}
  if norm == 'powernorm':
    pn = dict(kind='powernorm', num_groups=2, warmup_steps=2)
    norms = {s: pn for s in models.SITES}
  config = models.TransformerConfig(
      vocab_size=13, d_model=16, num_heads=2, ffn_dim=32,
      num_encoder_layers=1, num_decoder_layers=1, max_len=16, norms=norms)
  return models.Transformer(config)


INPUTS = np.array([[5, 6, 7, 8, EOS, PAD], [9, 10, EOS, PAD, PAD, PAD],
                   [11, 12, 5, EOS, PAD, PAD]], np.int32)


def greedy_by_recompute(model, variables, inputs, max_len):
  """Greedy decoding that re-runs the full decoder at every step."""
  batch = inputs.shape[0]
  # Future positions hold PAD: causal and masked, they do not matter.
  dec = np.full((batch, max_len), PAD, np.int32)
  dec[:, 0] = BOS
  out = np.zeros((batch, max_len), np.int32)
  done = np.zeros(batch, bool)
  apply = jax.jit(functools.partial(model.apply, train=False))
  for t in range(max_len):
    logits = apply(variables, inputs, dec)
    lp = np.array(jax.nn.log_softmax(logits[:, t]))
    lp[:, PAD] = -np.inf
    if t < 1:
      lp[:, EOS] = -np.inf
    if t == max_len - 1:
      lp[:, np.arange(lp.shape[1]) != EOS] = -np.inf
    token = np.where(done, PAD, lp.argmax(-1))
    out[:, t] = token
    done |= token == EOS
    if t + 1 < max_len:
      dec[:, t + 1] = token
  return out


@pytest.mark.parametrize('norm', [
    'layernorm', pytest.param('powernorm', marks=pytest.mark.slow)])
def test_translate(norm):
  model = tiny_model(norm)
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0), INPUTS, INPUTS)
  if norm == 'powernorm':  # move the running statistics off their init
    train = jax.jit(functools.partial(model.apply, train=True,
                                      mutable=['batch_stats']))
    for i in range(3):
      _, state = train(variables, INPUTS, INPUTS,
                       rngs={'dropout': jax.random.key(i)})
      variables = {**variables, **state}
  max_len = decode.fairseq_max_len(INPUTS, 1.0, 2, limit=16)
  assert max_len == 5 + 2 + 1

  beam_size = 3 if norm == 'layernorm' else 2
  tokens = np.asarray(decode.translate(
      model, variables, INPUTS, beam_size=beam_size, max_len=max_len,
      length_penalty=1.0))
  assert tokens.shape == (3, max_len) and tokens.dtype == np.int32
  for row in tokens:
    hyp = trim(row)  # raises if there is no EOS
    assert PAD not in hyp and (row[len(hyp):] == PAD).all()
    assert ((0 <= row) & (row < 13)).all()

  if norm != 'layernorm':
    return
  # Greedy through the cache == greedy by recomputing the whole prefix.
  # `model.apply(v, inputs, prefix)` shifts the prefix right: drop that BOS.
  class Prefix(models.Transformer):
    def __call__(self, inputs, decoder_inputs, *, train):
      encoded = self.encode(inputs, train=train)
      return self.decode(encoded, inputs, decoder_inputs, train=train)

  greedy = np.asarray(decode.translate(model, variables, INPUTS, beam_size=1,
                                       max_len=max_len, length_penalty=1.0))
  expected = greedy_by_recompute(Prefix(model.config), variables, INPUTS,
                                 max_len)
  np.testing.assert_array_equal(greedy, expected)


def test_translate_rejects_long_budget():
  with pytest.raises(ValueError, match='max_len'):
    decode.translate(tiny_model(), {}, INPUTS, beam_size=2, max_len=17)


def test_filler_rows_are_not_decoded():
  """All-PAD rows (eval batch filler) return PAD and change no other row."""
  model = tiny_model()
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0), INPUTS, INPUTS)
  padded = np.concatenate([INPUTS, np.zeros_like(INPUTS[:1])])
  max_len = decode.fairseq_max_len(INPUTS, 1.0, 2, limit=16)
  alone = np.asarray(decode.translate(model, variables, INPUTS, beam_size=2,
                                      max_len=max_len))
  together = np.asarray(decode.translate(model, variables, padded,
                                         beam_size=2, max_len=max_len))
  np.testing.assert_array_equal(together[:len(INPUTS)], alone)
  assert (together[len(INPUTS)] == PAD).all()


def test_per_beam_top_k_equals_the_flat_top_k_ties_included():
  """The fast candidate selection picks what one top-k over K * V picks,
  in the same order, with ties and -inf (banned tokens, dead beams)."""
  rng = np.random.default_rng(0)
  for b, k, v in [(3, 4, 451), (2, 4, 5), (5, 1, 7), (4, 3, 6)]:
    for _ in range(10):
      x = rng.integers(-3, 3, (b, k, v)).astype(np.float32)  # many ties
      x[rng.uniform(size=x.shape) < 0.3] = -np.inf
      want = decode._top_k_flat(x, 2 * k)
      got = decode._top_k_per_beam(x, 2 * k)
      np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
      np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
