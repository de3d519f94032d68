"""The inference and probe benchmarks' quick modes run, so they cannot rot."""

import math

import pytest

from benchmarks import inference


@pytest.mark.slow  # CI also runs `python -m benchmarks --quick`
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


@pytest.mark.slow  # over the default suite's budget
def test_quick_probe_overhead_benchmark():
  from benchmarks import probes  # pylint: disable=g-import-not-at-top
  result = probes.run('ptb_powernorm,smoke', every=10, rounds=2, overrides={})
  assert result['plain_ms'] > 0 and result['probed_ms'] > 0
  assert math.isclose(result['overhead'], (9 + result['ratio']) / 10 - 1)
  assert 'probing every 10 steps costs' in probes.report(result)
