"""The embedded synthetic translation task: English-like -> made-up SOV text.

The task needs no download and is fully deterministic, yet a model must learn
attention, reordering and agreement to solve it:

Source (English-like SVO)::

    S   -> NP [that V NP] V NP [P NP]       # optional subject relative, PP
    NP  -> Det [Adj [Adj]] N                # 'the' | 'a' (sg) | 'some' (pl)

Target (pseudo-language, SOV)::

    S   -> [NP Post] NP [ze NP V'] NP V'    # the PP moves to the FRONT and the
                                            # preposition becomes a postposition
    NP  -> Det' N' [Adj' [Adj']]            # adjectives FOLLOW the noun

Agreement: every noun has a grammatical gender (m/f/n). The target determiner
is chosen by (definiteness, number, gender) of its noun (12 forms) and the
target verb carries a suffix chosen by the (number, gender) of its subject
(6 suffixes; the relative-clause verb agrees with the head noun). Target
nouns do not inflect: number is visible only on the determiner and the verb.

Lexicon: a fixed one-to-one mapping of source words to pseudo-words; some
nouns are two-token compounds (`man -> gupofe tilu`) and some verbs are
particle + verb (`visits -> gofe nutemo`). About 190 source and 260 target
word types, sentences of 5-20 tokens. The lexicon is built once from a fixed
seed, so it is the same for every `generate(seed, ...)`; the seed only picks
the sentences. Valid and test sources never occur in train. Example:

    some short men visit some roads near the kind coats
    kan putoko maderu beso win gupofe tilu kedu wan dipu gofe nutemet
    [the coats kind]-near [some men short] [some roads] visit-PL.N
"""

from __future__ import annotations

import dataclasses
import functools
import random

NUMBERS = ('sg', 'pl')
GENDERS = ('m', 'f', 'n')

# English nouns: (singular, plural).
_NOUNS = (
    ('dog', 'dogs'), ('cat', 'cats'), ('man', 'men'), ('woman', 'women'),
    ('child', 'children'), ('teacher', 'teachers'), ('farmer', 'farmers'),
    ('king', 'kings'), ('queen', 'queens'), ('bird', 'birds'),
    ('horse', 'horses'), ('mouse', 'mice'), ('fox', 'foxes'),
    ('wolf', 'wolves'), ('baker', 'bakers'), ('doctor', 'doctors'),
    ('student', 'students'), ('soldier', 'soldiers'), ('sailor', 'sailors'),
    ('friend', 'friends'), ('house', 'houses'), ('tree', 'trees'),
    ('river', 'rivers'), ('table', 'tables'), ('chair', 'chairs'),
    ('book', 'books'), ('letter', 'letters'), ('apple', 'apples'),
    ('box', 'boxes'), ('garden', 'gardens'), ('bridge', 'bridges'),
    ('car', 'cars'), ('boat', 'boats'), ('stone', 'stones'),
    ('flower', 'flowers'), ('window', 'windows'), ('door', 'doors'),
    ('road', 'roads'), ('hill', 'hills'), ('city', 'cities'),
    ('village', 'villages'), ('church', 'churches'), ('school', 'schools'),
    ('market', 'markets'), ('forest', 'forests'), ('lamp', 'lamps'),
    ('cup', 'cups'), ('knife', 'knives'), ('coat', 'coats'),
    ('song', 'songs'),
)
# English transitive verbs: (3rd person singular, plural).
_VERBS = (
    ('sees', 'see'), ('likes', 'like'), ('finds', 'find'),
    ('carries', 'carry'), ('follows', 'follow'), ('paints', 'paint'),
    ('watches', 'watch'), ('helps', 'help'), ('calls', 'call'),
    ('visits', 'visit'), ('builds', 'build'), ('buys', 'buy'),
    ('sells', 'sell'), ('cleans', 'clean'), ('opens', 'open'),
    ('hides', 'hide'), ('pushes', 'push'), ('pulls', 'pull'),
    ('remembers', 'remember'), ('forgets', 'forget'), ('admires', 'admire'),
    ('chases', 'chase'), ('meets', 'meet'), ('draws', 'draw'),
)
_ADJECTIVES = (
    'big', 'small', 'old', 'young', 'red', 'blue', 'green', 'white', 'black',
    'happy', 'sad', 'tall', 'short', 'quiet', 'loud', 'rich', 'poor', 'clever',
    'lazy', 'brave', 'strange', 'famous', 'heavy', 'light', 'warm', 'cold',
    'new', 'dark', 'bright', 'kind',
)
_PREPOSITIONS = ('in', 'on', 'near', 'under', 'behind', 'with', 'from',
                 'above')
_SRC_DET = {('def', 'sg'): 'the', ('def', 'pl'): 'the', ('indef', 'sg'): 'a',
            ('indef', 'pl'): 'some'}
_TGT_DET = {
    ('def', 'sg', 'm'): 'ka', ('def', 'sg', 'f'): 'ke',
    ('def', 'sg', 'n'): 'ki',
    ('def', 'pl', 'm'): 'kan', ('def', 'pl', 'f'): 'ken',
    ('def', 'pl', 'n'): 'kin', ('indef', 'sg', 'm'): 'u',
    ('indef', 'sg', 'f'): 'wa', ('indef', 'sg', 'n'): 'wi',
    ('indef', 'pl', 'm'): 'un', ('indef', 'pl', 'f'): 'wan',
    ('indef', 'pl', 'n'): 'win',
}
VERB_SUFFIX = {('sg', 'm'): 'o', ('sg', 'f'): 'a', ('sg', 'n'): 'e',
               ('pl', 'm'): 'ot', ('pl', 'f'): 'at', ('pl', 'n'): 'et'}
RELATIVE = ('that', 'ze')
_NUM_COMPOUND_NOUNS = 8
_NUM_PARTICLE_VERBS = 4
_LEXICON_SEED = 20240607


@dataclasses.dataclass(frozen=True)
class Lexicon:
  """The fixed lexicon of the task (also used by tests to check structure).

  nouns: source form -> (number, gender, target tokens)
  verbs: source form -> (number, target particle tokens, target stem)
  adjectives / prepositions: source word -> target word
  determiners: (definiteness, number, gender) -> target determiner
  """
  nouns: dict[str, tuple[str, str, tuple[str, ...]]]
  verbs: dict[str, tuple[str, tuple[str, ...], str]]
  adjectives: dict[str, str]
  prepositions: dict[str, str]
  determiners: dict[tuple[str, str, str], str]
  verb_suffix: dict[tuple[str, str], str]

  def target_verb(self, source_verb: str, gender: str) -> list[str]:
    """Target tokens of `source_verb` (whose number it carries) for `gender`."""
    number, particles, stem = self.verbs[source_verb]
    return [*particles, stem + self.verb_suffix[(number, gender)]]


def _pseudo_words(rng: random.Random, count: int, syllables: tuple[int, ...],
                  taken: set[str], final: str = '') -> list[str]:
  """`count` new distinct pseudo-words (CV syllables [+ final consonant])."""
  consonants, vowels = 'bdfgklmnprstvz', 'aeiou'
  words = []
  while len(words) < count:
    n = rng.choice(syllables)
    word = ''.join(rng.choice(consonants) + rng.choice(vowels)
                   for _ in range(n))
    word += rng.choice(final) if final else ''
    if word not in taken:
      taken.add(word)
      words.append(word)
  return words


@functools.cache
def lexicon() -> Lexicon:
  """Builds the task's lexicon (deterministic, independent of any seed)."""
  rng = random.Random(_LEXICON_SEED)
  taken = set(_TGT_DET.values()) | {RELATIVE[1]}
  # Verb stems end in a consonant, suffixes are a vowel (+t); the inflected
  # forms are reserved before the other words are drawn, so all are distinct.
  stems = _pseudo_words(rng, len(_VERBS), (2,), taken, final='lmnrs')
  taken.update(s + x for s in stems for x in VERB_SUFFIX.values())
  particles = _pseudo_words(rng, _NUM_PARTICLE_VERBS, (2,), taken)
  noun_words = _pseudo_words(rng, len(_NOUNS) + _NUM_COMPOUND_NOUNS, (2, 3),
                             taken)
  adjectives = _pseudo_words(rng, len(_ADJECTIVES), (2, 3), taken)
  prepositions = _pseudo_words(rng, len(_PREPOSITIONS), (2,), taken)

  nouns = {}
  compound_heads = noun_words[len(_NOUNS):]
  compound_nouns = set(rng.sample(range(len(_NOUNS)), _NUM_COMPOUND_NOUNS))
  for i, (singular, plural) in enumerate(_NOUNS):
    gender = rng.choice(GENDERS)
    target = (noun_words[i],)
    if i in compound_nouns:
      target = (noun_words[i], compound_heads.pop())
    nouns[singular] = ('sg', gender, target)
    nouns[plural] = ('pl', gender, target)
  particle_verbs = set(rng.sample(range(len(_VERBS)), _NUM_PARTICLE_VERBS))
  verbs = {}
  for i, (singular, plural) in enumerate(_VERBS):
    prefix = (particles.pop(),) if i in particle_verbs else ()
    verbs[singular] = ('sg', prefix, stems[i])
    verbs[plural] = ('pl', prefix, stems[i])
  return Lexicon(
      nouns=nouns, verbs=verbs,
      adjectives=dict(zip(_ADJECTIVES, adjectives)),
      prepositions=dict(zip(_PREPOSITIONS, prepositions)),
      determiners=dict(_TGT_DET), verb_suffix=dict(VERB_SUFFIX))


def _noun_phrase(rng: random.Random, lex: Lexicon):
  """Samples an NP; returns (source tokens, target tokens, number, gender)."""
  number = rng.choice(NUMBERS)
  definiteness = rng.choice(('def', 'indef'))
  singular, plural = rng.choice(_NOUNS)
  noun = singular if number == 'sg' else plural
  _, gender, noun_target = lex.nouns[noun]
  num_adjectives = 0
  if rng.random() < 0.35:
    num_adjectives = 2 if rng.random() < 0.15 else 1
  adjectives = rng.sample(_ADJECTIVES, num_adjectives)
  source = [_SRC_DET[(definiteness, number)], *adjectives, noun]
  target = [lex.determiners[(definiteness, number, gender)], *noun_target,
            *(lex.adjectives[a] for a in adjectives)]
  return source, target, number, gender


def _verb(rng: random.Random, number: str) -> str:
  singular, plural = rng.choice(_VERBS)
  return singular if number == 'sg' else plural


def sample_pair(rng: random.Random) -> tuple[str, str]:
  """One (source, target) sentence pair, whitespace-tokenized, lowercase."""
  lex = lexicon()
  subj_src, subj_tgt, number, gender = _noun_phrase(rng, lex)
  source, target = list(subj_src), list(subj_tgt)
  if rng.random() < 0.25:  # subject relative clause: "that V NP"
    verb = _verb(rng, number)
    obj_src, obj_tgt, _, _ = _noun_phrase(rng, lex)
    source += [RELATIVE[0], verb, *obj_src]
    target += [RELATIVE[1], *obj_tgt, *lex.target_verb(verb, gender)]
  verb = _verb(rng, number)
  obj_src, obj_tgt, _, _ = _noun_phrase(rng, lex)
  source += [verb, *obj_src]
  target += [*obj_tgt, *lex.target_verb(verb, gender)]
  if rng.random() < 0.4:  # PP at the end -> postpositional phrase in front
    preposition = rng.choice(_PREPOSITIONS)
    pp_src, pp_tgt, _, _ = _noun_phrase(rng, lex)
    source += [preposition, *pp_src]
    target = [*pp_tgt, lex.prepositions[preposition], *target]
  return ' '.join(source), ' '.join(target)


def generate(seed: int, num_train: int, num_valid: int,
             num_test: int) -> dict[str, tuple[list[str], list[str]]]:
  """Deterministic splits {'train'|'valid'|'test': (src_lines, tgt_lines)}.

  All sources are distinct, so valid/test pairs never appear in train.
  """
  if min(num_train, num_valid, num_test) < 0:
    raise ValueError('synthetic: cfg.synthetic_train/valid/test must be >= 0, '
                     f'got {num_train}/{num_valid}/{num_test}.')
  rng = random.Random(seed)
  total = num_valid + num_test + num_train
  seen: dict[str, str] = {}
  attempts = 0
  while len(seen) < total:
    attempts += 1
    if attempts > 20 * total + 1000:  # cannot happen for realistic sizes
      raise ValueError(f'synthetic: cannot draw {total} distinct sentences.')
    source, target = sample_pair(rng)
    seen.setdefault(source, target)
  pairs = list(seen.items())  # insertion order: deterministic
  bounds = {'valid': (0, num_valid),
            'test': (num_valid, num_valid + num_test),
            'train': (num_valid + num_test, total)}
  return {split: ([s for s, _ in pairs[a:b]], [t for _, t in pairs[a:b]])
          for split, (a, b) in bounds.items()}
