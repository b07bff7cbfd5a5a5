"""Hugging Face <-> medvl_jax for VLMs: PaliGemma, LLaVA and Gemma 3 (image-text-to-text).

Tensor names are normalised on import to the layout that transformers writes with
``save_pretrained`` (``vision_tower.*``, ``multi_modal_projector.*``,
``language_model.model.*``, ``language_model.lm_head.weight``); hub checkpoints that use
``vision_tower.vision_model.*`` or ``model.language_model.*`` load too. Export writes that layout.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medvl_jax.convert import hf_io
from medvl_jax.convert.decoders import decoder_config_from_hf, decoder_config_to_hf, decoder_mapping
from medvl_jax.convert.mapping import COPY, COPY_ND, DENSE, Mapping, Rule, hf_to_ours, ours_to_hf
from medvl_jax.convert.vision import vision_config_from_hf, vision_config_to_hf, vision_mapping
from medvl_jax.models.vlm import VLM, VLMConfig

ARCHITECTURES = {
    "PaliGemmaForConditionalGeneration": "paligemma",
    "LlavaForConditionalGeneration": "llava",
    "Gemma3ForConditionalGeneration": "gemma3",
}
_TEXT_ARCH = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
              "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
              "qwen2": "Qwen2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


def vlm_family(hf: dict) -> str:
    """"paligemma", "llava" or "gemma3" from an HF config dict."""
    for arch in hf.get("architectures") or []:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    raise ValueError(f"unsupported VLM architectures {hf.get('architectures')}; "
                     f"supported: {sorted(ARCHITECTURES)}")


def vlm_config_from_hf(hf: dict, **text_overrides: Any) -> VLMConfig:
    """Builds a :class:`VLMConfig` from an HF config dict; overrides go to the decoder config."""
    fam = vlm_family(hf)
    text = dict(hf["text_config"])
    if text.get("model_type") not in _TEXT_ARCH:
        raise ValueError(f"unsupported text_config.model_type {text.get('model_type')!r}; "
                         f"supported: {', '.join(sorted(_TEXT_ARCH))}")
    text["architectures"] = [_TEXT_ARCH[text["model_type"]]]
    if fam == "paligemma":
        text.pop("use_bidirectional_attention", None)  # the prefix mask comes from mask_ar
    scan = {k: v for k, v in text_overrides.items() if k in ("scan_layers", "remat_policy")}
    feature = {}
    if fam == "llava":
        layer = hf.get("vision_feature_layer", -2)
        if layer == -1 and hf["vision_config"].get("model_type") == "siglip_vision_model":
            # LLaVA takes hidden_states[-1], the last layer *before* SigLIP's post-layernorm;
            # our feature_layer=-1 means the post-normed output, so name the layer by index.
            layer = hf["vision_config"]["num_hidden_layers"]
        feature = {"feature_layer": layer}
    vision_cfg = vision_config_from_hf(hf["vision_config"], **scan, **feature)
    common = dict(vision=vision_cfg, text=decoder_config_from_hf(text, **text_overrides),
                  image_token_id=hf["image_token_index"])
    if fam == "paligemma":
        return VLMConfig(**common, projector="linear", position_offset=1)
    if fam == "llava":
        if hf.get("projector_hidden_act", "gelu") != "gelu" or not hf.get(
                "multimodal_projector_bias", True):
            raise ValueError("only LLaVA projectors with GELU and biases are supported")
        if not isinstance(hf.get("vision_feature_layer", -2), int):
            raise ValueError("several vision_feature_layer values are not supported")
        return VLMConfig(**common, projector="mlp2x_gelu",
                         drop_cls=hf.get("vision_feature_select_strategy", "default") == "default")
    return VLMConfig(**common, projector="gemma3", image_bidirectional=True,
                     mm_tokens_per_image=hf.get("mm_tokens_per_image", 256))


def vlm_config_to_hf(c: VLMConfig, family: str, text_family: str | None = None) -> dict:
    """An HF config dict for our VLM config in the given family's vocabulary.

    ``text_family`` names the language model's family (see ``convert.decoders``); by default
    "llama" for LLaVA, "gemma"/"gemma2" for PaliGemma (by sandwich norms), "gemma3" for Gemma 3.
    """
    if text_family is None:
        text_family = {"llava": "llama", "gemma3": "gemma3",
                       "paligemma": "gemma2" if c.text.sandwich_norms else "gemma"}[family]
    text = decoder_config_to_hf(c.text, text_family)
    vision = vision_config_to_hf(c.vision)
    for d in (text, vision):
        d.pop("architectures", None)
    arch = {v: k for k, v in ARCHITECTURES.items()}[family]
    hf: dict[str, Any] = dict(architectures=[arch], model_type=family, text_config=text,
                              vision_config=vision, image_token_index=c.image_token_id,
                              tie_word_embeddings=c.text.tie_embeddings)
    if family == "paligemma":
        vision["projection_dim"] = c.text.embed_dim
        hf["projection_dim"] = c.text.embed_dim
        hf["hidden_size"] = c.text.embed_dim
    elif family == "llava":
        hf.update(projector_hidden_act="gelu", multimodal_projector_bias=True,
                  vision_feature_layer=c.vision.feature_layer,
                  vision_feature_select_strategy="default" if c.drop_cls else "full")
    else:
        hf["mm_tokens_per_image"] = c.mm_tokens_per_image
    return hf


def vlm_mapping(c: VLMConfig, family: str) -> Mapping:
    """The rule list of a whole VLM (vision tower + projector + language model)."""
    vis = vision_mapping(c.vision, prefix="vision_tower.", ours_prefix="vision/")
    dec = decoder_mapping(c.text, prefix="language_model.model.", ours_prefix="decoder/",
                          lm_head="language_model.lm_head.weight")
    mm = "multi_modal_projector."
    if c.projector == "linear":
        proj = [Rule(mm + "linear.weight", "projector/linear", DENSE),
                Rule(mm + "linear.bias", "projector/linear_bias", COPY)]
    elif c.projector == "mlp2x_gelu":
        proj = [Rule(mm + "linear_1.weight", "projector/fc1", DENSE),
                Rule(mm + "linear_1.bias", "projector/fc1_bias", COPY),
                Rule(mm + "linear_2.weight", "projector/fc2", DENSE),
                Rule(mm + "linear_2.bias", "projector/fc2_bias", COPY)]
    else:
        proj = [Rule(mm + "mm_input_projection_weight", "projector/kernel", COPY_ND),
                Rule(mm + "mm_soft_emb_norm.weight", "projector/norm/scale", COPY)]
    return Mapping(vis.rules + tuple(proj) + dec.rules, vis.ignore_hf + dec.ignore_hf)


def normalise_names(tensors: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    """Rewrites the naming variants of VLM checkpoints to the ``save_pretrained`` layout."""
    for name, arr in tensors:
        if name.startswith("model."):
            name = name[len("model."):]
            if name.startswith("language_model."):
                name = "language_model.model." + name[len("language_model."):]
        if name == "lm_head.weight":
            name = "language_model.lm_head.weight"
        if name.startswith("vision_tower.vision_model."):
            name = "vision_tower." + name[len("vision_tower.vision_model."):]
        yield name, arr


def vlm_param_shapes(c: VLMConfig) -> dict:
    """Shapes/dtypes of our (unboxed) VLM params."""
    v = c.vision
    hw = (v.image_size, v.image_size, v.num_channels)
    images = jnp.zeros((1, 1, v.tubelet, *hw) if v.tubelet else (1, 1, *hw), jnp.float32)
    tokens = jnp.zeros((1, 4), jnp.int32)
    ones = jnp.ones((1, 4), jnp.int32)

    def init():
        return VLM(c).init(jax.random.key(0), tokens, images, input_mask=ones, mask_ar=ones)

    return nn.meta.unbox(jax.eval_shape(init))["params"]


def load_hf_vlm(model_dir: str, **text_overrides: Any) -> tuple[VLMConfig, dict]:
    """Loads an HF PaliGemma/LLaVA/Gemma 3 checkpoint dir: ``(config, params)``."""
    hf = hf_io.read_json(model_dir)
    with hf_io.config_errors(model_dir):
        config = vlm_config_from_hf(hf, **text_overrides)
    params = hf_to_ours(normalise_names(hf_io.iter_checkpoint(model_dir)),
                        vlm_mapping(config, vlm_family(hf)), vlm_param_shapes(config),
                        scanned=config.text.scan_layers, where=model_dir)
    return config, params


def save_hf_vlm(params: dict, config: VLMConfig, out_dir: str, *, family: str,
                hf_config: dict | None = None, src_dir: str | None = None,
                dtype: Any = None, text_family: str | None = None) -> None:
    """Writes our VLM params as an HF checkpoint dir (config from ``hf_config`` or built by
    :func:`vlm_config_to_hf`); tokenizer/processor files are copied from ``src_dir``."""
    if config.vision.scan_layers != config.text.scan_layers:
        raise ValueError("vision and text towers must both be scanned or both unscanned")
    tensors = ours_to_hf(nn.meta.unbox(params), vlm_mapping(config, family),
                         scanned=config.text.scan_layers,
                         dtype=None if dtype is None else np.dtype(dtype))
    hf_io.save_checkpoint(out_dir, tensors)
    cfg = dict(hf_config) if hf_config else vlm_config_to_hf(config, family, text_family)
    if dtype is not None:
        cfg["dtype"] = str(np.dtype(dtype))
    hf_io.write_json(out_dir, cfg)
    if src_dir is not None:
        hf_io.copy_side_files(src_dir, out_dir)
