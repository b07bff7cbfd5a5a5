"""Decode throughput: medvl_jax's KV-cache sampler vs transformers' ``generate`` on CPU.

    python -m medvl_jax.bench.generate [--batches 1 8] [--prompt_len 32] [--new_tokens 64]

Both run the same randomly initialised Llama-style model (about 40M parameters, float32,
greedy, no early stop) on the same prompts. Throughput is generated tokens per second over
the whole call (prefill included), median of ``--repeats`` runs after one warm-up (which
includes our compile).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

MODEL = dict(vocab_size=16000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or the platform string)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(batches=(1, 8), prompt_len: int = 32, new_tokens: int = 64, repeats: int = 3) -> list:
    """Measures both implementations; returns rows ``(batch, ours tok/s, hf tok/s)``."""
    import tempfile

    import torch
    import transformers

    from medvl_jax.convert.decoders import load_hf_decoder
    from medvl_jax.sampling.sampler import generate

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**MODEL)).eval()
    n_params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        config, params = load_hf_decoder(d)
    params = jax.tree.map(jnp.asarray, params)
    rows = []
    rng = np.random.default_rng(0)
    for b in batches:
        prompts = rng.integers(3, MODEL["vocab_size"], size=(b, prompt_len)).astype(np.int32)

        def ours():
            generate(config, params, prompts, max_new_tokens=new_tokens)

        ids = torch.tensor(prompts, dtype=torch.long)

        def hf():
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               eos_token_id=None, pad_token_id=0)

        t_ours = _median_time(ours, repeats)
        t_hf = _median_time(hf, repeats)
        rows.append((b, b * new_tokens / t_ours, b * new_tokens / t_hf))
    print(f"model: Llama-style, {n_params / 1e6:.1f}M params, float32; prompt {prompt_len}, "
          f"{new_tokens} new tokens, greedy")
    print(f"machine: {os.cpu_count()} CPUs, {cpu_model()}; jax {jax.__version__}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}; load average "
          f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())}; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print("| batch | medvl_jax tok/s | transformers tok/s | ratio |")
    print("|---|---|---|---|")
    for b, o, h in rows:
        print(f"| {b} | {o:.1f} | {h:.1f} | {o / h:.2f}x |")
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    run(tuple(args.batches), args.prompt_len, args.new_tokens, args.repeats)


if __name__ == "__main__":
    main()
