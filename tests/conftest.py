"""Test setup: every test runs on 8 virtual CPU devices so sharding is exercised."""

import os

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The local GCS server fixtures (gcs_server, gcs_bucket) for any test that asks for them.
pytest_plugins = ["_gcs"]
