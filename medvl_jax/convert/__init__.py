"""Hugging Face <-> medvl_jax checkpoint conversion, one declarative mapping per family.

- ``mapping``: the rule engine (both directions, strict key/shape checking).
- ``hf_io``: streaming safetensors reader/writer, sharding + index json, side files.
- ``decoders``: Llama, Mistral, Qwen2, Gemma, Gemma 2, Gemma 3 causal LMs.
- ``vision``: SiglipVisionModel, CLIPVisionModel.
- ``vlm``: PaliGemma, LLaVA, Gemma 3 image-text-to-text models.
"""
