"""Test-wide setup.

Eight fake CPU devices are requested before jax is imported anywhere, so sharding tests can
build real meshes on one machine. Everything else sees an ordinary CPU backend.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

# Tokenizers trained on first use are cached here, not in the user's home directory.
if "MEDVL_JAX_CACHE" not in os.environ:
    import tempfile

    os.environ["MEDVL_JAX_CACHE"] = tempfile.mkdtemp(prefix="medvl_jax_cache_")
