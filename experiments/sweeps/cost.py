"""What a grid will cost before it runs: training FLOPs from each cell's
config, and device-hours at a given peak and model FLOP utilisation.

    python -m experiments.sweep --grid='iwslt:{layernorm,powernorm}' \
        --seeds=1-3 --estimate --peak_tflops=989 --mfu=0.4

Per trained token, the matmuls cost 2 FLOPs per weight forward and twice
that backward (6 x the weights a token passes through), plus attention's
scores and mixing, 12 x context x attention width per layer (the usual
approximation; norms, softmax and the optimizer are left out). Weights a
token passes through: an LM's layers and its output layer (an adaptive
softmax: its head only); translation's encoder per source token, its
decoder (self- and cross-attention) and output layer per target token,
with sources as long as targets and `max_tokens` target tokens per step.
Vocabulary sizes not in the config are those of the prepared corpora
(`VOCAB`). This is an estimate: measure the step on the device
(`python -m benchmarks.accelerator`) for the MFU to put in.
"""

from __future__ import annotations

from typing import Any

# Vocabulary sizes of the corpora whose configs leave them to the data:
# fairseq's IWSLT14 joint BPE (10k merges), Mikolov's PTB, WikiText-103.
VOCAB = {'iwslt': 10_000, 'lm:ptb': 10_000, 'lm:wt103': 267_735}
SENTENCE = 32  # tokens: the attention context assumed for translation


def _vocab(task: str, preset: str, config: Any) -> int:
  size = config.data.get('vocab_size', 0)
  if size:
    return size
  key = task if task != 'lm' else f'lm:{preset.split("_")[0]}'
  return VOCAB[key]


def _attention_width(m) -> int:
  head_dim = m.get('head_dim', 0) or m.d_model // m.num_heads
  return m.num_heads * head_dim


def flops_per_step(task: str, preset: str, config: Any) -> tuple[float, int]:
  """(training FLOPs of one step, target tokens per step)."""
  m, vocab = config.model, _vocab(task, preset, config)
  d, ffn, width = m.d_model, m.ffn_dim, _attention_width(m)
  attention = 4 * d * width  # q, k, v, output projections
  if task == 'lm':
    tokens = config.data.batch_size * config.data.seq_len
    cutoffs = tuple(m.get('adaptive_softmax_cutoffs', ()))
    output = d * ((cutoffs[0] + len(cutoffs)) if cutoffs else vocab)
    weights = m.num_decoder_layers * (attention + 2 * d * ffn) + output
    context = config.data.seq_len
    layers = m.num_decoder_layers
    return tokens * (6 * weights + 12 * layers * context * width), tokens
  tokens = config.data.max_tokens
  encoder = m.num_encoder_layers * (attention + 2 * d * ffn)
  decoder = m.num_decoder_layers * (2 * attention + 2 * d * ffn) + d * vocab
  layers = m.num_encoder_layers + 2 * m.num_decoder_layers
  per_token = (6 * (encoder + decoder)
               + 12 * layers * SENTENCE * width)
  return tokens * per_token, tokens


def estimate(task: str, preset: str, config: Any, peak_tflops: float,
             mfu: float, step_seconds: float = 0.0) -> dict[str, float]:
  """Tokens, FLOPs and device-hours of one run of `config`: from a
  measured `step_seconds` when given, else from the FLOPs at `mfu` of
  `peak_tflops`."""
  step_flops, tokens = flops_per_step(task, preset, config)
  steps = config.train.num_steps
  flops = step_flops * steps
  hours = (steps * step_seconds if step_seconds else
           flops / (peak_tflops * 1e12 * mfu)) / 3600
  return dict(steps=steps, tokens=tokens * steps, flops=flops, hours=hours)


def markdown(rows: list[dict], seeds: int, peak_tflops: float,
             mfu: float, step_seconds: float = 0.0) -> str:
  """One line per cell and the grid's total."""
  basis = (f'a measured {step_seconds:g} s per step' if step_seconds else
           f'{peak_tflops:g} TFLOP/s peak at an assumed {100 * mfu:g}% MFU '
           '(a lower bound for small models, which do not fill a GPU: '
           'measure the step with python -m benchmarks.accelerator and pass '
           '--step_seconds)')
  lines = [f'Device-hours from {basis}.', '',
           '| cell | steps | tokens / run | PFLOP / run | device-hours / run '
           f'| device-hours x {seeds} seeds |', '|' + ' --- |' * 6]
  for r in rows:
    lines.append(f"| {r['cell']} | {r['steps']:,} | {r['tokens']:.3g} | "
                 f"{r['flops'] / 1e15:,.0f} | {r['hours']:.2f} | "
                 f"{r['hours'] * seeds:.1f} |")
  total = sum(r['hours'] for r in rows) * seeds
  lines.append(f'\nThe grid: {len(rows)} cells x {seeds} seeds = '
               f'{total:.1f} device-hours.')
  return '\n'.join(lines) + '\n'
