"""Named presets with modifiers and dotted overrides.

    python -m experiments.iwslt --config=powernorm
    python -m experiments.wmt --config=powernorm,demo --config.train.num_steps=500

`--config=<preset>[,<modifier>...]` picks a preset of the experiment's config
module (experiments/configs/<experiment>.py); the long form
`--config=experiments/configs/wmt.py:powernorm` works too. Dotted overrides
are type-checked and an unknown key is an error, because the config is locked.
Where a preset lets one value follow another (`common.follows`: PowerNorm's
groups follow `model.num_heads`), an override sets that value alone.
`validate.checked` fixes the values and checks them all at start-up.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import warnings

import ml_collections
from absl import flags
from ml_collections import config_flags

from experiments.configs import common

# Modules of this package that hold no experiment's presets.
HELPERS = ('__init__', 'common', 'validate')


class ConfigError(ValueError):
  """A user error in --config: reported as one line, without a traceback."""


def build(presets: dict, arg: str, modifiers: dict | None = None
          ) -> ml_collections.ConfigDict:
  """`preset[,modifier...]` -> a locked ConfigDict.

  `modifiers` defaults to the translation modifiers (common.MODIFIERS).
  """
  modifiers = common.MODIFIERS if modifiers is None else modifiers
  name, *mods = [p.strip() for p in arg.split(',')] if arg else ['']
  if name not in presets:
    example = f'{next(iter(presets))},{next(iter(modifiers))}'
    raise ConfigError(f'--config: unknown preset {name!r}; choose from '
                      f'{sorted(presets)} (optionally followed by modifiers '
                      f'{sorted(modifiers)}, e.g. {example}).')
  config = presets[name]()
  for mod in mods:
    if mod not in modifiers:
      raise ConfigError(f'--config: unknown modifier {mod!r} in {arg!r}; '
                        f'choose from {sorted(modifiers)}.')
    modifiers[mod](config)
  config.preset = arg
  config.lock()
  return config


def define_config_flag(experiment: str, default: str = 'layernorm'
                       ) -> flags.FlagHolder:
  """Defines --config for experiments/configs/<experiment>.py presets."""
  path = os.path.join(os.path.dirname(__file__), f'{experiment}.py')
  try:  # without --config, config_flags applies the overrides here
    return config_flags.DEFINE_config_file(
        'config', f'{path}:{default}',
        f'Preset of experiments/configs/{experiment}.py, e.g. {default} or '
        f'{default},demo; or path[:preset].', lock_config=True)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    message = one_line(str(e), sys.argv)
    print(f'error: {unknown_key(experiment, sys.argv) or message}',
          file=sys.stderr)
    sys.exit(2)


def _experiment_path(experiment: str) -> str:
  return os.path.join(os.path.dirname(__file__), f'{experiment}.py')


def expand_spec(spec: str, experiment: str | None = None) -> str:
  """A --config value -> `<config file>:<preset>` for config_flags.

  `powernorm,demo` names a preset of `experiment`; without an experiment
  the value is `<experiment>:<preset>` (`wmt:powernorm`); a `path.py[:preset]`
  stays as it is.
  """
  if spec.split(':')[0].endswith('.py'):
    return spec
  if experiment is not None:
    return f'{_experiment_path(experiment)}:{spec}'
  name, _, preset = spec.partition(':')
  if name in HELPERS or not os.path.isfile(_experiment_path(name)):
    known = sorted(f[:-3] for f in os.listdir(os.path.dirname(__file__))
                   if f.endswith('.py') and f[:-3] not in HELPERS)
    raise ConfigError(f'--config={spec}: no experiment {name!r}; expected '
                      f'<experiment>:<preset> with an experiment of {known} '
                      '(e.g. wmt:powernorm or lm:ptb_layernorm,small).')
  return f'{_experiment_path(name)}:{preset}' if preset else _experiment_path(
      name)


def from_spec(spec: str) -> ml_collections.ConfigDict:
  """The locked config of `<experiment>:<preset>` or `path.py:<preset>`."""
  path, _, preset = expand_spec(spec).partition(':')
  module_spec = importlib.util.spec_from_file_location('_config_from_spec',
                                                       path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(preset) if preset else module.get_config()
  config.lock()
  return config


def from_args(experiment: str, args: list[str]) -> ml_collections.ConfigDict:
  """The checked config of command-line `args` (`--config=<preset>` and
  dotted overrides), built as `experiment`'s entry point builds it."""
  # validate imports this package (ConfigError), so it comes when used.
  from experiments.configs import validate
  argv = ['from_args', *expand_argv(experiment, args)]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file(
      'config', _experiment_path(experiment), flag_values=flag_values,
      lock_config=True, sys_argv=argv)
  with warnings.catch_warnings():  # config_flags loads with load_module()
    warnings.filterwarnings('ignore', 'the load_module', DeprecationWarning)
    flag_values(argv)
  return validate.checked(flag_values.config)


def expand_argv(experiment: str | None, argv: list[str]) -> list[str]:
  """`--config=<value>` -> `--config=<config file>:<preset>` (`expand_spec`)."""
  return [f'--config={expand_spec(a[len("--config="):], experiment)}'
          if a.startswith('--config=') else a for a in argv]


def parse_flags(experiment: str | None, argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors and --config expanded
  (`expand_argv`: `experiment`'s presets, or `<experiment>:<preset>`).
  `--help` prints the usage, the entry point's flags and the presets and
  modifiers (`describe`), and exits 0."""
  if any(a in ('--help', '-h', '--helpshort') for a in argv[1:]):
    print(usage(experiment, argv[0]))
    sys.exit(0)
  try:
    return flags.FLAGS(expand_argv(experiment, argv))
  except (flags.Error, ConfigError, AttributeError, KeyError, TypeError,
          ValueError) as e:
    message = one_line(str(e), argv)
    if experiment is not None and re.fullmatch(r"'?[\w.]+'?", message):
      message = unknown_key(experiment, argv) or message
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


def usage(experiment: str | None, program: str) -> str:
  """The main module's docstring, its flags (absl's help of the flags the
  entry point defines) and, with an experiment, its presets."""
  main = sys.modules['__main__']
  parts = [(main.__doc__ or '').strip(), '', 'Flags:']
  own = [f for f in flags.FLAGS.get_key_flags_for_module(main)
         if f.name != 'config'] if hasattr(main, '__file__') else []
  module_flags = [f for m, fl in flags.FLAGS.flags_by_module_dict().items()
                  if m.startswith('experiments.') for f in fl]
  seen = set()
  for flag in [*(f for f in own), *module_flags]:
    if flag.name in seen or flag.name == 'config':
      continue
    seen.add(flag.name)
    default = '' if flag.default in (None, '') else f' (default: {flag.default!r})'
    parts.append(f'  --{flag.name}: {flag.help}{default}')
  if experiment is not None:
    parts += ['  --config: a preset, see below', '', describe(experiment)]
  parts += ['', f'absl flags (logging, ...): {os.path.basename(program)} '
            '--helpfull']
  return '\n'.join(parts)


def unknown_key(experiment: str, argv: list[str]) -> str | None:
  """For an override naming no key: the flag, where its path stops, and
  the keys valid there (None if every override's path exists)."""
  spec = next((a[len('--config='):] for a in argv
               if a.startswith('--config=')), None)
  try:
    config = (from_spec(f'{experiment}:{spec}') if spec is not None
              else importlib.import_module(
                  f'experiments.configs.{experiment}').get_config())
  except Exception:  # pylint: disable=broad-except  # reported already
    return None
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    flag = arg.split('=')[0]
    node, where = config, 'config'
    for key in flag[len('--config.'):].split('.'):
      if not isinstance(node, ml_collections.ConfigDict):
        break
      if key not in node:
        return (f'{flag}: no key {key!r} in {where}; the keys there are '
                f'{", ".join(sorted(node.keys()))}.')
      node, where = node[key], f'{where}.{key}'
  return None


def one_line(message: str, argv: list[str]) -> str:
  """A flag-parsing error as one line naming the flag and the fix.

  absl/ml_collections put the reason last, after a traceback of the config
  module; a misspelled key comes as "'key'\nDid you mean ...", quoted."""
  text = message.strip().replace('\\n', '\n')
  lines = [l.strip() for l in text.splitlines() if l.strip()] or [message]
  last = lines[-1]
  if len(last) > 1 and last[0] == last[-1] and last[0] in '\'"':
    last = last[1:-1]
  for prefix in ('experiments.configs.ConfigError: ', 'ConfigError: '):
    if last.startswith(prefix):
      return last[len(prefix):]
  suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  if suggestion:
    right, wrong = suggestion.groups()
    flag = next((a.split('=')[0] for a in argv
                 if a.startswith('--config.') and
                 wrong in a.split('=')[0].split('.')), f'--config...{wrong}')
    return (f'{flag}: no config key {wrong!r}; did you mean {right!r}? '
            '(the keys are in experiments/configs/)')
  unknown = re.search(r"Unknown command line flag '(config\.[^']+)'", text)
  if unknown:
    return (f'--{unknown.group(1)}: no such config key; the keys are in '
            'experiments/configs/ (e.g. --config.train.num_steps=100).')
  if last.startswith('flag --config.'):
    return (f'{last}; give a value of the type the preset has (see '
            'experiments/configs/).')
  return last


def _first_line(fn) -> str:
  doc = (fn.__doc__ or '').strip()
  return ' '.join(doc.split('\n\n')[0].split()) if doc else '(undocumented)'


def presets_and_modifiers(experiment: str) -> tuple[dict[str, str],
                                                     dict[str, str]]:
  """({preset: first paragraph of its doc}, {modifier: ...}) of
  experiments/configs/<experiment>.py."""
  module = importlib.import_module(f'experiments.configs.{experiment}')
  modifiers = getattr(module, 'MODIFIERS', common.MODIFIERS)
  return ({k: _first_line(f) for k, f in module.PRESETS.items()},
          {k: _first_line(f) for k, f in modifiers.items()})


def describe(experiment: str) -> str:
  """The presets and modifiers of `experiment`, one line each: what
  `--help` prints after the flags."""
  presets, modifiers = presets_and_modifiers(experiment)
  lines = [f'--config=PRESET[,MODIFIER...] (experiments/configs/'
           f'{experiment}.py), then --config.KEY=VALUE overrides '
           '(--print_config lists the keys).', '', 'Presets:']
  lines += [f'  {k:<22} {v}' for k, v in presets.items()]
  lines += ['', 'Modifiers:']
  lines += [f'  {k:<22} {v}' for k, v in modifiers.items()]
  return '\n'.join(lines)
