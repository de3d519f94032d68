"""The inference benchmark's quick mode runs, so the benchmark cannot rot."""

import math

from benchmarks import inference


def test_quick_inference_benchmark():
  result = inference.run(quick=True)
  rows = {r['model']: r for r in result['rows']}
  assert set(rows) == {'layernorm', 'layernorm -> rmsnorm', 'unified (eval)',
                       'unified -> folded', 'powernorm -> folded'}
  assert rows['unified -> folded']['kind'] == 'none'
  assert rows['powernorm -> folded']['kind'] == 'group_scaling'
  assert rows['layernorm -> rmsnorm']['kind'] == 'rmsnorm'
  for r in rows.values():
    assert r['tokens_per_s'] > 0 and math.isfinite(r['tokens_per_s'])
  assert math.isfinite(result['headline'])
  text = inference.report(result)
  assert "folded UN ('none') vs LayerNorm" in text and 'cpu:' in text
