"""Model sections (``config.model``) of published architectures, at their real sizes.

Each function returns the dict a config's ``model`` section takes (the fields of
:class:`~medvl_jax.models.vlm.VLMConfig` / :class:`~medvl_jax.models.two_tower.TwoTowerConfig`
and their towers), with the sizes of the released checkpoints' ``config.json``. A run that
starts from a converted checkpoint takes its model from the checkpoint instead (an empty
``model`` section); these are for planning (``python -m medvl_jax.plan``), for training an
architecture from scratch, and for checking a converted checkpoint against what it should be.
``scan_layers``/``remat_policy`` are runtime choices, set here to what a pod run wants.
"""
from __future__ import annotations


def _runtime(scan: bool, remat: str) -> dict:
    return {"scan_layers": scan, "remat_policy": remat}


def siglip_so400m(image_size: int, *, scan: bool = True, remat: str = "none",
                  use_head: bool = False) -> dict:
    """SigLIP So400m/14 vision tower (400M): width 1152, 27 layers, 16 heads, MLP 4304."""
    return dict(layout="siglip", image_size=image_size, patch_size=14, num_channels=3,
                width=1152, depth=27, num_heads=16, mlp_dim=4304, activation="gelu_tanh",
                use_head=use_head, **_runtime(scan, remat))


def gemma3_4b_vlm(image_size: int = 896, *, scan: bool = True, remat: str = "none") -> dict:
    """Gemma 3 4B + SigLIP-400M (MedGemma 4B): 34 decoder layers (five sliding-window layers
    of 1024 tokens, then one global), 256 image tokens per 896x896 image."""
    layer_types = tuple(("local",) * 5 + ("global",)) * 5 + ("local",) * 4
    return dict(
        vision=siglip_so400m(image_size, scan=scan, remat=remat),
        text=dict(vocab_size=262208, embed_dim=2560, num_layers=34, num_heads=8,
                  num_kv_heads=4, head_dim=256, mlp_dim=10240, activation="gelu_tanh",
                  norm_plus_one=True, rope_theta=1_000_000.0, rope_scaling="linear",
                  rope_factor=8.0, rope_local_theta=10_000.0, tie_embeddings=True,
                  scale_embeddings=True, sliding_window=1024, layer_types=layer_types,
                  qk_norm=True, query_pre_attn_scalar=256.0, sandwich_norms=True,
                  **_runtime(scan, remat)),
        projector="gemma3", mm_tokens_per_image=256, image_bidirectional=True)


def paligemma_3b_vlm(image_size: int = 448, *, scan: bool = True, remat: str = "none") -> dict:
    """PaliGemma 3B: Gemma 2B (18 layers, multi-query) + SigLIP-400M, linear projector,
    prefix-LM; (image_size / 14)^2 image tokens (1024 at 448)."""
    return dict(
        vision=siglip_so400m(image_size, scan=scan, remat=remat),
        text=dict(vocab_size=257216, embed_dim=2048, num_layers=18, num_heads=8,
                  num_kv_heads=1, head_dim=256, mlp_dim=16384, activation="gelu_tanh",
                  norm_plus_one=True, tie_embeddings=True, scale_embeddings=True,
                  **_runtime(scan, remat)),
        projector="linear", position_offset=1)


def llava_7b_vlm(*, scan: bool = True, remat: str = "none") -> dict:
    """LLaVA-1.5 7B: Vicuna-7B (Llama 2 7B) + CLIP ViT-L/14 at 336 (576 image tokens, the
    penultimate layer's, class token dropped), two-layer GELU projector."""
    return dict(
        vision=dict(layout="clip", image_size=336, patch_size=14, num_channels=3, width=1024,
                    depth=24, num_heads=16, mlp_dim=4096, activation="quick_gelu",
                    feature_layer=23, norm_eps=1e-5, **_runtime(scan, remat)),
        text=dict(vocab_size=32064, embed_dim=4096, num_layers=32, num_heads=32,
                  num_kv_heads=32, head_dim=128, mlp_dim=11008, activation="silu",
                  norm_eps=1e-5, tie_embeddings=False, **_runtime(scan, remat)),
        projector="mlp2x_gelu", drop_cls=True)


def medsiglip_448(*, scan: bool = True, remat: str = "none") -> dict:
    """MedSigLIP 448 (SigLIP So400m/14 at 448 in both towers: 27-layer 1152-wide text tower
    of 64 tokens, MAP-pooled image head, sigmoid logits)."""
    return dict(
        vision=siglip_so400m(448, scan=scan, remat=remat, use_head=True),
        text=dict(layout="siglip", vocab_size=32000, max_len=64, width=1152, depth=27,
                  num_heads=16, mlp_dim=4304, activation="gelu_tanh", pooler=True,
                  **_runtime(scan, remat)),
        embed_dim=None, image_pool="pooled", text_pool="pooled", logit_init="siglip")
