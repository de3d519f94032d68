"""Batched beam search with fairseq's scoring, and `translate`.

Adapted from flax's examples/wmt/decode.py (Copyright The Flax Authors,
Apache License 2.0): the beam state, the top-2K candidate step and the
`lax.while_loop` structure. The search rules are those of fairseq v0.8's
SequenceGenerator (`generate.py --beam K --lenpen a`), which produced the
PowerNorm paper's BLEU:

* a hypothesis's score is the sum of its token log-probabilities, EOS
  included, divided by (its length, EOS included) ** length_penalty;
* each step takes the top 2K continuations of the K live beams; EOS
  continuations among the top K are finalized, and the best K that do not
  end in EOS stay live;
* a sentence is done once it has K finalized hypotheses (fairseq's early
  stop); PAD is never generated, EOS is banned for the first `min_len` steps
  and forced at the last step, so every hypothesis ends with EOS.

With beam_size=1 this is greedy decoding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from experiments import models

NEG_INF = -jnp.inf

LogitsFn = Callable[[Any, jax.Array], tuple[jax.Array, Any]]


@flax.struct.dataclass
class BeamState:
  """Beam search state. B = batch, K = beam size, L = max_len."""
  step: jax.Array             # int32 []: tokens generated so far
  live_seqs: jax.Array        # int32 [B, K, L + 1]; column 0 is BOS
  live_logprobs: jax.Array    # float32 [B, K]; -inf = no hypothesis
  finished_seqs: jax.Array    # int32 [B, K, L + 1]; PAD after EOS
  finished_scores: jax.Array  # float32 [B, K]; -inf = empty slot
  cache: Any                  # decoder cache, leaves [B * K, ...]


def _tile(x: jax.Array, beam_size: int) -> jax.Array:
  """[B, ...] -> [B * K, ...], each row repeated K times (scalars kept)."""
  return x if x.ndim == 0 else jnp.repeat(x, beam_size, axis=0)


def _take_beams(x: jax.Array, indices: jax.Array) -> jax.Array:
  """x [B, N, ...], indices [B, M] -> [B, M, ...]."""
  indices = indices.reshape(indices.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, indices, axis=1)


def _top_k_flat(totals: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """totals [B, K, V] -> the n best (values, flat indices k * V + v) [B, n]
  with one top-k over K * V. Inside the decoding `while_loop` XLA:CPU
  lowers this top-k to a full sort of [B, K * V] (its TopK rewrite does not
  fire there): 97% of a beam-4 step of the demo model."""
  b, k, v = totals.shape
  return lax.top_k(totals.reshape(b, k * v), n)


def _top_k_per_beam(totals: jax.Array, n: int
                    ) -> tuple[jax.Array, jax.Array]:
  """The same result as `_top_k_flat`, ties included: the n best of each
  beam [B, K, n] (every one of the overall n best is among its beam's n
  best), then the n best of those K * n. lax.top_k puts the lower index
  first among equal values, and both stages keep the flat order (beam,
  then token), so equal values come out in the same order. The per-beam
  top-k stays XLA:CPU's TopK kernel inside the loop; the second stage
  sorts only K * n values per sentence."""
  b, k, v = totals.shape
  m = min(n, v)  # a vocabulary smaller than n: every token of every beam
  values, tokens = lax.top_k(totals, m)                     # [B, K, m]
  best, where = lax.top_k(values.reshape(b, k * m), n)      # [B, n]
  tokens = jnp.take_along_axis(tokens.reshape(b, k * m), where, axis=1)
  return best, (where // m) * v + tokens


def beam_search(logits_fn: LogitsFn, init_cache: Any, batch_size: int, *,
                beam_size: int, max_len: int, length_penalty: float = 1.0,
                eos_id: int = models.EOS_ID, bos_id: int = models.BOS_ID,
                pad_id: int | None = models.PAD_ID,
                min_len: int = 1, done: jax.Array | None = None,
                flat_top_k: bool = False) -> tuple[jax.Array, jax.Array]:
  """Beam search over `max_len` steps; jittable, batched.

  Args:
    logits_fn: `(cache, last_tokens [B*K, 1]) -> (logits [B*K, V], cache)`;
      logits or log-probabilities (log_softmax is applied). Row b*K + k is
      beam k of sentence b.
    init_cache: the cache for B sentences (leaves [B, ...]; scalar leaves,
      such as flax's cache index, are shared); it is tiled to B*K here.
    batch_size: B.
    beam_size: K (1 = greedy).
    max_len: most tokens per hypothesis, EOS included (EOS is forced at
      the last step).
    length_penalty: fairseq's --lenpen: score = logprob / length ** lp.
    eos_id, bos_id: EOS ends a hypothesis; BOS is the first decoder input.
    pad_id: never generated and fills tokens after EOS (None: 0 fills, and
      no token is banned).
    min_len: EOS is banned while fewer than min_len tokens were generated
      (fairseq's --min-len, default 1: no empty hypothesis).
    done: bool [B], sentences not to decode (e.g. the filler rows of a
      padded batch): they return PAD only and do not keep the loop going.
    flat_top_k: pick the 2K candidates with one top-k over all K * V
      continuations (the slow path before `_top_k_per_beam`, kept for
      `benchmarks.efficiency`'s before/after; the results are identical).

  Returns:
    tokens [B, K, max_len] int32, best first, PAD after EOS, without BOS;
    scores [B, K] float32 (-inf for an empty slot).
  """
  k, b = beam_size, batch_size
  fill = 0 if pad_id is None else pad_id

  seqs0 = jnp.full((b, k, max_len + 1), fill, jnp.int32).at[:, :, 0].set(
      bos_id)
  state0 = BeamState(
      step=jnp.zeros((), jnp.int32),
      live_seqs=seqs0,
      # Only beam 0 is live at the start (fairseq: lprobs[:, ::beam_size]).
      live_logprobs=jnp.tile(
          jnp.array([[0.0] + [-np.inf] * (k - 1)], jnp.float32), (b, 1)),
      finished_seqs=seqs0,
      finished_scores=jnp.full((b, k), NEG_INF, jnp.float32) if done is None
      else jnp.where(done[:, None], jnp.zeros((b, k), jnp.float32), NEG_INF),
      cache=jax.tree.map(functools.partial(_tile, beam_size=k), init_cache))

  def num_finished(state):
    return jnp.sum(state.finished_scores > NEG_INF, axis=1)  # [B]

  def cond(state):
    return (state.step < max_len) & jnp.any(num_finished(state) < k)

  def body(state):
    t = state.step
    last = lax.dynamic_slice_in_dim(state.live_seqs, t, 1, axis=2)
    logits, cache = logits_fn(state.cache, last.reshape(b * k, 1))
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    vocab = log_probs.shape[-1]
    token = jnp.arange(vocab)
    banned = (token == eos_id) & (t < min_len)
    banned |= (token != eos_id) & (t == max_len - 1)
    if pad_id is not None:
      banned |= token == pad_id
    log_probs = jnp.where(banned[None, :], NEG_INF, log_probs)
    log_probs = log_probs.reshape(b, k, vocab)

    # The 2K best continuations of the live beams. --> [B, 2K]
    totals = state.live_logprobs[:, :, None] + log_probs
    top_k = _top_k_flat if flat_top_k else _top_k_per_beam
    cand_logprobs, cand_index = top_k(totals, 2 * k)
    cand_beam, cand_token = cand_index // vocab, cand_index % vocab
    cand_seqs = lax.dynamic_update_slice(
        _take_beams(state.live_seqs, cand_beam),
        cand_token[:, :, None].astype(jnp.int32), (0, 0, t + 1))
    cand_eos = cand_token == eos_id

    # Live: the K best continuations that do not end in EOS.
    live_logprobs, live_pick = lax.top_k(
        jnp.where(cand_eos, NEG_INF, cand_logprobs), k)
    live_seqs = _take_beams(cand_seqs, live_pick)
    parent = jnp.take_along_axis(cand_beam, live_pick, axis=1)
    rows = (jnp.arange(b)[:, None] * k + parent).reshape(b * k)
    cache = jax.tree.map(lambda x: x if x.ndim == 0 else x[rows], cache)

    # Finished: EOS continuations among the top K join the finished slots
    # in rank order, after those already there, until K slots are full.
    new_finished = cand_eos[:, :k] & (cand_logprobs[:, :k] > NEG_INF)
    new_scores = jnp.where(
        new_finished,
        cand_logprobs[:, :k] / (t + 1).astype(jnp.float32) ** length_penalty,
        NEG_INF)
    all_scores = jnp.concatenate([state.finished_scores, new_scores], axis=1)
    all_seqs = jnp.concatenate([state.finished_seqs, cand_seqs[:, :k]],
                               axis=1)
    order = jnp.where(all_scores > NEG_INF,
                      -jnp.arange(2 * k, dtype=jnp.float32)[None, :], NEG_INF)
    _, keep = lax.top_k(order, k)
    return BeamState(
        step=t + 1, live_seqs=live_seqs, live_logprobs=live_logprobs,
        finished_seqs=_take_beams(all_seqs, keep),
        finished_scores=jnp.take_along_axis(all_scores, keep, axis=1),
        cache=cache)

  final = lax.while_loop(cond, body, state0)

  # A sentence with nothing finished (only if every continuation was -inf)
  # returns its live beams.
  any_finished = num_finished(final) > 0
  seqs = jnp.where(any_finished[:, None, None], final.finished_seqs,
                   final.live_seqs)
  scores = jnp.where(any_finished[:, None], final.finished_scores,
                     final.live_logprobs)
  scores, best = lax.top_k(scores, k)  # best first
  return _take_beams(seqs, best)[:, :, 1:], scores


def fairseq_max_len(inputs: Any, max_len_a: float = 0.0,
                    max_len_b: int = 200, limit: int | None = None) -> int:
  """fairseq's decoding budget for a batch, as `beam_search`'s `max_len`.

  fairseq generates up to int(a * src_len + b) tokens plus EOS, where src_len
  is the batch's longest source (EOS included). Capped at `limit` (e.g. the
  model's `config.max_len`). `inputs` must be concrete (numpy or an array).
  """
  src_len = int(np.max(np.sum(np.asarray(inputs) != models.PAD_ID, axis=1)))
  max_len = int(max_len_a * src_len + max_len_b) + 1
  return max_len if limit is None else min(max_len, limit)


@functools.partial(jax.jit, static_argnames=(
    'model', 'beam_size', 'max_len', 'length_penalty', 'min_len',
    'flat_top_k'))
def _translate(model, variables, inputs, *, beam_size, max_len,
               length_penalty, min_len, flat_top_k=False):
  variables = {k: v for k, v in variables.items() if k != 'cache'}
  inputs = inputs.astype(jnp.int32)
  encoded = model.apply(variables, inputs, train=False,
                        method=models.Transformer.encode)
  cache = models.init_cache(model, variables, encoded, inputs, max_len)
  decoder = model.clone(
      config=dataclasses.replace(model.config, decode=True))
  beam_encoded = _tile(encoded, beam_size)
  beam_inputs = _tile(inputs, beam_size)

  def logits_fn(cache, last_tokens):
    logits, state = decoder.apply(
        {**variables, 'cache': cache}, beam_encoded, beam_inputs, last_tokens,
        train=False, method=models.Transformer.decode, mutable=['cache'])
    return logits[:, -1, :], state['cache']

  tokens, _ = beam_search(
      logits_fn, cache, inputs.shape[0], beam_size=beam_size, max_len=max_len,
      length_penalty=length_penalty, min_len=min_len,
      done=~jnp.any(inputs != models.PAD_ID, axis=1),  # filler rows
      flat_top_k=flat_top_k)
  return tokens[:, 0, :]


def translate(model: models.Transformer, variables: Any, inputs: Any, *,
              beam_size: int, max_len: int, length_penalty: float = 1.0,
              min_len: int = 1, flat_top_k: bool = False) -> jax.Array:
  """Beam-search translations of `inputs` [B, S] -> tokens [B, max_len].

  Eval mode (running statistics, no dropout). Each row is the best
  hypothesis, EOS-terminated, PAD after EOS, without BOS. `max_len` counts
  EOS (see `fairseq_max_len`) and must not exceed `model.config.max_len`.
  Compiled once per (model, shapes, beam_size, max_len, length_penalty).
  `flat_top_k`: the slower candidate selection of before (`beam_search`).
  """
  if max_len > model.config.max_len:
    raise ValueError(f'translate: max_len={max_len} > model.config.max_len='
                     f'{model.config.max_len} (decoder positions).')
  if not math.isfinite(length_penalty):
    raise ValueError(f'translate: length_penalty={length_penalty}.')
  return _translate(model, dict(variables), jnp.asarray(inputs),
                    beam_size=beam_size, max_len=max_len,
                    length_penalty=float(length_penalty), min_len=min_len,
                    flat_top_k=bool(flat_top_k))
