"""Fixtures shared by the end-to-end experiment tests."""

import jax
import pytest


@pytest.fixture(scope='module')
def compilation_cache(tmp_path_factory):
  """Runs of a module compile the same programs: reuse them across runs."""
  old = (jax.config.jax_compilation_cache_dir,
         jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update('jax_compilation_cache_dir',
                    str(tmp_path_factory.mktemp('xla_cache')))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  yield
  jax.config.update('jax_compilation_cache_dir', old[0])
  jax.config.update('jax_persistent_cache_min_compile_time_secs', old[1])
