"""Qwen2-VL / Qwen2.5-VL vision towers against transformers' PyTorch towers, both directions.

Tiny random towers (patch 4, so a 40x56 image is a 10x14 patch grid) on padded patch budgets
that hold several images of different sizes and a 3-frame volume per example.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf25  # noqa: E402
from transformers.models.qwen2_vl import modeling_qwen2_vl as hf2  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402
from transformers.vision_utils import get_vision_window_index  # noqa: E402

from medvl_jax.convert.qwen_vision import (load_hf_qwen_vision,  # noqa: E402
                                           qwen_vision_config_from_hf,
                                           qwen_vision_config_to_hf, qwen_vision_param_shapes,
                                           save_hf_qwen_vision)
from medvl_jax.data.qwen_processor import QwenImageProcessor  # noqa: E402
from medvl_jax.models.qwen_vision import (QwenVisionConfig, QwenVisionEncoder,  # noqa: E402
                                          window_order)
from medvl_jax.parallel.rules import activation_rules, logical_shardings  # noqa: E402

TOL = 1e-4
PROC = QwenImageProcessor(patch_size=4, min_pixels=8 * 8, max_pixels=8 * 8 * 64,
                          visual_tokens=64, max_visuals=3)


def _examples():
    """Row 0: two images of different sizes and a 3-frame float volume; row 1: one image."""
    rng = np.random.default_rng(0)
    img = lambda h, w: (rng.random((h, w, 3)) * 255).astype(np.uint8)  # noqa: E731
    volume = rng.random((3, 16, 24)).astype(np.float32)
    return [[img(40, 56), img(24, 16), volume], [img(48, 32)]], [[False, False, True], [False]]


def _build(variant: str, path: str):
    torch.manual_seed(0)
    if variant == "qwen2_vl":
        cfg = transformers.models.qwen2_vl.configuration_qwen2_vl.Qwen2VLVisionConfig(
            depth=2, embed_dim=32, hidden_size=48, num_heads=4, patch_size=4)
        model = hf2.Qwen2VisionTransformerPretrainedModel(cfg)
    else:
        cfg = transformers.models.qwen2_5_vl.configuration_qwen2_5_vl.Qwen2_5_VLVisionConfig(
            depth=3, hidden_size=32, intermediate_size=40, out_hidden_size=48, num_heads=4,
            patch_size=4, window_size=16, fullatt_block_indexes=[1])
        model = hf25.Qwen2_5_VisionTransformerPretrainedModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.eval().save_pretrained(path)
    return model


def _hf(model, batch, row: int):
    """transformers' tower on one example's real patches: (merged tokens, patch states)."""
    k = int(batch["num_visuals"][row])
    grid = batch["grid_thw"][row, :k].astype(np.int64)
    n = int(grid.prod(-1).sum())
    with torch.no_grad():
        out = model(torch.tensor(batch["patches"][row, :n]), grid_thw=torch.tensor(grid))
    hidden = out.last_hidden_state.numpy()
    if isinstance(model, hf25.Qwen2_5_VisionTransformerPretrainedModel):
        # Its patch states come out in window order; put them back in input order.
        index, _ = get_vision_window_index(torch.tensor(grid), 2, 16, 4)
        units = hidden.reshape(-1, 4, hidden.shape[-1])
        hidden = units[np.argsort(index.numpy())].reshape(hidden.shape)
    return out.pooler_output.numpy(), hidden


def _ours(config, params, batch, mesh=None):
    """Our tower; with a mesh, params sharded by their logical names and activations
    constrained by the rules table."""
    model = QwenVisionEncoder(config)
    args = [jnp.asarray(batch[k]) for k in ("patches", "positions", "segment_ids")]
    fn = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    if mesh is None:
        tokens, aux = fn(params, *args)
    else:
        boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))["params"]
        with activation_rules(mesh):
            params = jax.device_put(params, logical_shardings(boxed, mesh))
            qkv = params["layers"]["attn"]["qkv"]
            assert qkv.sharding.spec == P(None, "fsdp", None, "tensor", None)
            tokens, aux = fn(params, *args)
    return np.asarray(tokens), np.asarray(aux["token_mask"]), np.asarray(aux["hidden"])


def _compare(config, params, batch, refs, mesh=None):
    """Max abs differences over the real tokens and patch states of every row."""
    tokens, mask, hidden = _ours(config, params, batch, mesh)
    d_tok = d_hid = 0.0
    for row, (ref_tok, ref_hid) in enumerate(refs):
        n = len(ref_tok)
        assert mask[row, :n].all() and not mask[row, n:].any()
        assert not tokens[row, n:].any()  # padding comes out as zero tokens
        d_tok = max(d_tok, np.abs(tokens[row, :n] - ref_tok).max())
        d_hid = max(d_hid, np.abs(hidden[row, : 4 * n] - ref_hid).max())
    return d_tok, d_hid


@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_5_vl"])
def test_tower_parity_roundtrip(variant, tmp_path):
    model = _build(variant, str(tmp_path / "hf"))
    visuals, kinds = _examples()
    batch = PROC.batch(visuals, kinds)
    assert batch["patches"].shape == (2, 256, 96)
    refs = [_hf(model, batch, row) for row in range(2)]
    config, params = load_hf_qwen_vision(str(tmp_path / "hf"))
    d_tok, d_hid = _compare(config, params, batch, refs)
    print(f"{variant}: merged tokens {d_tok:.2e}, patch states {d_hid:.2e}")
    assert d_tok <= TOL and d_hid <= TOL

    # Scanned layers + remat, sharded over 8 devices (fsdp x tensor), give the same numbers;
    # export reloads in transformers.
    config_s, params_s = load_hf_qwen_vision(str(tmp_path / "hf"), scan_layers=True,
                                             remat_policy="full")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 2, 4), ("data", "fsdp", "tensor"))
    d_tok_s, _ = _compare(config_s, params_s, batch, refs, mesh)
    print(f"{variant} scanned, sharded: {d_tok_s:.2e}")
    assert d_tok_s <= TOL
    save_hf_qwen_vision(params_s, config_s, str(tmp_path / "out"))
    cls = type(model)
    back = cls.from_pretrained(str(tmp_path / "out")).eval()
    for row, (ref_tok, _) in enumerate(refs):
        assert np.abs(_hf(back, batch, row)[0] - ref_tok).max() <= 1e-6

    if variant == "qwen2_5_vl":
        # The first image (5x7 merged tokens) spans 3x4 windows of 2x2 tokens; attending over
        # whole images in every layer must not reproduce transformers.
        assert config.window_patches == 4 and batch["grid_thw"][0, 0].tolist() == [1, 10, 14]
        no_windows = dataclasses.replace(config, fullatt_block_indexes=(0, 1, 2))
        d_nw, _ = _compare(no_windows, params, batch, refs)
        print(f"{variant} without windows: {d_nw:.2e}")
        assert d_nw > 100 * TOL


def test_window_order_is_transformers_window_index():
    visuals, kinds = _examples()
    ex = PROC.example(visuals[0], kinds[0])
    config = QwenVisionConfig(depth=1, width=32, num_heads=4, mlp_dim=8, out_dim=8, patch_size=4,
                              window_size=16, fullatt_block_indexes=())
    order = np.asarray(window_order(jnp.asarray(ex["positions"][None]),
                                    jnp.asarray(ex["segment_ids"][None]), config))[0]
    grid = torch.tensor(ex["grid_thw"][: ex["num_visuals"]].astype(np.int64))
    index, _ = get_vision_window_index(grid, 2, 16, 4)
    real = len(index)
    np.testing.assert_array_equal(order[:real], index.numpy())
    assert sorted(order[real:]) == list(range(real, 64))  # padding after every window


def test_config_from_released_checkpoints():
    """vision_config dicts as the released 7B checkpoints write them (older field names)."""
    q2 = {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
          "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
          "temporal_patch_size": 2}
    q25 = {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
           "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
           "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
           "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
           "temporal_patch_size": 2, "model_type": "qwen2_5_vl"}
    assert qwen_vision_config_from_hf(q2) == QwenVisionConfig.qwen2_vl()
    assert qwen_vision_config_from_hf(q25) == QwenVisionConfig.qwen2_5_vl()
    for c in (QwenVisionConfig.qwen2_vl(), QwenVisionConfig.qwen2_5_vl()):
        assert qwen_vision_config_from_hf(qwen_vision_config_to_hf(c)) == c
    with pytest.raises(ValueError, match="model_type 'siglip'"):
        qwen_vision_config_from_hf({"model_type": "siglip"})


def test_every_param_is_logically_named():
    config = QwenVisionConfig(depth=2, width=32, num_heads=4, mlp_dim=40, out_dim=48,
                              patch_size=4, window_size=16, fullatt_block_indexes=(1,),
                              scan_layers=True)
    n = 4
    boxed = jax.eval_shape(lambda: QwenVisionEncoder(config).init(
        jax.random.key(0), jnp.zeros((1, n, config.patch_dim)), jnp.zeros((1, n, 3), jnp.int32),
        jnp.ones((1, n), jnp.int32)))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    specs = nn.get_partition_spec(boxed)
    assert specs["layers"]["attn"]["qkv"] == P("layers", "vision_embed", None, "vision_heads",
                                               "head_dim")
    assert specs["merger"]["fc2"] == P("vision_mlp", "embed")
    assert jax.tree.structure(qwen_vision_param_shapes(config)) == jax.tree.structure(
        nn.meta.unbox(boxed))

