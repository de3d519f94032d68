"""Word-level language-model presets: PTB and WikiText-103 (paper Table 1).

    python -m experiments.lm --config=ptb_powernorm --config.data.path=data/ptb
    python -m experiments.lm --config=ptb_powernorm,small   # small budget
    python -m experiments.lm --config=ptb_powernorm,demo    # embedded corpus

The PowerNorm repository has no language-model code; its issue #1 points to
the baseline of Ma et al. (2019), a Transformer-XL code base without memory
(spec §1.11): PTB 3 layers, WikiText-103 6 layers, d_model 256, 1 head of
dimension 40, FFN 2100, Adam lr 2.5e-4 with cosine decay, target length 32
(PTB) / 80 (WT103), batch 120 / 60, full softmax (PTB) / adaptive softmax
(WT103). Kept from that code base: post-norm (Transformer-XL's default
`pre_lnorm=False`), tied embeddings, dropout after the attention, the ReLU
and the FFN, gradient clipping at 0.25, torch Adam betas (0.9, 0.999).
Differences: absolute sinusoidal positions instead of relative ones, and
fairseq's initialisation. What the PN authors changed on top of the
baseline is not published; the norm is swapped at every site.

Paper test perplexities (Table 1; spec §1.12 marks the absolute values as
recalled, the PN-LN gaps 5.6 / 3.0 as verified): PTB LN 53.2, BN 72.4,
PN-V 59.7, PN 47.6; WikiText-103 LN 20.9, BN 30.4, PN-V 22.5, PN 17.9.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from experiments import configs
from experiments.configs import common

SITES = tuple(s for s in common.SITES if s.startswith('decoder_'))  # the LM's
PAPER_PPL = {  # (PTB, WikiText-103) test perplexity, paper Table 1
    'layernorm': (53.2, 20.9), 'batchnorm': (72.4, 30.4),
    'pn_v': (59.7, 22.5), 'powernorm': (47.6, 17.9), 'unified': None,
    'batchnorm_flax': None}


def ptb_base() -> ml_collections.ConfigDict:
  """Ma et al.'s PTB baseline (run_ptb.sh): 3 layers, 20k steps."""
  c = ml_collections.ConfigDict()
  c.seed = 1
  c.model = ml_collections.ConfigDict(dict(
      d_model=256, num_heads=1, head_dim=40, ffn_dim=2100,
      num_decoder_layers=3, dropout=0.3, attention_dropout=0.0,
      activation_dropout=0.3, share_embeddings=True, placement='post',
      max_len=512, adaptive_softmax_cutoffs=(),
      dtype='float32'))  # compute dtype; params and norm statistics float32
  c.model.norms = ml_collections.ConfigDict(
      {s: common.layernorm() for s in SITES})
  c.data = ml_collections.ConfigDict(dict(
      source='local', path='data/ptb', train_file='', valid_file='',
      test_file='', lowercase=False, vocab_size=0, tfds_name='wikitext103',
      tfds_data_dir='', text_field='text',
      tfds_splits=ml_collections.ConfigDict(
          dict(train='train', valid='validation', test='test')),
      synthetic_seed=0, synthetic_train_lines=30000,
      synthetic_valid_lines=2500, synthetic_test_lines=2500,
      batch_size=120, seq_len=32, eval_batch_size=60, eval_seq_len=32))
  c.optim = ml_collections.ConfigDict(dict(
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=0.25,
      label_smoothing=0.0, **common.optimizer_choice()))
  c.train = ml_collections.ConfigDict(dict(
      num_steps=20000, log_every=200, eval_every=4000, checkpoint_every=1000,
      keep_checkpoints=3, early_stop_patience=0,
      probe_every=0, probe_exact_gradient=False,  # experiments.probing
      # A NaN/Inf loss or gradient: 'stop' (naming the step and layer) or
      # 'skip' the step, at most nonfinite_max_skips steps in a row.
      nonfinite='stop', nonfinite_max_skips=10,
      # Stop when a step's loss exceeds this multiple of the median of the
      # last 100 or of log(vocabulary size) (faults.DivergenceWatch); 0: off.
      divergence_factor=10.0))
  c.schedule = ml_collections.ConfigDict(dict(
      kind='cosine', peak_lr=2.5e-4, warmup_steps=0, min_lr=0.0,
      decay_steps=common.follows(c.train, 'num_steps'), warmup_init_lr=0.0))
  c.mesh = common.mesh()
  c.ln_removal = ln_removal()
  return c


def ln_removal() -> ml_collections.ConfigDict:
  """experiments.ln_removal: LayerNorm removal by fine-tuning (Baroni et al.
  2025; zoo spec §9), the schedule of submarat/removing-layer-norm's
  `gpt2_standard` in optimizer steps: the FFN norm (ln_2) of layer i at
  start + i * gap_ffn, then the attention norm's Q/K path (ln_1qk) every
  gap_qk steps, its V path (ln_1v) every gap_v steps, then the final norm;
  fine-tuning to num_steps with AdamW, cosine lr from peak_lr to min_lr
  after warmup_steps, weight decay 0.01, clipping 1.0. sigma: per norm, the
  mean of sqrt(var + eps) over calibration_batches training batches of the
  trained model (the paper's std_dict)."""
  return ml_collections.ConfigDict(dict(
      start=20, gap_ffn=2, gap_qk=2, gap_v=3, num_steps=300, peak_lr=6e-4,
      min_lr=3e-4, warmup_steps=25, weight_decay=0.01, clip_norm=1.0,
      calibration_batches=8, log_every=25))


def wt103_base() -> ml_collections.ConfigDict:
  """Ma et al.'s WikiText-103 baseline (run_wt103.sh): 6 layers, 200k steps,
  adaptive softmax with Transformer-XL's cutoffs 20k / 40k / 200k."""
  c = ptb_base()
  c.model.update(dict(num_decoder_layers=6, dropout=0.1,
                      activation_dropout=0.1,
                      adaptive_softmax_cutoffs=(20000, 40000, 200000)))
  c.data.update(dict(source='tfds', path='data/wikitext-103', batch_size=60,
                     seq_len=80, eval_batch_size=10, eval_seq_len=80))
  c.train.update(dict(num_steps=200000, eval_every=4000, checkpoint_every=4000))
  return c


def norm(kind: str, c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The norm of `kind` with the options the translation presets use.

  PowerNorm: groups = heads; warmup 1000 steps, NormSelect's default when it
  is not tied to an lr warmup (the LM schedule has none). UN: the NMT
  recipe's window 4, its warmup shortened to 1000 steps likewise.
  'batchnorm' is the paper's BN (the official MaskSyncBatchNorm,
  `paper_batchnorm`); 'batchnorm_flax' normjax's flax-style masked BN.
  """
  if kind == 'layernorm':
    return common.layernorm()
  if kind == 'batchnorm':
    return common.paper_batchnorm()
  if kind == 'batchnorm_flax':
    return common.flax_batchnorm()
  if kind == 'pn_v':
    return ml_collections.ConfigDict(dict(
        kind='pn_v', epsilon=1e-5,
        num_groups=common.follows(c.model, 'num_heads'), momentum=0.9))
  if kind == 'powernorm':
    return common.powernorm_site(c, warmup=1000)
  if kind == 'unified':
    return ml_collections.ConfigDict(dict(
        kind='unified', epsilon=1e-5, window_size=4, warmup_steps=1000,
        momentum=0.9, outlier_filtration=False, mean_over='padded'))
  raise KeyError(kind)


def _preset(base: Callable[[], ml_collections.ConfigDict], kind: str,
            corpus: int) -> Callable[[], ml_collections.ConfigDict]:
  def make():
    c = base()
    for site in SITES:
      c.model.norms[site] = norm(kind, c)
    return c
  paper = PAPER_PPL[kind]
  name = ('PTB', 'WikiText-103')[corpus]
  make.__doc__ = (f'{kind} at every site; paper {name} test perplexity '
                  f'{paper[corpus]}.' if paper else
                  f'{kind} at every site; not in the PowerNorm paper.')
  return make


PRESETS: dict[str, Callable[[], ml_collections.ConfigDict]] = {}
for _kind in PAPER_PPL:
  PRESETS[f'ptb_{_kind}'] = _preset(ptb_base, _kind, 0)
  PRESETS[f'wt103_{_kind}'] = _preset(wt103_base, _kind, 1)


def _set_norm_warmups(c: ml_collections.ConfigDict, steps: int) -> None:
  for site in SITES:
    if c.model.norms[site].kind in ('powernorm', 'unified'):
      c.model.norms[site].warmup_steps = steps


def _set_warmup(c: ml_collections.ConfigDict, steps: int) -> None:
  """The lr warmup of a modifier, except for nGPT (`ngpt`: none)."""
  if c.model.get('architecture', 'transformer') != 'ngpt':
    c.schedule.warmup_steps = steps


def small(c):
  """PTB on a small budget: 700 steps of 64 x 32 tokens (~1.5 epochs).

  The baseline model; lr 1e-3 with 100 warmup steps and cosine decay to 0,
  dropout 0.1, norm warmups 200 steps. Timings: README.
  """
  c.data.batch_size = 64
  c.model.update(dict(dropout=0.1, activation_dropout=0.1))
  c.schedule.peak_lr = 1e-3
  _set_warmup(c, 100)
  c.train.update(dict(num_steps=700, log_every=50, eval_every=350,
                      checkpoint_every=100, keep_checkpoints=3))
  _set_norm_warmups(c, 200)


def short(c):
  """PTB in about 6 minutes on 2 cores, for seed sweeps: `small` cut to
  400 steps of 64 x 32 tokens (0.9 epoch), lr and norm warmups 100 steps,
  validation every 100 steps. Sized from a measured 0.75 s per step of
  `ptb_powernorm,small` on the quiet 2-core CPU (README: the PTB sweep).
  """
  small(c)
  _set_warmup(c, 100)
  c.train.update(dict(num_steps=400, log_every=50, eval_every=100,
                      checkpoint_every=100, keep_checkpoints=2))
  _set_norm_warmups(c, 100)


def demo(c):
  """The embedded synthetic corpus, a small model: ~2 minutes on 2 cores."""
  c.data.update(dict(source='synthetic', batch_size=32, seq_len=64,
                     eval_batch_size=32, eval_seq_len=64))
  c.model.update(dict(d_model=128, head_dim=0, num_heads=2, ffn_dim=256,
                      num_decoder_layers=2, dropout=0.1,
                      activation_dropout=0.0, adaptive_softmax_cutoffs=()))
  c.schedule.peak_lr = 2e-3
  _set_warmup(c, 50)
  c.train.update(dict(num_steps=400, log_every=50, eval_every=200,
                      checkpoint_every=100, keep_checkpoints=2))
  _set_norm_warmups(c, 100)


def smoke(c):
  """A few steps of a tiny model, for tests."""
  demo(c)
  c.data.update(dict(synthetic_train_lines=400, synthetic_valid_lines=20,
                     synthetic_test_lines=20, batch_size=8, seq_len=8,
                     eval_batch_size=8, eval_seq_len=8))
  c.model.update(dict(d_model=32, ffn_dim=64, num_heads=2,
                      num_decoder_layers=1))
  _set_warmup(c, 2)
  c.train.update(dict(num_steps=6, log_every=2, eval_every=6,
                      checkpoint_every=3, keep_checkpoints=2))
  _set_norm_warmups(c, 3)


def ngpt(c):
  """nGPT (Loshchilov et al. 2024, experiments.ngpt): model.architecture
  'ngpt', hidden states and weight rows on the unit sphere, no norms (every
  site 'none'), no dropout; the paper's optimizer settings: no weight decay
  and no lr warmup (kept by `small`, `demo` and `smoke` too)."""
  c.model.architecture = 'ngpt'
  c.model.update(dict(dropout=0.0, attention_dropout=0.0,
                      activation_dropout=0.0))
  for site in list(c.model.norms.keys()):
    c.model.norms[site] = ml_collections.ConfigDict(dict(kind='none'))
  c.optim.weight_decay = 0.0
  c.schedule.warmup_steps = 0


MODIFIERS: dict[str, Callable[[ml_collections.ConfigDict], None]] = {
    'small': small,
    'short': short,
    'demo': demo,
    'smoke': smoke,
    'ngpt': ngpt,
    **common.PLACEMENT_MODIFIERS,
}


def get_config(arg: str = 'ptb_layernorm'):
  return configs.build(PRESETS, arg, MODIFIERS)
