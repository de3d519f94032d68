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
  assert len(norms.ratios(results)) == 3
  assert norms.markdown(results).startswith('| norm |')
