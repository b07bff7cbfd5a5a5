"""Hugging Face <-> medvl_jax for the decoder families (Llama, Mistral, Qwen2, Gemma 1/2/3).

Public entry points: :func:`decoder_config_from_hf`, :func:`decoder_config_to_hf`,
:func:`decoder_mapping`, :func:`load_hf_decoder`, :func:`save_hf_decoder`.
"""
from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medvl_jax.convert import hf_io
from medvl_jax.convert.mapping import (COPY, COPY_ND, DENSE, DENSE_OUT, Mapping, Rule,
                                       hf_to_ours, ours_to_hf)
from medvl_jax.models.decoder import Decoder, DecoderConfig

# HF architecture name -> (our family key, model_type).
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", "llama"),
    "MistralForCausalLM": ("mistral", "mistral"),
    "Qwen2ForCausalLM": ("qwen2", "qwen2"),
    "GemmaForCausalLM": ("gemma", "gemma"),
    "Gemma2ForCausalLM": ("gemma2", "gemma2"),
    "Gemma3ForCausalLM": ("gemma3", "gemma3_text"),
}
_MODEL_TYPES = {mt: fam for fam, mt in ARCHITECTURES.values()}
_ACTS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
         "gelu": "gelu", "relu": "relu"}
_ACTS_BACK = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "relu": "relu"}


def family_of(hf_config: dict) -> str:
    """Our family key ("llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3")."""
    for arch in hf_config.get("architectures") or []:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch][0]
    mt = hf_config.get("model_type")
    if mt in _MODEL_TYPES:
        return _MODEL_TYPES[mt]
    raise ValueError(f"unsupported decoder: architectures={hf_config.get('architectures')}, "
                     f"model_type={mt}; supported: {sorted(ARCHITECTURES)}")


def _rope(params: dict | None, legacy_theta: float | None, legacy_scaling: dict | None,
          default_theta: float) -> dict[str, Any]:
    """Our rope fields from an HF rope dict (v5 ``rope_parameters`` or legacy keys)."""
    p = dict(params or {})
    if legacy_scaling:
        p = {**legacy_scaling, **p}
    theta = p.get("rope_theta", legacy_theta if legacy_theta is not None else default_theta)
    kind = p.get("rope_type", p.get("type", "default"))
    if p.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "default":
        return out
    if kind == "linear":
        return {**out, "rope_scaling": "linear", "rope_factor": float(p["factor"])}
    if kind == "llama3":
        return {**out, "rope_scaling": "llama3", "rope_factor": float(p["factor"]),
                "rope_low_freq_factor": float(p["low_freq_factor"]),
                "rope_high_freq_factor": float(p["high_freq_factor"]),
                "rope_original_max_len": int(p["original_max_position_embeddings"])}
    raise ValueError(f"rope type {kind!r} is not supported (default, linear, llama3)")


def _layer_types(types: list[str] | None, n: int) -> tuple[str, ...] | None:
    if types is None:
        return None
    conv = {"sliding_attention": "local", "full_attention": "global"}
    bad = [t for t in types if t not in conv]
    if bad:
        raise ValueError(f"unsupported layer types {sorted(set(bad))}")
    if len(types) != n:
        raise ValueError(f"layer_types has {len(types)} entries, num_hidden_layers={n}")
    return tuple(conv[t] for t in types)


def decoder_config_from_hf(hf: dict, **overrides: Any) -> DecoderConfig:
    """Builds a :class:`DecoderConfig` from an HF ``config.json`` dict.

    ``overrides`` set fields of ours such as ``scan_layers``, ``remat_policy``, ``dtype``.
    """
    fam = family_of(hf)
    heads = hf["num_attention_heads"]
    n = hf["num_hidden_layers"]
    gemma = fam.startswith("gemma")
    kw: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"], num_layers=n, num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        qkv_bias=fam == "qwen2",
        norm_plus_one=gemma, scale_embeddings=gemma,
    )
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if fam == "gemma" and act == "gelu":
        act = "gelu_pytorch_tanh"  # legacy Gemma configs mean the tanh approximation
    if act not in _ACTS:
        raise ValueError(f"unsupported activation {act!r}")
    kw["activation"] = _ACTS[act]
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported")
    if fam != "qwen2" and hf.get("attention_bias"):
        raise ValueError(f"attention_bias=True (biases on q/k/v/o) is not supported for {fam}")
    rp = hf.get("rope_parameters")
    if fam == "gemma3":
        rp = rp or {}
        kw.update(_rope(rp.get("full_attention"), hf.get("rope_theta"), hf.get("rope_scaling"),
                        1_000_000.0))
        local = _rope(rp.get("sliding_attention"), hf.get("rope_local_base_freq"), None, 10_000.0)
        if len(local) > 1:
            raise ValueError("scaled rope on local (sliding) layers is not supported")
        kw["rope_local_theta"] = local["rope_theta"]
    else:
        kw.update(_rope(rp, hf.get("rope_theta"), hf.get("rope_scaling"), 10_000.0))
    if fam == "mistral":
        kw["sliding_window"] = hf.get("sliding_window")
    if fam == "qwen2" and hf.get("use_sliding_window") and hf.get("sliding_window"):
        kw["sliding_window"] = hf["sliding_window"]
        kw["layer_types"] = _layer_types(hf.get("layer_types"), n) or tuple(
            "local" if i >= hf.get("max_window_layers", 28) else "global" for i in range(n))
    if fam in ("gemma2", "gemma3"):
        if hf.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention=True is not supported")
        kw.update(sandwich_norms=True, sliding_window=hf.get("sliding_window"),
                  query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
                  attn_logit_softcap=hf.get("attn_logit_softcapping"),
                  final_logit_softcap=hf.get("final_logit_softcapping"))
        pattern = 2 if fam == "gemma2" else hf.get("sliding_window_pattern",
                                                   hf.get("_sliding_window_pattern", 6))
        types = _layer_types(hf.get("layer_types"), n) or tuple(
            "local" if (i + 1) % pattern else "global" for i in range(n))
        kw["layer_types"] = types if kw["sliding_window"] else None
    if fam == "gemma3":
        kw["qk_norm"] = True
    kw.update(overrides)
    return DecoderConfig(**kw)


def _rope_to_hf(c: DecoderConfig) -> dict:
    out: dict[str, Any] = {"rope_theta": c.rope_theta, "rope_type": "default"}
    if c.rope_scaling == "linear":
        out.update(rope_type="linear", factor=c.rope_factor)
    elif c.rope_scaling == "llama3":
        out.update(rope_type="llama3", factor=c.rope_factor,
                   low_freq_factor=c.rope_low_freq_factor,
                   high_freq_factor=c.rope_high_freq_factor,
                   original_max_position_embeddings=c.rope_original_max_len)
    return out


def decoder_config_to_hf(c: DecoderConfig, family: str) -> dict:
    """An HF ``config.json`` dict for our config, in the given family's vocabulary."""
    arch = {fam: (a, mt) for a, (fam, mt) in ARCHITECTURES.items()}
    if family not in arch:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(arch)}")
    name, model_type = arch[family]
    hf: dict[str, Any] = dict(
        architectures=[name], model_type=model_type, vocab_size=c.vocab_size,
        hidden_size=c.embed_dim, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, intermediate_size=c.mlp_dim,
        rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings,
        dtype=str(jnp.dtype(c.param_dtype)),
    )
    act_key = "hidden_activation" if family in ("gemma2", "gemma3") else "hidden_act"
    hf[act_key] = _ACTS_BACK[c.activation]
    if c.qkv_bias != (family == "qwen2"):
        raise ValueError(f"{family} checkpoints {'need' if family == 'qwen2' else 'cannot have'} "
                         "q/k/v biases (qkv_bias)")
    if family != "qwen2":
        hf["attention_bias"] = False
    types = ["sliding_attention" if loc else "full_attention" for loc in c.local_layers]
    if family == "gemma3":
        hf["rope_parameters"] = {
            "full_attention": _rope_to_hf(c),
            "sliding_attention": {"rope_type": "default",
                                  "rope_theta": c.rope_local_theta or c.rope_theta}}
    else:
        hf["rope_parameters"] = _rope_to_hf(c)
    if family == "mistral":
        hf["sliding_window"] = c.sliding_window
    if family == "qwen2":
        hf["use_sliding_window"] = c.sliding_window is not None
        hf["sliding_window"] = c.sliding_window
        hf["layer_types"] = types
        hf["max_window_layers"] = c.num_layers
    if family in ("gemma2", "gemma3"):
        hf.update(sliding_window=c.sliding_window, layer_types=types,
                  query_pre_attn_scalar=c.query_pre_attn_scalar or c.head_dim,
                  attn_logit_softcapping=c.attn_logit_softcap,
                  final_logit_softcapping=c.final_logit_softcap)
    return hf


def decoder_mapping(c: DecoderConfig, prefix: str = "model.", ours_prefix: str = "",
                    lm_head: str = "lm_head.weight") -> Mapping:
    """The rule list for a decoder; ``prefix``/``ours_prefix`` nest it inside a larger model,
    ``lm_head`` is the HF name of the output projection (used when embeddings are untied)."""
    layer = f"{prefix}layers.{{i}}."
    mine = f"{ours_prefix}layers/{{i}}/"
    rules = [
        Rule(f"{prefix}embed_tokens.weight", f"{ours_prefix}embedding", COPY_ND),
        Rule(f"{prefix}norm.weight", f"{ours_prefix}final_norm/scale"),
        Rule(layer + "self_attn.q_proj.weight", mine + "attn/q", DENSE),
        Rule(layer + "self_attn.k_proj.weight", mine + "attn/k", DENSE),
        Rule(layer + "self_attn.v_proj.weight", mine + "attn/v", DENSE),
        Rule(layer + "self_attn.o_proj.weight", mine + "attn/o", DENSE_OUT),
        Rule(layer + "mlp.gate_proj.weight", mine + "mlp/gate", DENSE),
        Rule(layer + "mlp.up_proj.weight", mine + "mlp/up", DENSE),
        Rule(layer + "mlp.down_proj.weight", mine + "mlp/down", DENSE),
        Rule(layer + "input_layernorm.weight", mine + "pre_attn_norm/scale"),
    ]
    if c.qkv_bias:
        rules += [Rule(layer + f"self_attn.{x}_proj.bias", mine + f"attn/{x}_bias") for x in "qkv"]
    if c.qk_norm:
        rules += [Rule(layer + f"self_attn.{x}_norm.weight", mine + f"attn/{x}_norm/scale")
                  for x in "qk"]
    if c.sandwich_norms:
        rules += [
            Rule(layer + "post_attention_layernorm.weight", mine + "post_attn_norm/scale"),
            Rule(layer + "pre_feedforward_layernorm.weight", mine + "pre_mlp_norm/scale"),
            Rule(layer + "post_feedforward_layernorm.weight", mine + "post_mlp_norm/scale"),
        ]
    else:
        rules.append(Rule(layer + "post_attention_layernorm.weight", mine + "pre_mlp_norm/scale"))
    ignore = [r"rotary_emb\.", r"\.inv_freq$"]
    if c.tie_embeddings:
        ignore.append("^" + re.escape(lm_head) + "$")
    else:
        rules.append(Rule(lm_head, f"{ours_prefix}lm_head", DENSE))
    return Mapping(tuple(rules), tuple(ignore))


def param_shapes(config: DecoderConfig) -> dict:
    """Shapes/dtypes of our (unboxed) decoder params, without allocating them."""
    model = Decoder(config)
    tokens = jnp.zeros((1, 1), jnp.int32)

    def init():
        return model.init(jax.random.key(0), tokens, positions=tokens,
                          attn_mask=jnp.ones((1, 1, 1), bool))["params"]

    return nn.meta.unbox(jax.eval_shape(init))


def load_hf_decoder(model_dir: str, **overrides: Any) -> tuple[DecoderConfig, dict]:
    """Loads an HF causal-LM checkpoint dir: returns ``(config, params)`` (numpy leaves).

    ``overrides`` go to :func:`decoder_config_from_hf` (``scan_layers=True`` stacks layers).
    """
    with hf_io.config_errors(model_dir):
        config = decoder_config_from_hf(hf_io.read_json(model_dir), **overrides)
    params = hf_to_ours(hf_io.iter_checkpoint(model_dir), decoder_mapping(config),
                        param_shapes(config), scanned=config.scan_layers, where=model_dir)
    return config, params


def save_hf_decoder(params: dict, config: DecoderConfig, out_dir: str, *, family: str,
                    hf_config: dict | None = None, src_dir: str | None = None,
                    dtype: Any = None, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes our decoder params as an HF checkpoint dir loadable by ``from_pretrained``.

    ``hf_config`` (else one built by :func:`decoder_config_to_hf`) becomes config.json;
    tokenizer and generation files are copied from ``src_dir`` when given. ``dtype`` (numpy
    dtype) casts tensors on export.
    """
    params = nn.meta.unbox(params)
    tensors = ours_to_hf(params, decoder_mapping(config), scanned=config.scan_layers,
                         dtype=None if dtype is None else np.dtype(dtype))
    hf_io.save_checkpoint(out_dir, tensors, max_shard_bytes=max_shard_bytes)
    cfg = dict(hf_config) if hf_config is not None else decoder_config_to_hf(config, family)
    if dtype is not None:
        cfg["dtype"] = str(np.dtype(dtype))
    hf_io.write_json(out_dir, cfg)
    if src_dir is not None:
        hf_io.copy_side_files(src_dir, out_dir)
