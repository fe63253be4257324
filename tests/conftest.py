"""Test setup: every test runs on 8 virtual CPU devices so sharding is exercised; one
JAX compilation cache serves the whole test session."""

import os
import shutil
import tempfile

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# One persistent compilation cache per test session (pytest-xdist workers share it through
# their run id), inherited by the experiment and worker subprocesses the tests start: they
# compile the same tiny programs again and again. A fresh directory each session, removed
# at its end, so nothing compiled by an earlier checkout is ever reused. A test that sets
# its own cache directory (the kill / resume tests) keeps it.
_SESSION = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
_CACHE = os.path.join(tempfile.gettempdir(), f"thack_jax_test_cache_{_SESSION}")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The local GCS server fixtures (gcs_server, gcs_bucket) for any test that asks for them.
pytest_plugins = ["_gcs"]


def pytest_sessionfinish(session):
    """The session's compilation cache goes with it (the controller removes it, after the
    xdist workers have finished)."""
    if not hasattr(session.config, "workerinput"):
        shutil.rmtree(_CACHE, ignore_errors=True)
