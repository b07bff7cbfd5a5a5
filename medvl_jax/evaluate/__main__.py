"""``python -m medvl_jax.evaluate --config configs/X.py[:arg] --checkpoint DIR [--split test]``."""
import sys

from medvl_jax.evaluate.cli import main

if __name__ == "__main__":
    sys.exit(main())
