"""The shared training loop (``python -m medvl_jax.train``); see loop.py."""
