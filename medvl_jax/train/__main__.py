"""``python -m medvl_jax.train --config configs/X.py[:arg] --workdir DIR [--config.k=v ...]``."""
import sys

from medvl_jax.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
