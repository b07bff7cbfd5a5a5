"""Models: functional Flax (linen) modules with logically named parameters.

- ``masks``: ``make_attn_mask`` (prefix-LM / causal / image blocks / sliding windows) and
  ``AttnMask`` / ``attn_mask`` (the same masks with their structure, for fused kernels).
- ``attention``: the kernels behind ``layers.attention`` (``attention_impl``: xla, Pallas
  splash on TPU, cuDNN on GPU, auto).
- ``layers``: RMSNorm, rotary embeddings, attention, gated MLP.
- ``decoder``: ``DecoderConfig`` + ``Decoder`` for Llama/Mistral, Qwen2, Gemma 1/2/3; KV cache.
- ``vision``: ``VisionConfig`` + ``VisionEncoder`` (SigLIP / CLIP ViT, 2D and tubelet 3D).
- ``qwen_vision``: ``QwenVisionConfig`` + ``QwenVisionEncoder`` (Qwen2-VL / Qwen2.5-VL tower
  on a padded patch budget).
- ``vlm``: ``VLMConfig`` + ``VLM`` (vision encoder + projector + decoder).
"""
