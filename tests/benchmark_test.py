"""The benchmark's quick mode runs, so the benchmark cannot rot."""

import math

from benchmarks import norms


def test_quick_benchmark_reports_every_norm():
  results = norms.run(quick=True)
  names = {r['norm'] for r in results}
  for needed in ('copy (bound)', 'flax LayerNorm', 'normjax LayerNorm',
                 'normjax PowerNorm train (mask)',
                 'normjax UnifiedNorm train (mask)'):
    assert needed in names
  for r in results:
    assert r['fwd_ms'] > 0 and math.isfinite(r['fwd_ms'])
  lines = norms.ratios(results)
  assert len(lines) == (len(norms.TARGETS) + len(norms.BEFORE_AFTER)
                        + len(norms.BOUND_TARGETS)
                        + len(norms.ALGORITHM_TRAFFIC))
  assert all(('ok' in l or 'MISSED' in l or 'not measured' in l
              or 'faster' in l or 'of the copy bound' in l) for l in lines)
  assert norms.markdown(results).startswith('| norm |')


def test_report_goes_between_the_readme_markers(tmp_path):
  from benchmarks import __main__ as suite  # pylint: disable=g-import-not-at-top
  with open(suite.README) as fh:
    readme = fh.read()
  assert readme.count(suite.BEGIN) == 1 and readme.count(suite.END) == 1
  path = tmp_path / 'README.md'
  path.write_text(f'intro\n{suite.BEGIN}\nold\n{suite.END}\nrest\n')
  suite.write_readme('new table', str(path))
  suite.write_readme('newer table', str(path))  # idempotent
  assert path.read_text() == (f'intro\n{suite.BEGIN}\nnewer table\n'
                              f'{suite.END}\nrest\n')
