"""Logit parity of the decoder families with transformers' PyTorch models, both directions.

For each family a tiny random model is built with transformers (fp32, seeded, nothing
downloaded), saved, converted, and run on a padded batch of 64 tokens: our logits must match
PyTorch's. Then our params are exported, reloaded with ``from_pretrained`` and must give the
same logits again; a scanned and an unscanned model must export identical tensors.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from medvl_jax.convert import hf_io  # noqa: E402
from medvl_jax.convert.decoders import load_hf_decoder, save_hf_decoder  # noqa: E402
from medvl_jax.models.decoder import Decoder  # noqa: E402
from medvl_jax.models.masks import causal_mask  # noqa: E402

SEQ = 64
TOL = 1e-4
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)


def _families():
    t = transformers
    return {
        "llama": (t.LlamaConfig, dict(num_hidden_layers=2, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32})),
        "mistral": (t.MistralConfig, dict(num_hidden_layers=2, sliding_window=12, head_dim=16)),
        "qwen2": (t.Qwen2Config, dict(num_hidden_layers=3, use_sliding_window=True,
                                      sliding_window=10, max_window_layers=1)),
        "gemma": (t.GemmaConfig, dict(num_hidden_layers=2, head_dim=32, num_key_value_heads=1)),
        "gemma2": (t.Gemma2Config, dict(num_hidden_layers=2, head_dim=16, sliding_window=12,
                                        query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                                        final_logit_softcapping=3.0)),
        "gemma3": (t.Gemma3TextConfig, dict(
            num_hidden_layers=3, head_dim=16, sliding_window=10, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_scaling={"rope_type": "linear", "factor": 4.0})),
    }


def _build_hf(family: str, path: str):
    cls, extra = _families()[family]
    torch.manual_seed(0)
    config = cls(**{**COMMON, **extra})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # random norms/biases too, so every parameter matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    model.save_pretrained(path)
    return model


def _inputs():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, size=(2, SEQ)).astype(np.int64)
    mask = np.ones((2, SEQ), bool)
    mask[1, :7] = False  # left padding in the second row
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return tokens, mask, positions


def _hf_logits(model, tokens, mask, positions) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens),
                    attention_mask=torch.tensor(mask.astype(np.int64)),
                    position_ids=torch.tensor(positions))
    return out.logits.numpy()


def _our_logits(config, params, tokens, mask, positions) -> np.ndarray:
    model = Decoder(config)
    fn = jax.jit(lambda p, t, m, pos: model.apply({"params": p}, t, positions=pos,
                                                  attn_mask=causal_mask(m))[0])
    return np.asarray(fn(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask),
                         jnp.asarray(positions, jnp.int32)))


def _max_diff(a, b, mask) -> float:
    return float(np.abs(a - b)[mask].max())


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3"])
def test_roundtrip_parity(family, tmp_path):
    src, out_u, out_s = (str(tmp_path / n) for n in ("hf", "out_unscanned", "out_scanned"))
    hf_model = _build_hf(family, src)
    tokens, mask, positions = _inputs()
    ref = _hf_logits(hf_model, tokens, mask, positions)

    config, params = load_hf_decoder(src)
    ours = _our_logits(config, params, tokens, mask, positions)
    assert np.isfinite(ours).all()  # padded rows too: a masked loss must not meet NaN
    diff = _max_diff(ours, ref, mask)
    print(f"{family}: HF->ours max abs diff {diff:.2e}")
    assert diff <= TOL

    save_hf_decoder(params, config, out_u, family=family, src_dir=src)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_u, attn_implementation="eager")
    again = _hf_logits(reloaded.eval(), tokens, mask, positions)
    diff_back = _max_diff(again, ours, mask)
    print(f"{family}: ours->HF max abs diff {diff_back:.2e}")
    assert diff_back <= TOL
    assert os.path.exists(os.path.join(out_u, "generation_config.json"))

    # Scanned layers (with rematerialisation) give the same logits and export the same tensors.
    config_s, params_s = load_hf_decoder(src, scan_layers=True, remat_policy="full")
    scanned = _our_logits(config_s, params_s, tokens, mask, positions)
    assert _max_diff(scanned, ours, mask) <= 1e-5
    save_hf_decoder(params_s, config_s, out_s, family=family)
    a = dict(hf_io.iter_checkpoint(out_u))
    b = dict(hf_io.iter_checkpoint(out_s))
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    original = dict(hf_io.iter_checkpoint(src))
    for name in a:
        np.testing.assert_array_equal(a[name], original[name], err_msg=name)


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_cached_decode_matches_pytorch(family, tmp_path):
    """Prefill 40 tokens into a static cache, then decode one token at a time."""
    from medvl_jax.models.decoder import init_cache

    hf_model = _build_hf(family, str(tmp_path))
    tokens, mask, positions = _inputs()
    ref = _hf_logits(hf_model, tokens, mask, positions)
    config, params = load_hf_decoder(str(tmp_path), scan_layers=True)
    model = Decoder(config)
    full_mask = causal_mask(jnp.asarray(mask))

    @jax.jit
    def step(cache, start, t, pos):
        rows = jax.lax.dynamic_slice_in_dim(full_mask, start, t.shape[1], axis=1)
        return model.apply({"params": params}, t, positions=pos, attn_mask=rows, cache=cache,
                           decode=True)

    cache = init_cache(config, 2, SEQ)
    logits, aux = step(cache, 0, tokens[:, :40], positions[:, :40])
    got = [np.asarray(logits)]
    cache = aux["cache"]
    for i in range(40, SEQ):
        logits, aux = step(cache, i, tokens[:, i:i + 1], positions[:, i:i + 1])
        cache = aux["cache"]
        got.append(np.asarray(logits))
    assert int(cache["index"]) == SEQ
    diff = _max_diff(np.concatenate(got, axis=1), ref, mask)
    print(f"{family}: cached decode max abs diff {diff:.2e}")
    assert diff <= TOL


def test_sliding_window_is_exercised(tmp_path):
    """Dropping the window changes the logits, so the parity above really tests windows."""
    import dataclasses

    hf_model = _build_hf("gemma2", str(tmp_path))
    tokens, mask, positions = _inputs()
    ref = _hf_logits(hf_model, tokens, mask, positions)
    config, params = load_hf_decoder(str(tmp_path))
    no_window = dataclasses.replace(config, sliding_window=None, layer_types=None)
    assert _max_diff(_our_logits(no_window, params, tokens, mask, positions), ref, mask) > 1e-2


def test_bfloat16_load_and_export(tmp_path):
    """Loading into bfloat16 params and exporting bfloat16 tensors rounds like torch does."""
    import ml_dtypes

    hf_model = _build_hf("llama", str(tmp_path / "hf"))
    config, params = load_hf_decoder(str(tmp_path / "hf"), param_dtype=jnp.bfloat16,
                                     dtype=jnp.bfloat16)
    assert params["layers_0"]["attn"]["q"].dtype == jnp.bfloat16
    save_hf_decoder(params, config, str(tmp_path / "out"), family="llama",
                    dtype=ml_dtypes.bfloat16)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    want = hf_model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, want[name].to(torch.bfloat16)), name
    tokens, mask, positions = _inputs()
    logits = _our_logits(config, params, tokens, mask, positions)
    ref = _hf_logits(hf_model, tokens, mask, positions)
    assert np.isfinite(logits).all() and _max_diff(logits, ref, mask) < 0.25 * np.abs(ref).max()


def test_gradients_match_pytorch_autograd_with_scan_and_remat(tmp_path):
    """Backward through scanned, rematerialised layers equals torch autograd."""
    hf_model = _build_hf("gemma2", str(tmp_path))
    tokens, mask, positions = _inputs()
    weights = np.random.default_rng(3).normal(size=(2, SEQ, 256)).astype(np.float32)
    weights[~mask] = 0.0
    logits = hf_model(input_ids=torch.tensor(tokens),
                      attention_mask=torch.tensor(mask.astype(np.int64)),
                      position_ids=torch.tensor(positions)).logits
    (logits * torch.tensor(weights)).sum().backward()
    want_q = hf_model.model.layers[1].self_attn.q_proj.weight.grad.numpy()
    want_emb = hf_model.model.embed_tokens.weight.grad.numpy()

    config, params = load_hf_decoder(str(tmp_path), scan_layers=True, remat_policy="full")
    model = Decoder(config)

    def loss(p):
        out = model.apply({"params": p}, jnp.asarray(tokens, jnp.int32),
                          positions=jnp.asarray(positions, jnp.int32),
                          attn_mask=causal_mask(jnp.asarray(mask)))[0]
        return (out * weights).sum()

    grads = jax.jit(jax.grad(loss))(params)
    got_q = np.asarray(grads["layers"]["attn"]["q"][1]).reshape(64, -1).T  # back to [out, in]
    scale = max(np.abs(want_q).max(), 1.0)
    assert np.abs(got_q - want_q).max() <= 1e-4 * scale
    # torch's nn.Embedding(padding_idx=pad) never updates the pad row; ours has no such rule.
    rows = np.arange(256) != hf_model.config.pad_token_id
    scale = max(np.abs(want_emb).max(), 1.0)
    assert np.abs(np.asarray(grads["embedding"])[rows] - want_emb[rows]).max() <= 1e-4 * scale
