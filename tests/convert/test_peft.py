"""LoRA export: a PEFT adapter loaded by ``peft`` on our Hugging Face export, and merged
weights loaded plainly by transformers, both give our logits."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from medvl_jax.convert import checkpoint_io, decoders as dec, from_hf, to_hf  # noqa: E402
from medvl_jax.convert import peft as peft_export  # noqa: E402
from medvl_jax.models import lora  # noqa: E402
from medvl_jax.train import state as state_lib  # noqa: E402

TARGETS = r"layers(_\d+)?/(attn/(q|k|v|o)|mlp/(gate|up|down))$|^lm_head$"


def _tiny_llama(path: str) -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)


def _lora_config(targets=TARGETS):
    c = lora.default_config()
    c.rank, c.alpha, c.targets = 4, 8.0, targets
    return c


def _random_factors(params, c, seed=0):
    """Factors in our format with random non-zero a and b (from unboxed params: the split
    comes from the paths)."""
    tree = lora.init_lora(jax.random.key(seed), params, c)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (rng.normal(size=x.shape) * 0.2).astype(np.float32), tree)


def _our_logits(model, params, tokens):
    n = tokens.shape[1]
    pos = jnp.broadcast_to(jnp.arange(n), tokens.shape)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((n, n), bool)), (tokens.shape[0], n, n))
    out, _ = jax.jit(lambda p: model.apply({"params": p}, jnp.asarray(tokens), positions=pos,
                                           attn_mask=mask))(params)
    return np.asarray(out)


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


@pytest.mark.parametrize("scan", [False, True])
def test_adapter_and_merged_roundtrip(tmp_path, scan):
    hf_dir, ours_dir = str(tmp_path / "hf"), str(tmp_path / "ours")
    _tiny_llama(hf_dir)
    from_hf.convert(hf_dir, ours_dir, scan_layers=scan)
    model, params, meta = checkpoint_io.load_checkpoint(ours_dir)
    params = jax.tree.map(np.asarray, params)
    c = _lora_config()
    factors = _random_factors(params, c)
    full = {**params, "lora": factors}
    tokens = np.random.default_rng(1).integers(0, 96, (2, 11)).astype(np.int32)
    ours = _our_logits(model, lora.merge(full, c), tokens)
    assert np.abs(ours - _our_logits(model, params, tokens)).max() > 1e-2  # LoRA matters

    # Base exported unmerged + a PEFT adapter.
    base_dir, adapter_dir = str(tmp_path / "base_hf"), str(tmp_path / "adapter")
    to_hf.export(ours_dir, base_dir)
    peft_export.export_adapter(factors, c, model.config, meta["family"], adapter_dir,
                               base_model_name_or_path=base_dir)
    cfg = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["peft_type"] == "LORA"
    assert len(cfg["target_modules"]) == 2 * 7 + 1
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    diff = np.abs(_torch_logits(with_adapter, tokens) - ours).max()
    print(f"scan={scan} PEFT adapter vs ours: max abs diff {diff:.2e}")
    assert diff <= 1e-4

    # Merged weights, plain transformers.
    merged_dir = str(tmp_path / "merged_hf")
    merged = peft_export.export_merged(full, c)
    assert "lora" not in merged
    dec.save_hf_decoder(merged, model.config, merged_dir, family="llama",
                        hf_config=meta["hf_config"])
    plain = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    diff = np.abs(_torch_logits(plain.eval(), tokens) - ours).max()
    print(f"scan={scan} merged export vs ours: max abs diff {diff:.2e}")
    assert diff <= 1e-4


def test_targets_peft_cannot_carry(tmp_path):
    hf_dir, ours_dir = str(tmp_path / "hf"), str(tmp_path / "ours")
    _tiny_llama(hf_dir)
    from_hf.convert(hf_dir, ours_dir)
    model, params, meta = checkpoint_io.load_checkpoint(ours_dir)
    c = _lora_config(targets=r"^embedding$|layers_0/attn/q$")
    factors = _random_factors(jax.tree.map(np.asarray, params), c)
    with pytest.raises(ValueError, match=r"'embedding'.*not a plain Linear weight"):
        peft_export.export_adapter(factors, c, model.config, meta["family"],
                                   str(tmp_path / "adapter"))
    # Merging still covers it.
    merged = peft_export.export_merged({**params, "lora": factors}, c)
    a, b = factors["embedding"]["a"], factors["embedding"]["b"]
    np.testing.assert_allclose(merged["embedding"], np.asarray(params["embedding"])
                               + 2.0 * a @ b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"lora.targets='nothing' matches no parameter"):
        lora.init_lora(jax.random.key(0), params, _lora_config(targets="nothing"))
    assert sorted(state_lib.flatten(factors)) == [
        "embedding/a", "embedding/b", "layers_0/attn/q/a", "layers_0/attn/q/b"]
