"""Decoder parity with transformers when attention runs the splash kernel (Pallas interpret
mode on CPU): Llama (static causal kernel), Gemma 2 (sliding-window kernel, logit soft-cap) and
Gemma 3 with scanned layers and a structured ``mask_ar`` (per-example "rows" kernels, the
local/global choice traced). Same models, inputs and tolerance as test_decoder_parity.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from medvl_jax.convert.decoders import load_hf_decoder  # noqa: E402
from medvl_jax.models.decoder import Decoder  # noqa: E402
from medvl_jax.models.masks import attn_mask  # noqa: E402
from tests.models.test_decoder_parity import (  # noqa: E402
    TOL, _build_hf, _hf_logits, _inputs, _max_diff)


@pytest.mark.parametrize("family,scan,with_mask_ar", [
    ("llama", False, False), ("gemma2", False, False), ("gemma3", True, True)])
def test_splash_parity(family, scan, with_mask_ar, tmp_path):
    hf_model = _build_hf(family, str(tmp_path))
    tokens, mask, positions = _inputs()
    ref = _hf_logits(hf_model, tokens, mask, positions)
    config, params = load_hf_decoder(str(tmp_path), scan_layers=scan)
    model = Decoder(dataclasses.replace(config, attention_impl="splash"))
    mask_ar = jnp.ones(mask.shape, jnp.int32) if with_mask_ar else None

    @jax.jit
    def logits(p, t, m, pos):
        return model.apply({"params": p}, t, positions=pos, attn_mask=attn_mask(m, mask_ar))[0]

    args = (params, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask),
            jnp.asarray(positions, jnp.int32))
    assert "pallas_call" in str(jax.make_jaxpr(logits)(*args))  # the kernel, not a fallback
    ours = np.asarray(logits(*args))
    assert np.isfinite(ours).all()
    diff = _max_diff(ours, ref, mask)
    print(f"{family} (splash): HF->ours max abs diff {diff:.2e}")
    assert diff <= TOL


def test_splash_prefill_then_cached_decode(tmp_path):
    """A prefill runs the kernel among the prompt tokens and fills the cache; decoding then
    continues on the cache (xla) and every logit still matches transformers (Gemma 3)."""
    from medvl_jax.models.decoder import init_cache
    from medvl_jax.models.masks import causal_mask

    hf_model = _build_hf("gemma3", str(tmp_path))
    tokens, mask, positions = _inputs()
    ref = _hf_logits(hf_model, tokens, mask, positions)
    config, params = load_hf_decoder(str(tmp_path), scan_layers=True)
    model = Decoder(dataclasses.replace(config, attention_impl="splash"))
    tokens, positions = jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32)
    n = 40

    @jax.jit
    def prefill(cache, t, m, pos):
        return model.apply({"params": params}, t, positions=pos, attn_mask=attn_mask(m),
                           cache=cache, prefill=True)

    full_mask = causal_mask(jnp.asarray(mask))

    @jax.jit
    def step(cache, start, t, pos):
        rows = jax.lax.dynamic_slice_in_dim(full_mask, start, 1, axis=1)
        return model.apply({"params": params}, t, positions=pos, attn_mask=rows, cache=cache,
                           decode=True)

    logits, aux = prefill(init_cache(config, 2, tokens.shape[1]), tokens[:, :n],
                          jnp.asarray(mask[:, :n]), positions[:, :n])
    got = [np.asarray(logits)]
    for i in range(n, tokens.shape[1]):
        logits, aux = step(aux["cache"], i, tokens[:, i:i + 1], positions[:, i:i + 1])
        got.append(np.asarray(logits))
    diff = _max_diff(np.concatenate(got, axis=1), ref, mask)
    print(f"gemma3 (splash prefill, cached decode): max abs diff {diff:.2e}")
    assert diff <= TOL
