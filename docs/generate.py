"""Pages generated at build time: one section per registered norm (its
formula and paper, from the function's docstring) and the experiments'
presets and modifiers with the resolved default config of each task."""

import os

from experiments import configs
from normjax._src import definition
from normjax._src import registry  # noqa: F401  (registers the norms)

TASKS = {'iwslt': 'IWSLT14 De-En', 'wmt': 'WMT14 En-De',
         'lm': 'PTB and WikiText-103 language models'}


def _title(text: str, mark: str) -> list[str]:
  return [text, mark * len(text), '']


def norms_page() -> str:
  lines = _title('The norms', '=') + [
      'Every norm registered in ``normjax`` (``normjax.registry``), with the '
      'formula and the paper from its docstring. The function is in '
      '``normjax.functional``, the module in ``normjax.linen`` and '
      '``normjax.nnx``.', '']
  for kind, d in definition.REGISTRY.items():
    lines += _title(f'{kind}: ``{d.name}`` / ``{d.module}``', '-')
    lines += [f'.. autofunction:: normjax.functional.{d.name}',
              '   :no-index:', '']
  return '\n'.join(lines) + '\n'


def configs_page() -> str:
  lines = _title("The experiments' configs", '=') + [
      'Presets and modifiers of ``python -m experiments.<task> '
      '--config=PRESET[,MODIFIER...]``, from ``experiments/configs``; '
      'every key can be overridden with ``--config.KEY=VALUE``.', '']
  for task, title in TASKS.items():
    presets, modifiers = configs.presets_and_modifiers(task)
    lines += _title(f'{task}: {title}', '-')
    for heading, entries in (('Presets', presets), ('Modifiers', modifiers)):
      lines += [f'**{heading}**', '']
      for name, doc in entries.items():
        lines += [f'``{name}``', f'   {_escape(doc)}', '']
    default = configs.from_spec(f'{task}:{next(iter(presets))}')
    lines += [f'The resolved config of ``{next(iter(presets))}``::', '']
    lines += ['   ' + line for line in str(default).splitlines()] + ['']
  return '\n'.join(lines) + '\n'


def _escape(text: str) -> str:
  for ch in '\\*`|_':
    text = text.replace(ch, '\\' + ch)
  return text


def write_all(directory: str) -> None:
  os.makedirs(directory, exist_ok=True)
  for name, text in (('norms.rst', norms_page()),
                     ('configs.rst', configs_page())):
    with open(os.path.join(directory, name), 'w') as f:
      f.write(text)
