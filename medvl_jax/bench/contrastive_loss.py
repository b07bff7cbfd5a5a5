"""Sharded contrastive losses: ring (chunked, ppermute) vs all-gather, memory and step time.

    python -m medvl_jax.bench.contrastive_loss [--batches 256 1024 4096 8192] [--dim 256]
                                               [--devices 8] [--repeats 3]

Runs on fake CPU devices (``--devices``, set before jax is imported; an XLA_FLAGS device count
already in the environment wins). For each global batch and loss (sigmoid = SigLIP, softmax =
CLIP) it reports the per-device temporary memory of the compiled forward+backward step
(``memory_analysis().temp_size_in_bytes``) and its wall time (median of ``--repeats`` runs
after a warm-up).
"""
from __future__ import annotations

import argparse
import os
import sys


def _set_devices(n: int) -> None:
    if "jax" in sys.modules:
        raise RuntimeError("the device count must be set before jax is imported")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def run(batches=(256, 1024, 4096, 8192), dim: int = 256, repeats: int = 3) -> list:
    """Measures both implementations; returns rows
    ``(loss, batch, impl, temp MiB per device, ms per step)``."""
    import statistics
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    from medvl_jax.parallel.mesh import make_mesh
    from medvl_jax.tasks import contrastive_losses as cl

    mesh = make_mesh({"data": -1})
    rows = []
    for kind, label in (("siglip", "sigmoid"), ("clip", "softmax")):
        for batch in batches:
            rng = np.random.default_rng(0)
            x = rng.normal(size=(2, batch, dim)).astype(np.float32)
            x /= np.linalg.norm(x, axis=-1, keepdims=True)
            sharding = jax.NamedSharding(mesh, jax.P(("data", "fsdp")))
            img, txt = (jax.device_put(a, sharding) for a in x)
            scale, bias = jnp.float32(np.log(10.0)), jnp.float32(-10.0)
            for impl in cl.IMPLS:
                step = jax.jit(jax.value_and_grad(cl.make_sharded_loss(kind, mesh, impl=impl),
                                                  argnums=(0, 1, 2, 3)))
                compiled = step.lower(img, txt, scale, bias).compile()
                temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
                jax.block_until_ready(compiled(img, txt, scale, bias))  # Warm-up.
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    jax.block_until_ready(compiled(img, txt, scale, bias))
                    times.append(time.perf_counter() - t0)
                rows.append((label, batch, impl, temp, 1e3 * statistics.median(times)))
                print(f"{label:8s} B={batch:5d} {impl:10s} temp {temp:9.3f} MiB/device  "
                      f"{rows[-1][-1]:9.1f} ms/step", flush=True)
    return rows


def markdown(rows) -> str:
    """The rows as a markdown table, ring and all-gather side by side."""
    by_key = {(r[0], r[1], r[2]): r for r in rows}
    lines = ["| loss | global batch | ring temp MiB/dev | all-gather temp MiB/dev | "
             "ring ms/step | all-gather ms/step |", "|---|---|---|---|---|---|"]
    for label, batch in dict.fromkeys((r[0], r[1]) for r in rows):
        ring, gather = by_key[(label, batch, "ring")], by_key[(label, batch, "all_gather")]
        lines.append(f"| {label} | {batch} | {ring[3]:.2f} | {gather[3]:.2f} | "
                     f"{ring[4]:.1f} | {gather[4]:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    _set_devices(args.devices)
    for b in args.batches:
        if b % args.devices:
            parser.error(f"--batches: {b} is not divisible by --devices {args.devices}")
    rows = run(args.batches, args.dim, args.repeats)
    print()
    print(markdown(rows))


if __name__ == "__main__":
    main()
