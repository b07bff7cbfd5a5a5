"""Export of LoRA-trained params: merged weights, or a PEFT adapter directory.

Two ways out of a run trained with ``config.lora`` (see :mod:`medvl_jax.models.lora`):

* merged: :func:`export_merged` folds the factors into the base weights; the result is plain
  model params that the usual Hugging Face export writes (``convert.to_hf``; exporting a
  training workdir merges automatically).
* adapter: :func:`export_adapter` writes ``adapter_config.json`` + ``adapter_model.safetensors``
  that ``peft.PeftModel.from_pretrained(base_model, out_dir)`` loads on top of the Hugging
  Face export of the *unmerged* base params (``lora.split(params)[0]``).

Our param paths are mapped to Hugging Face module names through the family's declarative
mapping (``convert.decoders`` / ``convert.vlm``): a target must map to a ``torch.nn.Linear``
weight converted by a plain transpose (``Transform("dense")``) with the same input/output split
as its factors; anything else (embeddings, fused or split tensors, convolutions) is refused
with an error naming the target. PEFT stores ``lora_A.weight`` ``[r, in]`` and
``lora_B.weight`` ``[out, r]`` and adds ``scaling * B @ A`` (``scaling = lora_alpha / r``, or
``/ sqrt(r)`` with ``use_rslora``) to the ``[out, in]`` weight; our ``a`` ``[*in, r]`` and
``b`` ``[r, *out]`` are their flattened transposes.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np

from medvl_jax.convert import decoders as dec
from medvl_jax.convert import vlm as vlm_conv
from medvl_jax.convert.mapping import Mapping as RuleMapping
from medvl_jax.models import lora as lora_lib
from medvl_jax.models.decoder import DecoderConfig
from medvl_jax.models.vlm import VLMConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# transformers 5 loads VLM checkpoints (the save_pretrained layout our export writes) into
# modules named differently; PEFT addresses the loaded modules.
_VLM_RUNTIME = (("language_model.lm_head", "lm_head"),
                ("language_model.model.", "model.language_model."),
                ("vision_tower.", "model.vision_tower."),
                ("multi_modal_projector.", "model.multi_modal_projector."))


def export_merged(params: Mapping, lora_config: Mapping) -> dict:
    """Training params with a ``lora`` entry -> plain model params (factors merged, base
    dtypes kept, numpy leaves), ready for ``save_hf_decoder`` / ``save_hf_vlm``.
    ``lora_config``: the run's config or its ``lora`` section."""
    c = lora_lib.get_config(lora_config)
    merged = lora_lib.merged_params(params, c)
    import jax

    return jax.tree.map(np.asarray, merged)


def _mapping(model_config: DecoderConfig | VLMConfig, family: str) -> tuple[RuleMapping, bool]:
    if isinstance(model_config, VLMConfig):
        fam = vlm_conv.ARCHITECTURES.get(family, family)
        if fam not in vlm_conv.ARCHITECTURES.values():
            raise ValueError(f"unknown VLM family {family!r}; expected one of "
                             f"{sorted(vlm_conv.ARCHITECTURES)}")
        return vlm_conv.vlm_mapping(model_config, fam), model_config.text.scan_layers
    return dec.decoder_mapping(model_config), model_config.scan_layers


def _runtime_name(hf_name: str, vlm: bool) -> str:
    if not vlm:
        return hf_name
    for old, new in _VLM_RUNTIME:
        if hf_name.startswith(old):
            return new + hf_name[len(old):]
    return hf_name


def module_names(paths: list[str], model_config: DecoderConfig | VLMConfig, family: str
                 ) -> dict[str, list[tuple[int | None, str, int]]]:
    """``{our param path: [(layer index or None, HF module name, n_in), ...]}`` for LoRA
    targets (several entries for a scanned path, one per layer). Raises ValueError naming a
    target whose Hugging Face counterpart is not a plain Linear weight."""
    mapping, scanned = _mapping(model_config, family)
    vlm = isinstance(model_config, VLMConfig)
    out: dict[str, list[tuple[int | None, str, int]]] = {}
    for path in paths:
        hit = None
        for rule in mapping.rules:
            if "{i}" in rule.ours:
                if scanned:
                    rx = "^" + re.escape(rule.ours.replace("/{i}", "")) + "$"
                else:
                    rx = "^" + re.escape(rule.ours).replace(r"/\{i\}", r"_(?P<i>\d+)") + "$"
            else:
                rx = "^" + re.escape(rule.ours) + "$"
            m = re.match(rx, path)
            if m:
                hit = (rule, m)
                break
        if hit is None:
            raise ValueError(f"LoRA target {path!r} has no Hugging Face counterpart in the "
                             f"{family} mapping")
        rule, m = hit
        if rule.transform.kind != "dense" or not rule.hf.endswith(".weight"):
            raise ValueError(f"LoRA target {path!r} maps to {rule.hf!r}, which is not a plain "
                             f"Linear weight (transform {rule.transform.kind!r}); PEFT cannot "
                             f"carry this LoRA: drop it from lora.targets or export merged")
        module = rule.hf[:-len(".weight")]
        if "{i}" in rule.ours and scanned:
            out[path] = [(None, module, rule.transform.n_in)]  # layer filled in by the caller
        else:
            i = int(m.group("i")) if "i" in m.groupdict() else None
            out[path] = [(i, _runtime_name(module.format(i=i), vlm), rule.transform.n_in)]
    return out


def adapter_tensors(lora_params: Mapping, model_config: DecoderConfig | VLMConfig,
                    family: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """``({PEFT key: float32 array}, sorted target module names)`` for a factor tree."""
    vlm = isinstance(model_config, VLMConfig)
    facs = {p: (np.asarray(a, np.float32), np.asarray(b, np.float32))
            for p, (a, b) in lora_lib.factors(lora_params).items()}
    names = module_names(sorted(facs), model_config, family)
    tensors: dict[str, np.ndarray] = {}
    modules: list[str] = []

    def put(module: str, a: np.ndarray, b: np.ndarray, n_in: int, path: str) -> None:
        r = a.shape[-1]
        if a.ndim - 1 != n_in:
            raise ValueError(f"LoRA target {path!r}: its factors have {a.ndim - 1} input axes "
                             f"but {module} flattens {n_in}; the split cannot be exported")
        key = PEFT_PREFIX + module
        tensors[key + ".lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
        tensors[key + ".lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)
        modules.append(module)

    for path, (a, b) in sorted(facs.items()):
        for i, module, n_in in names[path]:
            if i is None and "{i}" in module:  # scanned: one module per layer
                for layer in range(a.shape[0]):
                    put(_runtime_name(module.format(i=layer), vlm), a[layer], b[layer], n_in,
                        path)
            else:
                put(module, a, b, n_in, path)
    return tensors, sorted(modules)


def export_adapter(lora_params: Mapping, lora_config: Mapping,
                   model_config: DecoderConfig | VLMConfig, family: str, out_dir: str, *,
                   base_model_name_or_path: str | None = None,
                   task_type: str | None = "default") -> str:
    """Writes a PEFT LoRA adapter directory for ``lora_params`` (the ``lora`` entry of our
    params, boxed or not) and returns ``out_dir``.

    family: the Hugging Face architecture ("LlamaForCausalLM", "LlavaForConditionalGeneration",
        ...) or our family key ("llama", "llava", ...).
    base_model_name_or_path: recorded in adapter_config.json (where the base model lives).
    task_type: PEFT task type; by default "CAUSAL_LM" for decoders, none for VLMs.
    """
    from safetensors.numpy import save_file

    c = lora_lib.get_config(lora_config)
    if not lora_lib.enabled(c):
        raise ValueError("lora.rank is 0: there is no adapter to export")
    if not isinstance(model_config, VLMConfig):
        family = dec.ARCHITECTURES.get(family, (family,))[0]
    tensors, modules = adapter_tensors(lora_params, model_config, family)
    ranks = {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")}
    if ranks != {int(c.rank)}:
        raise ValueError(f"the factors have rank {sorted(ranks)} but lora.rank={c.rank}")
    if task_type == "default":
        task_type = None if isinstance(model_config, VLMConfig) else "CAUSAL_LM"
    cfg: dict[str, Any] = {
        "peft_type": "LORA", "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
        "r": int(c.rank), "lora_alpha": float(c.alpha), "lora_dropout": float(c.dropout),
        "use_rslora": bool(c.rslora), "target_modules": modules, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None,
        "use_dora": False,
    }
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(cfg, f, indent=2)
    return out_dir
