"""PaliGemma, LLaVA and Gemma 3 VLMs against transformers' PyTorch models, both directions."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from medvl_jax.convert import hf_io  # noqa: E402
from medvl_jax.convert.vlm import load_hf_vlm, save_hf_vlm  # noqa: E402
from medvl_jax.models.vlm import VLM  # noqa: E402

TOL = 1e-4
IMG_TOKEN = 255
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)
TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def _config(family: str):
    t = transformers
    if family == "paligemma":
        return t.PaliGemmaConfig(vision_config=VISION, text_config=dict(model_type="gemma", **TEXT),
                                 image_token_index=IMG_TOKEN, projection_dim=64)
    if family == "llava":
        return t.LlavaConfig(vision_config=dict(model_type="clip_vision_model", **VISION),
                             text_config=dict(model_type="llama", **TEXT),
                             image_token_index=IMG_TOKEN)
    return t.Gemma3Config(
        vision_config=dict(VISION, vision_use_head=False),
        text_config=dict(TEXT, sliding_window=6, query_pre_attn_scalar=16,
                         layer_types=["sliding_attention", "full_attention"]),
        mm_tokens_per_image=4, image_token_index=IMG_TOKEN, boi_token_index=253,
        eoi_token_index=254)


def _inputs(family: str):
    """Tokens with image runs, mask_ar, token_type_ids and right padding in row 1."""
    rng = np.random.default_rng(0)
    n_img, per = {"paligemma": (1, 16), "llava": (2, 16), "gemma3": (2, 4)}[family]
    rows, ar_rows, types = [], [], []
    for _ in range(2):
        text = list(rng.integers(0, 250, size=64))
        if family == "paligemma":  # [image][prompt] prefix, then a causal suffix
            seq = [IMG_TOKEN] * per + text
            ar = [0] * (per + 12) + [1] * (len(seq) - per - 12)
            tt = [0] * (per + 12) + [1] * (len(seq) - per - 12)
        else:
            seq = text[:5] + [IMG_TOKEN] * per + text[5:30] + [IMG_TOKEN] * per + text[30:]
            if n_img == 1:
                seq = text[:5] + [IMG_TOKEN] * per + text[5:]
            ar = [1] * len(seq)
            tt = [int(s == IMG_TOKEN) for s in seq]
        rows.append(seq)
        ar_rows.append(ar)
        types.append(tt)
    tokens = np.array(rows, np.int64)
    mask = np.ones_like(tokens, bool)
    mask[1, -6:] = False
    images = rng.normal(size=(2, n_img, 32, 32, 3)).astype(np.float32)
    return tokens, mask, np.array(ar_rows), np.array(types), images


def _hf_logits(model, family, tokens, mask, types, images):
    kw = dict(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
              pixel_values=torch.tensor(images.reshape(-1, 32, 32, 3).transpose(0, 3, 1, 2)))
    if family != "llava":
        kw["token_type_ids"] = torch.tensor(types)
    with torch.no_grad():
        return model(**kw).logits.numpy()


def _ours(config, params, tokens, mask, ar, images):
    fn = jax.jit(lambda p, t, x, m, a: VLM(config).apply({"params": p}, t, x, input_mask=m,
                                                         mask_ar=a)[0])
    return np.asarray(fn(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(images),
                         jnp.asarray(mask), jnp.asarray(ar)))


@pytest.mark.parametrize("family", ["paligemma", "llava", "gemma3"])
def test_vlm_roundtrip_parity(family, tmp_path):
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(
        _config(family), attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.eval().save_pretrained(str(tmp_path / "hf"))
    tokens, mask, ar, types, images = _inputs(family)
    ref = _hf_logits(model, family, tokens, mask, types, images)

    config, params = load_hf_vlm(str(tmp_path / "hf"))
    ours = _ours(config, params, tokens, mask, ar, images)
    diff = float(np.abs(ours - ref)[mask].max())
    print(f"{family}: HF->ours max abs diff {diff:.2e}")
    assert diff <= TOL

    save_hf_vlm(params, config, str(tmp_path / "out"), family=family)
    back = transformers.AutoModelForImageTextToText.from_pretrained(
        str(tmp_path / "out"), attn_implementation="eager").eval()
    again = _hf_logits(back, family, tokens, mask, types, images)
    diff_back = float(np.abs(again - ours)[mask].max())
    print(f"{family}: ours->HF max abs diff {diff_back:.2e}")
    assert diff_back <= TOL

    config_s, params_s = load_hf_vlm(str(tmp_path / "hf"), scan_layers=True)
    save_hf_vlm(params_s, config_s, str(tmp_path / "out_s"), family=family)
    a, b = (dict(hf_io.iter_checkpoint(str(tmp_path / d))) for d in ("out", "out_s"))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _saved(family: str, path: str):
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(
        _config(family), attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.eval().save_pretrained(path)
    return model


@pytest.mark.parametrize("family,field,value", [("paligemma", "mask_ar", None),
                                                ("gemma3", "image_bidirectional", False)])
def test_vlm_masks_are_exercised(family, field, value, tmp_path):
    """Without the prefix / per-image bidirectional mask the logits differ from PyTorch's."""
    import dataclasses

    model = _saved(family, str(tmp_path))
    tokens, mask, ar, types, images = _inputs(family)
    ref = _hf_logits(model, family, tokens, mask, types, images)
    config, params = load_hf_vlm(str(tmp_path))
    if field == "mask_ar":
        ar = np.ones_like(ar)
    else:
        config = dataclasses.replace(config, image_bidirectional=value)
    assert float(np.abs(_ours(config, params, tokens, mask, ar, images) - ref)[mask].max()) > 1e-3


def test_volume_input_with_inflated_tubelets(tmp_path):
    """A static 2-slice volume through an inflated tubelet tower equals the 2D model."""
    import dataclasses

    from medvl_jax.models.vision import inflate_patch_kernel

    model = _saved("paligemma", str(tmp_path))
    tokens, mask, ar, types, images = _inputs("paligemma")
    ref = _hf_logits(model, "paligemma", tokens, mask, types, images)
    config, params = load_hf_vlm(str(tmp_path))
    config3d = dataclasses.replace(config, vision=dataclasses.replace(config.vision, tubelet=2))
    patch = inflate_patch_kernel(jnp.asarray(params["vision"]["patch"]), 2)
    vision = dict(params["vision"], patch=patch)
    volumes = np.repeat(images[:, :, None], 2, axis=2)  # [B, N, D=2, H, W, C]
    got = _ours(config3d, dict(params, vision=vision), tokens, mask, ar, volumes)
    assert float(np.abs(got - ref)[mask].max()) <= TOL
