"""Test setup: 8 simulated CPU devices (before JAX initialises), strict ranks."""

import json
import os

os.environ.setdefault('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=8'

import jax  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

import norm_cases  # pylint: disable=g-import-not-at-top
from normjax._src import definition as nd  # pylint: disable=g-import-not-at-top

jax.config.update('jax_numpy_rank_promotion', 'raise')


def pytest_configure(config):
  """Builds the fused CPU kernel once, before pytest-xdist starts its
  workers: each would otherwise compile it at the same time (15-25 s)."""
  if not hasattr(config, 'workerinput'):
    from normjax._src import cpu_kernel  # pylint: disable=g-import-not-at-top
    cpu_kernel.available()


@pytest.fixture(params=['float32', 'float64'])
def float_dtype(request):
  """Runs a test in float32 and in float64 (with x64 enabled for it)."""
  if request.param == 'float64':
    with jax.enable_x64(True):
      yield request.param
  else:
    yield request.param


# Largest deviations from the NumPy references, printed after the test run.
DEVIATIONS: dict[str, float] = {}


def record_deviation(name: str, value: float) -> None:
  DEVIATIONS[name] = max(float(value), DEVIATIONS.get(name, 0.0))


def pytest_terminal_summary(terminalreporter):
  if not DEVIATIONS:
    return
  terminalreporter.write_sep('-', 'largest deviations from the references')
  for name in sorted(DEVIATIONS):
    terminalreporter.write_line(f'{name:60s} {DEVIATIONS[name]:.2e}')


def pytest_sessionfinish(session):
  """An xdist worker hands its deviations to the controller."""
  if hasattr(session.config, 'workeroutput'):
    session.config.workeroutput['deviations'] = json.dumps(DEVIATIONS)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
  del error
  for name, value in json.loads(
      getattr(node, 'workeroutput', {}).get('deviations', '{}')).items():
    record_deviation(name, value)


@pytest.fixture(scope='module')
def compilation_cache(tmp_path_factory):
  """Runs of a module compile the same programs: reuse them across runs.

  Opt in with `pytestmark = pytest.mark.usefixtures('compilation_cache')`.
  A sharded program with a fused kernel holds the address of the kernel's
  custom_partitioning callback, which JAX leaves in the cache key unless
  `jax_remove_custom_partitioning_ptr_from_cache_key` is set (on 8 devices
  the train-smoke runs then missed the cache: 63 s for three runs, 38 s
  with the flag). With the flag, two programs that differ only in a
  kernel's static options (a norm's eps, its groups) would share one entry,
  so only modules whose runs keep those fixed may opt in.
  """
  flags = ('jax_compilation_cache_dir',
           'jax_persistent_cache_min_compile_time_secs',
           'jax_remove_custom_partitioning_ptr_from_cache_key')
  old = {f: getattr(jax.config, f) for f in flags}
  new = (str(tmp_path_factory.mktemp('xla_cache')), 0, True)
  for flag, value in zip(flags, new):
    jax.config.update(flag, value)
  yield
  for flag, value in old.items():
    jax.config.update(flag, value)


@pytest.fixture
def toy_norms():
  """Registers the toy norms (`norm_cases.TOYS`) for one test, then removes
  them, so that no other test sees them in the registry."""
  for definition in norm_cases.TOYS.values():
    nd.register(definition)
  yield norm_cases.TOYS
  for toy in norm_cases.TOYS:
    nd.unregister(toy)


def _kinds_fixture(stateful=None):
  """A fixture over the registered kinds and the toys (registered for the
  test): every kind, or only the stateful/stateless ones."""
  every = {**{k: norm_cases.definition(k) for k in norm_cases.KINDS},
           **norm_cases.TOYS}
  kinds = sorted(k for k, d in every.items()
                 if stateful is None or d.stateful == stateful)

  @pytest.fixture(params=kinds)
  def fixture(request):
    if request.param in norm_cases.TOYS:
      request.getfixturevalue('toy_norms')
    return request.param
  return fixture


kind = _kinds_fixture()
stateful_kind = _kinds_fixture(stateful=True)
stateless_kind = _kinds_fixture(stateful=False)
