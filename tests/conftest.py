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

# Many tests compile the same small programs (the smoke configs' train and eval steps): a
# compilation cache shared by the test processes compiles each of them once per session.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="medvl_jax_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
