"""MedSynth generation speed: studies per second per kind on one core.

    python -m medvl_jax.bench.medsynth [--num_studies 2000] [--image_size 128] [--kinds cxr ct]

Prints one line per kind (rendered with report and QA, and text only) and the machine.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

from medvl_jax.data.medsynth import MedSynthConfig, MedSynthSource


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or the platform's processor string)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def time_source(src: MedSynthSource, n: int) -> float:
    """Studies per second generating records 0..n-1 of ``src`` (after one warm-up record)."""
    src[0]
    t0 = time.perf_counter()
    for i in range(n):
        src[i]
    return n / (time.perf_counter() - t0)


def main(argv=None) -> list[dict]:
    """Runs the benchmark and prints a table; returns its rows."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num_studies", type=int, default=2000)
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--volume_shape", type=int, nargs=3, default=(32, 64, 64))
    p.add_argument("--kinds", nargs="+", default=["cxr", "longitudinal", "ct"],
                   choices=["cxr", "longitudinal", "ct"])
    p.add_argument("--text_only", action=argparse.BooleanOptionalAction, default=True,
                   help="also time render=False")
    args = p.parse_args(argv)
    rows = []
    print(f"# {datetime.date.today()}  nproc={os.cpu_count()}  cpu={cpu_model()}")
    print(f"{'kind':<14}{'render':>8}{'studies/s':>12}{'ms/study':>10}")
    for kind in args.kinds:
        n = args.num_studies
        for render in (True, False) if args.text_only else (True,):
            cfg = MedSynthConfig(kind=kind, num_studies=n, image_size=args.image_size,
                                 volume_shape=tuple(args.volume_shape))
            rate = time_source(MedSynthSource(cfg, render=render), n)
            rows.append({"kind": kind, "render": render, "studies_per_s": rate})
            print(f"{kind:<14}{str(render):>8}{rate:>12.0f}{1e3 / rate:>10.2f}")
    return rows


if __name__ == "__main__":
    main()
