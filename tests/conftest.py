"""Test-wide setup.

Eight fake CPU devices are requested before jax is imported anywhere, so sharding tests can
build real meshes on one machine. Everything else sees an ordinary CPU backend.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
