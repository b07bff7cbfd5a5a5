"""A stand-in for the trainer in the launcher tests (no JAX): prints the job environment the
launcher gave this process, then exits or sleeps as told.

    python -m tests.launch.rank_script [--fail_rank R --code C] [--sleep S]

Process R exits with code C at once; every other process prints, sleeps S seconds and exits 0.
"""
import argparse
import os
import sys
import time

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--fail_rank", type=int, default=-1)
    p.add_argument("--code", type=int, default=1)
    p.add_argument("--sleep", type=float, default=0.0)
    args = p.parse_args()
    rank = int(os.environ["JAX_PROCESS_ID"])
    keys = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_PLATFORMS",
            "XLA_FLAGS", "JAX_CPU_COLLECTIVES_IMPLEMENTATION")
    print(" ".join(f"{k}={os.environ.get(k, '')}" for k in keys), flush=True)
    if rank == args.fail_rank:
        print("failing", flush=True)
        sys.exit(args.code)
    time.sleep(args.sleep)
    print("done", flush=True)
