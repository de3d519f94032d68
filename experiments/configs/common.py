"""Shared pieces of the translation presets: the base config, norm choices,
and the modifiers appended to a preset name (`--config=powernorm,demo`).

Config layout (nested by concern):
  model.*        TransformerConfig fields; model.norms.<site> = dict(kind, ...)
  data.*         experiments.data.load_translation fields, plus batching
  optim.*        Adam(W) or AdamP, optional NaP projection, label smoothing,
                 clipping
  schedule.*     learning-rate schedule
  train.*        steps, logging, evaluation and checkpoint cadence
  decode.*       beam search and scoring
  mesh.*         device mesh axis sizes and logical axis rules
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from experiments.data.batching import MAX_BUCKETS
from experiments.models import PLACEMENTS
from experiments.models import SITES


def layernorm(eps: float = 1e-5) -> ml_collections.ConfigDict:
  """fairseq's LayerNorm (eps 1e-5)."""
  return ml_collections.ConfigDict(dict(kind='layernorm', epsilon=eps))


def translation_base() -> ml_collections.ConfigDict:
  """The IWSLT14 pre-norm Transformer of the PowerNorm repository (spec §1.11).

  transformer_iwslt_de_en_v2: 6+6 layers, d 512, FFN 1024, 4 heads, pre-norm,
  shared embeddings; Adam (0.9, 0.98), inverse-sqrt lr 1.5e-3 with 8k warmup
  from 1e-7, weight decay 1e-4, label smoothing 0.1, dropout 0.3/0.1/0.1,
  4096 tokens per batch, beam 5, average of the last 5 checkpoints.
  """
  c = ml_collections.ConfigDict()
  c.seed = 1
  c.model = ml_collections.ConfigDict(dict(
      d_model=512, num_heads=4, ffn_dim=1024, num_encoder_layers=6,
      num_decoder_layers=6, dropout=0.3, attention_dropout=0.1,
      activation_dropout=0.1, share_embeddings=True, placement='pre',
      max_len=1024,
      dtype='float32'))  # compute dtype; params and norm statistics float32
  c.model.norms = ml_collections.ConfigDict({s: layernorm() for s in SITES})

  c.data = ml_collections.ConfigDict(dict(
      source='local', path='data/iwslt14.tokenized.de-en', src_lang='de',
      tgt_lang='en', train_prefix='train', valid_prefix='valid',
      test_prefix='test', suffix='', tfds_name='', tfds_data_dir='',
      tfds_splits=ml_collections.ConfigDict(
          dict(train='train', valid='validation', test='test')),
      vocab='word', vocab_size=0, max_len=1024, lowercase=False,
      synthetic_train=20000, synthetic_valid=500, synthetic_test=500,
      synthetic_seed=0, max_train_examples=0,
      max_tokens=4096,  # per optimizer step, over all devices
      max_buckets=MAX_BUCKETS,  # length buckets, each its own programs
  ))

  c.optim = ml_collections.ConfigDict(dict(
      b1=0.9, b2=0.98, eps=1e-8, weight_decay=1e-4, clip_norm=0.0,
      label_smoothing=0.1, **optimizer_choice()))
  c.schedule = ml_collections.ConfigDict(dict(
      kind='inverse_sqrt', peak_lr=1.5e-3, warmup_steps=8000,
      warmup_init_lr=1e-7))
  c.train = ml_collections.ConfigDict(dict(
      num_steps=60000,  # fairseq stopped early (patience 5 epochs), ~55 epochs
      log_every=100, eval_every=1000, checkpoint_every=1000,
      keep_checkpoints=5, early_stop_patience=5, eval_bleu_examples=500,
      probe_every=0, probe_exact_gradient=False,  # experiments.probing
      # A NaN/Inf loss or gradient: 'stop' (naming the step and layer) or
      # 'skip' the step, at most nonfinite_max_skips steps in a row.
      nonfinite='stop', nonfinite_max_skips=10,
      # Stop when a step's loss exceeds this multiple of the median of the
      # last 100 or of log(vocabulary size) (faults.DivergenceWatch); 0: off.
      divergence_factor=10.0))
  c.decode = ml_collections.ConfigDict(dict(
      beam_size=5, length_penalty=1.0, max_len_a=1.2, max_len_b=10,
      average_last=5, lowercase_bleu=True, batch_tokens=8192))
  c.mesh = mesh()
  return c


# The weights NaP projects by default: the query/key kernels, scale-invariant
# (per head) when the attention has a QK-norm (model.qk_norm).
NAP_PARAMS = r'(query|key)/kernel$'


def optimizer_choice() -> dict:
  """optim.kind 'adam' (AdamW) or 'adamp' (AdamP, normjax.optim.adamp: delta,
  wd_ratio, nesterov at the official defaults); optim.nap: NaP's projection
  (normjax.optim.nap_project) after the step for the params whose
  '/'-joined path matches the regex optim.nap_params."""
  return dict(kind='adam', delta=0.1, wd_ratio=0.1, nesterov=False,
              nap=False, nap_params=NAP_PARAMS)


def mesh() -> ml_collections.ConfigDict:
  """Data parallel over every device; logical axes for fsdp/tensor."""
  return ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, tensor=1,  # -1: every remaining device
      rules=[('batch', ('data', 'fsdp')), ('vocab', 'tensor'),
             ('embed', 'fsdp'), ('mlp', 'tensor'), ('heads', 'tensor'),
             ('kv', None), ('length', None)]))


def follows(section: ml_collections.ConfigDict, field: str
            ) -> ml_collections.FieldReference:
  """A default that follows `section.<field>` until it is set itself.

  Each call makes a reference of its own (a derived FieldReference), so
  setting the follower, e.g. `--config.model.norms.encoder_ffn.num_groups=2`,
  changes that value only, never `field` or another follower; setting
  `field` moves every follower not set itself.
  """
  return section.get_ref(field).identity()


def powernorm_site(c: ml_collections.ConfigDict, warmup=None):
  """The official PowerNorm: groups = heads, warmup = the lr warmup.

  Both follow (`follows`; fairseq's NormSelect ties them): overriding
  `schedule.warmup_steps` or `model.num_heads` moves the norms not set
  themselves.
  """
  return ml_collections.ConfigDict(dict(
      kind='powernorm', epsilon=1e-5,
      num_groups=follows(c.model, 'num_heads'),
      warmup_steps=(follows(c.schedule, 'warmup_steps') if warmup is None
                    else warmup),
      alpha_fwd=0.9, alpha_bkw=0.9, backward_denominator='batch',
      grad_mean_over='padded'))


def encoder_norms(c: ml_collections.ConfigDict,
                  make: Callable[[], ml_collections.ConfigDict],
                  final: ml_collections.ConfigDict | None = None):
  """`power power layer layer`: the paper swaps the encoder norms only."""
  c.model.norms.encoder_attention = make()
  c.model.norms.encoder_ffn = make()
  c.model.norms.encoder_final = make() if final is None else final


def set_layernorm(c):
  """Transformer_LN: LayerNorm at every site (paper: IWSLT14 35.5, WMT14 29.5)."""
  del c


def paper_batchnorm() -> ml_collections.ConfigDict:
  """The paper's BN: the official MaskSyncBatchNorm (normjax
  `paper_batchnorm`) at its defaults, which NormSelect('batch') keeps: torch
  momentum 0.05 (flax 0.95), eps 1e-5, LayerScaling eps 1e-5."""
  return ml_collections.ConfigDict(dict(
      kind='paper_batchnorm', epsilon=1e-5, momentum=0.95,
      layer_scaling_eps=1e-5))


def flax_batchnorm() -> ml_collections.ConfigDict:
  """normjax's flax-style masked BatchNorm with the official momentum."""
  return ml_collections.ConfigDict(
      dict(kind='batchnorm', epsilon=1e-5, momentum=0.95))


def set_batchnorm(c):
  """Transformer_BN: the paper's BN in the encoder (paper: 34.4 / 28.1).

  The official MaskSyncBatchNorm (`paper_batchnorm`): LayerScaling, pads
  replaced by the batch mean (variance over every row), torch momentum 0.05
  with the unbiased running variance, eps 1e-5.
  """
  encoder_norms(c, paper_batchnorm)


def set_batchnorm_flax(c):
  """Masked flax-style BatchNorm in the encoder (not in the paper).

  `batchnorm` (statistics over real tokens only, no LayerScaling, biased
  running variance) with the official momentum 0.95 and eps 1e-5: the
  textbook masked BN, against which the paper's BN row can be compared.
  """
  encoder_norms(c, flax_batchnorm)


def set_pn_v(c):
  """Transformer_PN-V: batch quadratic mean in the encoder (paper: 35.5 / 28.5)."""
  encoder_norms(c, lambda: ml_collections.ConfigDict(dict(
      kind='pn_v', epsilon=1e-5, num_groups=follows(c.model, 'num_heads'),
      momentum=0.9)))


def set_powernorm(c):
  """Transformer_PN, `power power layer layer` (paper: 35.9 / 30.1).

  The final encoder norm gets NormSelect's default warmup of 1000 steps, not
  the lr warmup: an official-code quirk kept here (spec §1.1).
  """
  encoder_norms(c, lambda: powernorm_site(c),
                final=powernorm_site(c, warmup=1000))


def set_unified(c):
  """Unified Normalization everywhere, the UN repository's IWSLT14 recipe.

  UN README: 35.4 BLEU (LN 35.3). `--norm-type UN1d --un-win 4 --un-warmup
  4000`, no outlier filtration for NMT, lr 7e-4 with 6000 warmup steps,
  100k updates, average of the last 10 checkpoints (spec §2.8).
  """
  for site in SITES:
    c.model.norms[site] = ml_collections.ConfigDict(dict(
        kind='unified', epsilon=1e-5, window_size=4, warmup_steps=4000,
        momentum=0.9, outlier_filtration=False, mean_over='padded'))
  c.schedule.peak_lr = 7e-4
  c.schedule.warmup_steps = 6000
  c.train.num_steps = 100000
  c.decode.average_last = 10
  c.train.keep_checkpoints = 10


def make_presets(base: Callable[[], ml_collections.ConfigDict],
                 adjust: Callable[[str, ml_collections.ConfigDict], None]
                 = lambda norm, c: None) -> dict[str, Callable]:
  """{norm name: preset()} over `base`, each documented by its norm setter."""
  def preset(norm):
    def make():
      c = base()
      NORM_PRESETS[norm](c)
      adjust(norm, c)
      return c
    make.__doc__ = NORM_PRESETS[norm].__doc__
    return make
  return {name: preset(name) for name in NORM_PRESETS}


NORM_PRESETS: dict[str, Callable[[ml_collections.ConfigDict], None]] = {
    'layernorm': set_layernorm,
    'batchnorm': set_batchnorm,
    'batchnorm_flax': set_batchnorm_flax,
    'pn_v': set_pn_v,
    'powernorm': set_powernorm,
    'unified': set_unified,
}


def demo(c):
  """The embedded synthetic task, small model: <= 5 minutes on 2 CPU cores."""
  c.data.source = 'synthetic'
  c.data.vocab = 'word'
  c.data.lowercase = False
  c.data.max_len = 64
  c.data.max_tokens = 2048
  c.model.update(dict(d_model=128, ffn_dim=256, num_encoder_layers=2,
                      num_decoder_layers=2, dropout=0.1, attention_dropout=0.0,
                      activation_dropout=0.0, max_len=128))
  c.model.num_heads = 4
  c.schedule.warmup_steps = 300
  c.schedule.peak_lr = 3e-3
  c.optim.weight_decay = 0.0
  c.train.update(dict(num_steps=600, log_every=50, eval_every=300,
                      checkpoint_every=200, keep_checkpoints=3,
                      eval_bleu_examples=500))
  c.decode.update(dict(beam_size=4, average_last=3, lowercase_bleu=False))
  _shorten_norm_warmups(c, 300)


def smoke(c):
  """A few steps of a tiny model, for tests."""
  demo(c)
  c.data.synthetic_train = 600
  c.data.synthetic_valid = 8
  c.data.synthetic_test = 8
  c.data.max_tokens = 512
  c.data.max_buckets = 1  # one shape: 27.6 -> 16.1 s a run on 8 devices
  c.model.update(dict(d_model=32, ffn_dim=64, num_encoder_layers=1,
                      num_decoder_layers=1))
  c.model.num_heads = 2
  c.schedule.warmup_steps = 4
  c.train.update(dict(num_steps=6, log_every=2, eval_every=6,
                      checkpoint_every=3, keep_checkpoints=2,
                      eval_bleu_examples=8))
  c.decode.update(dict(beam_size=1, average_last=2, max_len_a=0.0,
                       max_len_b=6))
  _shorten_norm_warmups(c, 3)


def multi30k(c):
  """Real German->English data (Multi30k, 29k pairs), ~30 minutes on 2 cores.

  Reads ../shared/data/multi30k_de_en/task1/tok (Moses-tokenized,
  lowercased); a joint 8k sentencepiece vocabulary is trained and cached.
  """
  c.data.update(dict(
      source='local', path='../shared/data/multi30k_de_en/task1/tok',
      src_lang='de', tgt_lang='en', train_prefix='train', valid_prefix='val',
      test_prefix='test_2016_flickr', suffix='.lc.norm.tok',
      vocab='sentencepiece', vocab_size=8000, max_len=128, max_tokens=4096))
  c.model.update(dict(d_model=256, ffn_dim=512, num_encoder_layers=3,
                      num_decoder_layers=3, dropout=0.3, max_len=256))
  c.model.num_heads = 4
  c.schedule.warmup_steps = 300
  c.schedule.peak_lr = 1.5e-3
  # ~3 s per step on 2 CPU cores: 400 steps (~2.3 epochs of 4096 tokens),
  # then the average of the last 3 checkpoints is decoded; timings: README.
  c.train.update(dict(num_steps=400, log_every=50, eval_every=200,
                      checkpoint_every=100, keep_checkpoints=5,
                      early_stop_patience=0, eval_bleu_examples=200))
  c.decode.average_last = 3
  _shorten_norm_warmups(c, 300)


def _shorten_norm_warmups(c, final_warmup: int):
  """Fixed (non-tied) warmups, e.g. the final PowerNorm's 1000, scale down."""
  for site in SITES:
    norm = c.model.norms[site]
    if norm.kind == 'powernorm' and site == 'encoder_final':
      norm.warmup_steps = final_warmup
    if norm.kind == 'unified':
      norm.warmup_steps = final_warmup


# The site a placement's own site (models.PLACEMENT_SITES) starts as a copy
# of, in the same stack.
_LIKE = {'qkv': 'attention', 'attention_out': 'attention', 'ffn_mid': 'ffn'}


def following(site: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A norm site whose every field follows `site`'s (`follows`): setting
  one of its fields changes that field only."""
  return ml_collections.ConfigDict(
      {key: follows(site, key) for key in site.keys()})


def set_placement(name: str) -> Callable[[ml_collections.ConfigDict], None]:
  """The modifier `,<name>`: model.placement = name, plus the sites of
  the norms inside its sublayers (models.PLACEMENT_SITES), each following
  its stack's attention or FFN site (`following`) unless the config has it
  already; 'mix' adds model.mix_alpha (0.25)."""
  placement = PLACEMENTS[name]

  def modify(c):
    c.model.placement = name
    if name == 'mix' and 'mix_alpha' not in c.model:
      c.model.mix_alpha = 0.25
    for stack in ('encoder', 'decoder'):
      if f'{stack}_attention' not in c.model.norms:
        continue  # a language model: the decoder only
      for suffix in placement.sites:
        site = f'{stack}_{suffix}'
        if site not in c.model.norms:
          c.model.norms[site] = following(
              c.model.norms[f'{stack}_{_LIKE[suffix]}'])
  summary = ' '.join(placement.residual.__doc__.split('\n\n')[0].split())
  modify.__doc__ = f"model.placement='{name}': {summary}"
  return modify


# `,pre`, `,post`, `,peri`, `,mix`, `,lns`, `,reordered`, `,hybrid`,
# `,normformer` (the translation and language-model presets alike).
PLACEMENT_MODIFIERS: dict[str, Callable[[ml_collections.ConfigDict], None]] = {
    name: set_placement(name) for name in PLACEMENTS}


MODIFIERS: dict[str, Callable[[ml_collections.ConfigDict], None]] = {
    'demo': demo,
    'smoke': smoke,
    'multi30k': multi30k,
    **PLACEMENT_MODIFIERS,
}
