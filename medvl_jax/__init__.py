"""medvl_jax: medical vision-language models in JAX/Flax."""
import glob as _glob
import importlib.util as _importlib_util
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _skip_absent_tpu() -> None:
    """With libtpu installed (the ``tpu`` extra, for planning) JAX would try, and noisily
    fail, to start a TPU backend on a machine without TPUs. Where no TPU or NVIDIA GPU is
    attached and JAX_PLATFORMS is unset, use the CPU backend directly (TPU programs still
    compile for abstract topologies: medvl_jax.plan)."""
    if _os.environ.get("JAX_PLATFORMS") or _importlib_util.find_spec("libtpu") is None:
        return
    google_pci = any(_read(p) == "0x1ae0" for p in _glob.glob("/sys/bus/pci/devices/*/vendor"))
    nvidia = any(_os.path.exists(p) for p in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg"))
    if google_pci or nvidia:
        return
    if "jax" in _sys.modules:
        _sys.modules["jax"].config.update("jax_platforms", "cpu")
    else:
        _os.environ["JAX_PLATFORMS"] = "cpu"


_skip_absent_tpu()
