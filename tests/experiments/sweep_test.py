"""experiments.sweep: the grid, the intervals (known values and coverage),
the report on synthetic runs, the runner's skip/resume/stop on a fake
command, and a real smoke grid end to end."""

import csv
import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from experiments import curves
from experiments.sweeps import grid
from experiments.sweeps import report
from experiments.sweeps import runner
from experiments.sweeps import stats

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

# ------------------------------------------------------------------ grid --


@pytest.mark.parametrize('pattern, expected', [
    ('a', ['a']),
    ('ptb_{layernorm,powernorm},small',
     ['ptb_layernorm,small', 'ptb_powernorm,small']),
    ('{a,b}{1,2}', ['a1', 'a2', 'b1', 'b2']),
    ('x{a,b{c,d}}y', ['xay', 'xbcy', 'xbdy']),
    ('p,{pre,post}', ['p,pre', 'p,post']),
])
def test_brace_expansion(pattern, expected):
  assert grid.expand(pattern) == expected


def test_unbalanced_brace_names_the_pattern():
  with pytest.raises(ValueError, match="'a{b'"):
    grid.expand('a{b')


def test_cells_name_presets_and_varying_overrides_only():
  cells = grid.cells(['lm:ptb_{layernorm,powernorm},short'],
                     ['data.path=../d/ptb', 'optim.peak_lr={1e-3,2e-3}'])
  assert [c.name for c in cells] == [
      'ptb_layernorm_short__optim.peak_lr=1e-3',
      'ptb_layernorm_short__optim.peak_lr=2e-3',
      'ptb_powernorm_short__optim.peak_lr=1e-3',
      'ptb_powernorm_short__optim.peak_lr=2e-3']
  run = grid.runs(cells[:1], [7], '/r')[0]
  assert run.workdir == '/r/ptb_layernorm_short__optim.peak_lr=1e-3/seed7'
  assert run.shell() == (
      'python -m experiments.lm --config=ptb_layernorm,short '
      '--config.seed=7 --config.data.path=../d/ptb '
      '--config.optim.peak_lr=1e-3 --workdir=/r/ptb_layernorm_short__'
      'optim.peak_lr=1e-3/seed7')


def test_runs_put_seeds_outermost_and_two_tasks_prefix_names():
  cells = grid.cells(['lm:ptb_layernorm,smoke', 'wmt:powernorm,smoke'], [])
  assert [c.name for c in cells] == ['lm_ptb_layernorm_smoke',
                                     'wmt_powernorm_smoke']
  runs = grid.runs(cells, [1, 2], 'r')
  assert [(r.cell.name[:3], r.seed) for r in runs] == [
      ('lm_', 1), ('wmt', 1), ('lm_', 2), ('wmt', 2)]


@pytest.mark.parametrize('bad, match', [
    (dict(grid=['ptb_layernorm']), 'TASK:PRESETS'),
    (dict(grid=['mt:powernorm']), 'TASK:PRESETS'),
    (dict(grid=[]), 'at least one'),
    (dict(grid=['lm:a'], overrides=['lr']), 'KEY=VALUE'),
    (dict(grid=['lm:a'], overrides=['seed=3']), 'seeds come from --seeds'),
])
def test_bad_grid_specs_name_the_flag(bad, match):
  with pytest.raises(ValueError, match=match):
    grid.cells(bad['grid'], bad.get('overrides', []))


def test_seeds():
  assert grid.parse_seeds('3,1-2,7') == [1, 2, 3, 7]
  with pytest.raises(ValueError, match='--seeds'):
    grid.parse_seeds('1,x')


# ----------------------------------------------------------------- stats --


def test_t_interval_known_values():
  # mean 2, s 1, t(0.975, 2) = 4.302653: half = 4.302653 / sqrt(3).
  i = stats.t_interval([1.0, 2.0, 3.0])
  assert (i.mean, i.n) == (2.0, 3)
  assert i.half == pytest.approx(4.302652729749464 / math.sqrt(3), rel=1e-12)
  # 90%: t(0.95, 4) = 2.131847; values with s = sqrt(2.5).
  i = stats.t_interval([1.0, 2.0, 3.0, 4.0, 5.0], confidence=0.9)
  assert i.half == pytest.approx(2.13184678 * math.sqrt(2.5) / math.sqrt(5),
                                 rel=1e-7)
  one = stats.t_interval([4.0])
  assert one.n == 1 and math.isnan(one.half) and not one.resolved
  assert one.format() == '4.0 (n=1)'
  assert stats.t_interval([]).format() == '-'


def test_paired_difference_uses_common_seeds_only():
  cell = {1: 10.0, 2: 12.0, 3: 14.0, 4: 99.0}
  base = {1: 8.0, 2: 10.0, 3: 11.0, 5: -5.0}
  d = stats.paired(cell, base)  # differences 2, 2, 3
  assert (d.n, d.mean) == (3, pytest.approx(7 / 3))
  assert d.half == pytest.approx(
      4.302652729749464 * math.sqrt(1 / 3) / math.sqrt(3))
  assert d.resolved and d.low > 0
  assert not stats.paired({1: 1.0, 2: 3.0}, {1: 2.0, 2: 2.0}).resolved


def test_t_interval_covers_the_mean_95_percent_of_the_time():
  rng = np.random.default_rng(0)
  samples = rng.normal(5.0, 2.0, size=(4000, 3))
  covered = [stats.t_interval(list(s)).low <= 5.0 <= stats.t_interval(
      list(s)).high for s in samples]
  # Binomial(4000, 0.95) has sd 0.0034: 4 sd either side.
  assert abs(np.mean(covered) - 0.95) < 0.014


# ---------------------------------------------------------------- report --


def _fake_run(run, ppl, valid_curve, wall=60.0, tokens_per_step=100,
              steps=10, status='done'):
  os.makedirs(run.workdir, exist_ok=True)
  with open(os.path.join(run.workdir, 'sweep.json'), 'w') as f:
    json.dump({'command': run.shell(), 'attempts': [
        {'started': '', 'wall_s': wall / 2, 'exit_code': 143},
        {'started': '', 'wall_s': wall / 2,
         'exit_code': {'done': 0, 'diverged': 3}[status]}]}, f)
  with open(os.path.join(run.workdir, 'losses.csv'), 'w') as f:
    f.write('step,loss,nll,ntokens,grad_norm,batch_crc\n')
    for s in range(1, steps + 1):
      f.write(f'{s},1.0,1.0,{tokens_per_step},1.0,0\n')
  log = curves.ValidLog(run.workdir)
  for step, value in valid_curve:
    log.write(step, {'loss': math.log(value), 'ppl': value})
  if status == 'done':
    with open(os.path.join(run.workdir, 'results.json'), 'w') as f:
      json.dump({'valid': {'ppl': ppl + 1}, 'test': {'ppl': ppl},
                 'step': steps}, f)


@pytest.fixture(name='synthetic')
def fixture_synthetic(tmp_path):
  """Cells base and pn, seeds 1-3 (pn seed 3 diverged), known values."""
  cells = grid.cells(['lm:ptb_{layernorm,powernorm},short'], [])
  runs = grid.runs(cells, [1, 2, 3], str(tmp_path))
  values = {('ptb_layernorm_short', 1): 100.0,
            ('ptb_layernorm_short', 2): 102.0,
            ('ptb_layernorm_short', 3): 104.0,
            ('ptb_powernorm_short', 1): 98.0,
            ('ptb_powernorm_short', 2): 99.0,
            ('ptb_powernorm_short', 3): 0.0}
  for run in runs:
    ppl = values[run.cell.name, run.seed]
    diverged = run.cell.name == 'ptb_powernorm_short' and run.seed == 3
    _fake_run(run, ppl, [(5, ppl + 20), (10, ppl + 1)],
              wall=60.0 * run.seed, status='diverged' if diverged else 'done')
  return tmp_path, runs


def test_report_of_synthetic_runs(synthetic):
  root, runs = synthetic
  results = report.collect(runs)
  assert [r.status for r in results].count('diverged') == 1
  rows = report.summarize(results, 'test.ppl', also=('valid.ppl',))
  base, pn = rows
  assert base['metric'].mean == 102.0 and base['metric'].n == 3
  assert base['metric'].half == pytest.approx(4.302652729749464 * 2
                                              / math.sqrt(3))
  assert base['also']['valid.ppl'].mean == 103.0
  assert pn['seeds'] == [1, 2] and pn['missing'] == {3: 'diverged'}
  # Paired over seeds 1, 2: differences -2, -3.
  assert (pn['diff'].n, pn['diff'].mean) == (2, -2.5)
  assert pn['diff'].half == pytest.approx(12.706204736 * math.sqrt(0.5)
                                          / math.sqrt(2))
  assert base['wall_s'] == 120.0  # mean of 60, 120, 180 s
  assert pn['wall_s'] == 90.0
  # 1000 tokens over 60 s and over 120 s.
  assert pn['tokens_per_s'] == pytest.approx((1000 / 60 + 1000 / 120) / 2)
  text = report.markdown(rows, 'test.ppl')
  assert '| ptb_layernorm_short | 3/3 | **102.0 ± 5.0** | 103.0 ± 5.0 | — |' \
      ' baseline | 2.0 min | 10 |' in text
  assert '-2.5 ± 6.4 | not resolved |' in text
  assert 'ptb_powernorm_short seed 3: diverged' in text
  paths = report.write(str(root), rows, results, 'test.ppl', 'ppl')
  assert [os.path.basename(p) for p in paths] == ['report.md', 'report.csv',
                                                  'report.png']
  with open(paths[1]) as f:
    lines = list(csv.DictReader(f))
  assert lines[1]['cell'] == 'ptb_powernorm_short'
  assert float(lines[1]['diff_mean']) == -2.5 and lines[1]['n'] == '2'
  bands = report.curve_bands(results, 'ppl')
  steps, means, _ = bands['ptb_layernorm_short']
  assert steps == [5, 10] and means == [122.0, 103.0]


def test_report_verdicts_and_errors(synthetic):
  _, runs = synthetic
  results = report.collect(runs)
  rows = report.summarize(results, 'test.ppl',
                          baseline='ptb_powernorm_short')
  assert rows[0]['diff'].mean == 2.5  # layernorm - powernorm
  # Three seeds 10 apart, resolved: the better side follows the metric.
  row = dict(diff=stats.Interval(-5.0, 1.0, 3))
  assert report._verdict(row, 'test.ppl') == 'better'
  assert report._verdict(row, 'bleu') == 'worse'
  with pytest.raises(ValueError, match='--baseline'):
    report.summarize(results, 'test.ppl', baseline='nope')
  with pytest.raises(ValueError, match="--metric='test.bleu'"):
    report.summarize(results, 'test.bleu')


# ---------------------------------------------------------------- runner --

# A fake run: counts to 4 steps, 0.1 s each, saving its position ("the
# checkpoint") every step; SIGTERM saves and exits 143; at 4 writes
# results.json. Its workdir comes last on the command line.
FAKE = textwrap.dedent('''
    import json, os, signal, sys, time
    workdir = sys.argv[-1].split('=', 1)[1]
    pos_file = os.path.join(workdir, 'position')
    step = int(open(pos_file).read()) if os.path.exists(pos_file) else 0
    print('resumed from', step, flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    while step < 4:
      time.sleep(0.1)
      step += 1
      open(pos_file, 'w').write(str(step))
      if stop:
        sys.exit(143)
    json.dump({'test': {'ppl': 1.0}}, open(os.path.join(workdir,
                                                        'results.json'), 'w'))
''')


class _FakeRun(grid.Run):

  def command(self, python='python'):
    return [python, '-c', FAKE] + super().command(python)[3:]


def _fake_runs(root, seeds=(1, 2, 3)):
  cells = grid.cells(['lm:fake'], [])
  return [_FakeRun(r.cell, r.seed, r.workdir)
          for r in grid.runs(cells, list(seeds), str(root))]


def _attempts(run):
  return [a['exit_code'] for a in runner.record(run)['attempts']]


def test_runner_stop_then_rerun_skips_finished_and_resumes(tmp_path):
  runs = _fake_runs(tmp_path)

  def stop_during_second_run():
    while not os.path.exists(os.path.join(runs[1].workdir, 'position')):
      time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=stop_during_second_run, daemon=True).start()
  assert runner.Runner(runs).run() == 143
  assert [runner.status(r) for r in runs] == ['done', 'stopped', 'pending']
  assert _attempts(runs[1]) == [143]
  rerun = runner.Runner(runs)
  assert rerun.todo() == runs[1:]
  assert rerun.run() == 0
  assert [runner.status(r) for r in runs] == ['done'] * 3
  assert _attempts(runs[0]) == [0]  # not run again
  assert _attempts(runs[1]) == [143, 0]
  with open(os.path.join(runs[1].workdir, 'log.txt')) as f:
    log = f.read()
  assert 'resumed from 0' in log and 'resumed from' in log.split('===')[2]
  assert 'resumed from 0' not in log.split('===')[2]  # the second attempt


def test_runner_parallel_and_diverged_not_retried(tmp_path):
  runs = _fake_runs(tmp_path, seeds=(1, 2, 3, 4))
  os.makedirs(runs[3].workdir)
  with open(os.path.join(runs[3].workdir, 'sweep.json'), 'w') as f:
    json.dump({'command': runs[3].shell(),
               'attempts': [{'started': '', 'wall_s': 1, 'exit_code': 3}]}, f)
  start = time.time()
  assert runner.Runner(runs, parallel=3).run() == 0
  assert time.time() - start < 3.0  # three 0.4 s runs side by side
  assert [runner.status(r) for r in runs] == ['done'] * 3 + ['diverged']
  assert runner.Runner(runs, retry_diverged=True).todo() == runs[3:]


def test_runner_refuses_a_workdir_of_another_command(tmp_path):
  runs = _fake_runs(tmp_path, seeds=(1,))
  os.makedirs(runs[0].workdir)
  with open(os.path.join(runs[0].workdir, 'sweep.json'), 'w') as f:
    json.dump({'command': 'python -m experiments.lm --config=other',
               'attempts': []}, f)
  with pytest.raises(ValueError, match='another command'):
    runner.check_commands(runs)


# ------------------------------------------------------------------ cost --


def test_cost_counts_the_weights_a_token_passes_through():
  from experiments.configs import lm  # pylint: disable=g-import-not-at-top
  from experiments.sweeps import cost  # pylint: disable=g-import-not-at-top
  config = lm.get_config('ptb_layernorm')  # 3 layers, d 256, FFN 2100
  flops, tokens = cost.flops_per_step('lm', 'ptb_layernorm', config)
  assert tokens == 120 * 32
  weights = 3 * (4 * 256 * 40 + 2 * 256 * 2100) + 256 * 10_000
  assert flops == tokens * (6 * weights + 12 * 3 * 32 * 40)
  run = cost.estimate('lm', 'ptb_layernorm', config, 100.0, 0.5)
  assert run['hours'] == pytest.approx(flops * 20000 / 50e12 / 3600)
  measured = cost.estimate('lm', 'ptb_layernorm', config, 100.0, 0.5,
                           step_seconds=3.6)
  assert measured['hours'] == pytest.approx(20.0)
  text = cost.markdown([dict(cell='c', **measured)], 3, 100.0, 0.5, 3.6)
  assert '| c | 20,000 |' in text and '60.0 device-hours' in text


# ------------------------------------------------------------ end to end --


def _sweep(*args, **kwargs):
  return subprocess.run(
      [sys.executable, '-m', 'experiments.sweep', *args], cwd=ROOT,
      capture_output=True, text=True, timeout=300, check=False, **kwargs)


@pytest.mark.slow  # ~35 s of real runs in subprocesses (CI's slow step)
def test_smoke_grid_end_to_end(tmp_path):
  """Two seeds of the smoke LM, two at a time (grids of several cells: the
  runner and report tests above, on a fake command); the re-run finishes
  nothing again; --print-commands prints the runs' commands."""
  args = ['--grid=lm:ptb_layernorm,smoke', '--seeds=1,2',
          '--set=train.num_steps=3', f'--workdir={tmp_path}']
  first = _sweep(*args, '--parallel=2')
  assert first.returncode == 0, first.stderr[-2000:]
  assert 'ptb_layernorm_smoke | 2/2 |' in first.stdout
  for name in ('report.md', 'report.csv', 'report.png', 'grid.json'):
    assert os.path.exists(tmp_path / name)
  again = _sweep(*args)
  assert again.returncode == 0, again.stderr[-2000:]
  assert '2 already finished, 0 to run' in again.stdout
  printed = _sweep(*args, '--print-commands').stdout.splitlines()
  assert len(printed) == 2
  with open(tmp_path / 'ptb_layernorm_smoke' / 'seed2' / 'sweep.json') as f:
    rec = json.load(f)
  assert rec['command'] in printed and len(rec['attempts']) == 1
  run = tmp_path / 'ptb_layernorm_smoke' / 'seed2'
  assert curves.read(str(run))['step'] == [3]
  # What every run records and prints (experiments.main_lib, train_lib).
  log = (run / 'log.txt').read_text()
  assert re.search(f'ptb_layernorm,smoke: workdir {run}; \\d+ cpu '
                   r'device\(s\) on 1 process\(es\), mesh \(data ', log), log
  assert 'parameters; from scratch to step 3' in log
  assert 'step 1: compiled and ran in' in log
  with open(run / 'config.json') as f:
    config = json.load(f)
  assert config['seed'] == 2 and config['train']['num_steps'] == 3
  events, = glob.glob(str(run / 'tensorboard' / 'events.out.*'))
  with open(events, 'rb') as f:
    raw = f.read()
  assert b'hparams' in raw and b'train.num_steps' in raw
  assert b'config/text_summary' in raw


def test_a_typo_in_the_grid_fails_before_anything_runs(tmp_path):
  result = _sweep('--grid=lm:ptb_layernorm,smoke', '--set=train.num_stepz=3',
                  f'--workdir={tmp_path}')
  assert result.returncode == 2
  assert 'cell ptb_layernorm_smoke' in result.stderr
  assert 'num_stepz' in result.stderr
  assert not os.path.exists(tmp_path / 'ptb_layernorm_smoke')


def _wait_for(condition, timeout=240.0):
  deadline = time.time() + timeout
  while not condition():
    assert time.time() < deadline, 'timed out'
    time.sleep(0.1)


def _lock_free(workdir):
  import fcntl  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, '.lock')
  if not os.path.exists(path):
    return True
  with open(path) as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      return False
    return True


@pytest.mark.slow
def test_killed_sweep_reruns_to_the_end_without_redoing_runs(tmp_path):
  """SIGTERM to the sweep during seed 2, re-run; SIGKILL during seed 3
  (its run gets SIGTERM from the dying sweep), re-run: every run finishes,
  seed 1 ran once, seeds 2 and 3 resumed from their checkpoints."""
  args = [sys.executable, '-m', 'experiments.sweep',
          '--grid=lm:ptb_layernorm,smoke', '--seeds=1-3',
          '--set=train.num_steps=40', '--set=train.checkpoint_every=2',
          f'--workdir={tmp_path}']
  runs = grid.runs(grid.cells(['lm:ptb_layernorm,smoke'],
                              ['train.num_steps=40',
                               'train.checkpoint_every=2']), [1, 2, 3],
                   str(tmp_path))

  def started(run):
    return lambda: os.path.exists(os.path.join(run.workdir, 'checkpoints',
                                               '4'))

  for run, sig in ((runs[1], signal.SIGTERM), (runs[2], signal.SIGKILL)):
    sweep = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    _wait_for(started(run))
    sweep.send_signal(sig)
    out = sweep.communicate(timeout=120)[0]
    assert sweep.returncode == -signal.SIGKILL if sig == signal.SIGKILL \
        else sweep.returncode == 143, out
    _wait_for(lambda run=run: _lock_free(run.workdir), timeout=60)
    assert runner.status(run) == 'stopped'
  final = subprocess.run(args, cwd=ROOT, capture_output=True, text=True,
                         timeout=300, check=False)
  assert final.returncode == 0, final.stderr[-2000:]
  assert '2 already finished, 1 to run' in final.stdout
  assert [runner.status(r) for r in runs] == ['done'] * 3
  assert _attempts(runs[0]) == [0]
  assert _attempts(runs[1]) == [143, 0]
  assert _attempts(runs[2]) == [None, 0]  # the SIGKILLed sweep's is open
  for run in runs[1:]:
    with open(os.path.join(run.workdir, 'log.txt')) as f:
      assert 'resumed from step' in f.read().split('===')[-1]
