"""SFT training-step throughput: medvl_jax (jitted, donated state) vs transformers (PyTorch eager).

    python -m medvl_jax.bench.train_step [--batch 8] [--seq_len 128] [--steps 5]

Both sides train the same randomly initialised LLaVA (SigLIP vision tower, Llama text model;
saved by transformers, loaded here with ``convert.vlm.load_hf_vlm``) on the same random batch:
next-token cross-entropy on every token (image placeholders included, as transformers computes
it with ``labels=input_ids``) and AdamW with the same hyper-parameters. A step is forward +
backward + optimizer update. Reported: median step time after warm-up (our compile is timed
separately), tokens/s, the ratio, and MFU = model FLOPs per step (XLA's cost analysis of our
compiled step) / step time / the float32 matmul peak measured with a large ``jnp.dot``.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import statistics
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medvl_jax.bench.generate import cpu_model

# Text: Llama, 6 layers of width 384, vocab 8000. Vision: SigLIP, 4 layers of width 256,
# 64x64 RGB images in 8x8 patches (64 image tokens). About 17M parameters in all.
VISION = dict(model_type="siglip_vision_model", hidden_size=256, intermediate_size=1024,
              num_hidden_layers=4, num_attention_heads=4, image_size=64, patch_size=8,
              num_channels=3)
TEXT = dict(model_type="llama", vocab_size=8000, hidden_size=384, intermediate_size=1024,
            num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6,
            max_position_embeddings=512)
MICRO_VISION = dict(VISION, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, image_size=16)
MICRO_TEXT = dict(TEXT, vocab_size=256, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
IMAGE_TOKEN = 5
ADAMW = dict(lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)


def build_models(path: str, vision: dict = VISION, text: dict = TEXT, seed: int = 0):
    """Builds and saves a random HF LLaVA under ``path``; returns ``(hf_model, config, params)``."""
    import torch
    import transformers

    from medvl_jax.convert.vlm import load_hf_vlm

    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text,
                                   image_token_index=IMAGE_TOKEN, vision_feature_layer=-1,
                                   vision_feature_select_strategy="full")
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(cfg)
    model.save_pretrained(path)
    config, params = load_hf_vlm(path)
    return model, config, jax.tree.map(jnp.asarray, params)


def make_batch(vision: dict, text: dict, batch: int, seq_len: int, seed: int = 0):
    """Random ``(tokens int32 [B, L], images float32 [B, 1, H, W, C])``, one image per row whose
    placeholders follow a first text token."""
    rng = np.random.default_rng(seed)
    n_img = (vision["image_size"] // vision["patch_size"]) ** 2
    if seq_len < n_img + 2:
        raise ValueError(f"seq_len={seq_len} leaves no text beside {n_img} image tokens")
    tokens = rng.integers(IMAGE_TOKEN + 1, text["vocab_size"], size=(batch, seq_len))
    tokens[:, 1:1 + n_img] = IMAGE_TOKEN
    size, ch = vision["image_size"], vision["num_channels"]
    images = rng.normal(size=(batch, 1, size, size, ch)).astype(np.float32)
    return tokens.astype(np.int32), images


def jax_step_fn(config) -> tuple[Callable, Callable]:
    """``(init(params) -> state, step(state, tokens, images) -> (state, loss))``; the step is
    jitted and donates the state."""
    from medvl_jax.models.vlm import VLM
    from medvl_jax.tasks.losses import next_token_loss

    tx = optax.adamw(ADAMW["lr"], b1=ADAMW["b1"], b2=ADAMW["b2"], eps=ADAMW["eps"],
                     weight_decay=ADAMW["weight_decay"])
    model = VLM(config)

    def loss_fn(params, tokens, images):
        ones = jnp.ones(tokens.shape, jnp.int32)
        logits, _ = model.apply({"params": params}, tokens, images, input_mask=ones.astype(bool),
                                mask_ar=ones)
        return next_token_loss(logits, tokens, ones)[0]

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(state, tokens, images):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, images)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return (lambda params: (params, tx.init(params))), step


def torch_step_fn(model) -> Callable:
    """``step(input_ids, pixel_values) -> loss float`` for the HF model (train mode, AdamW)."""
    import torch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=ADAMW["lr"], betas=(ADAMW["b1"], ADAMW["b2"]),
                            eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"])

    def step(input_ids, pixel_values):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, pixel_values=pixel_values, labels=input_ids).loss
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def torch_inputs(tokens: np.ndarray, images: np.ndarray):
    """Our ``[B, L]`` / ``[B, N, H, W, C]`` batch as HF LLaVA's ``input_ids`` / ``pixel_values``."""
    import torch

    b, n, h, w, c = images.shape
    pixels = images.reshape(b * n, h, w, c).transpose(0, 3, 1, 2).copy()
    return torch.from_numpy(tokens).long(), torch.from_numpy(pixels)


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Achievable float32 FLOP/s of a jitted ``n x n`` ``jnp.dot`` (best of ``repeats``)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dot(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


def run(batch: int = 8, seq_len: int = 128, steps: int = 5, warmup: int = 2) -> dict[str, Any]:
    """Measures both sides; prints a Markdown table and returns the numbers."""
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as d:
        hf_model, config, params = build_models(d)
    n_params = sum(p.numel() for p in hf_model.parameters())
    tokens, images = make_batch(VISION, TEXT, batch, seq_len)
    ids, pixels = torch_inputs(tokens, images)

    init, step = jax_step_fn(config)
    state = init(params)
    x_tokens, x_images = jnp.asarray(tokens), jnp.asarray(images)
    t0 = time.perf_counter()
    compiled = step.lower(state, x_tokens, x_images).compile()
    compile_s = time.perf_counter() - t0
    flops = _flops(compiled)

    def ours():
        nonlocal state
        state, loss = compiled(state, x_tokens, x_images)
        return float(loss)

    theirs = torch_step_fn(hf_model)
    losses = {"medvl_jax": ours(), "transformers": theirs(ids, pixels)}  # first step: same params
    times = {}
    for name, fn in (("medvl_jax", ours), ("transformers", lambda: theirs(ids, pixels))):
        for _ in range(warmup):
            fn()
        ts = []
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        times[name] = statistics.median(ts)
    peak = matmul_peak()
    n_tok = batch * seq_len
    load = os.getloadavg()
    print(f"model: HF LLaVA (SigLIP {VISION['num_hidden_layers']}x{VISION['hidden_size']}, "
          f"Llama {TEXT['num_hidden_layers']}x{TEXT['hidden_size']}, vocab {TEXT['vocab_size']}),"
          f" {n_params / 1e6:.1f}M params, float32; batch {batch} x {seq_len} tokens "
          f"({(VISION['image_size'] // VISION['patch_size']) ** 2} image tokens per row)")
    print(f"machine: {os.cpu_count()} CPUs, {cpu_model()}; jax {jax.__version__}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__}; load average {load[0]:.1f} / {load[1]:.1f} / "
          f"{load[2]:.1f}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    rel = abs(losses["medvl_jax"] - losses["transformers"]) / abs(losses["transformers"])
    print(f"first-step loss: medvl_jax {losses['medvl_jax']:.6f}, transformers "
          f"{losses['transformers']:.6f} (rel diff {rel:.1e})")
    print(f"our compile: {compile_s:.1f} s; FLOPs/step (XLA cost analysis): {flops / 1e9:.1f} G; "
          f"matmul peak (jnp.dot 2048^2 float32): {peak / 1e9:.1f} GFLOP/s")
    print("| implementation | step s (median) | tokens/s | MFU |")
    print("|---|---|---|---|")
    for name in ("medvl_jax", "transformers"):
        t = times[name]
        print(f"| {name} | {t:.3f} | {n_tok / t:.0f} | {100 * flops / t / peak:.1f} % |")
    ratio = times["transformers"] / times["medvl_jax"]
    print(f"ratio (medvl_jax speed / transformers speed): {ratio:.2f}x")
    return dict(losses=losses, times=times, compile_s=compile_s, flops=flops, peak=peak,
                ratio=ratio, load=load)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    run(args.batch, args.seq_len, args.steps, args.warmup)


if __name__ == "__main__":
    main()
