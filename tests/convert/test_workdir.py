"""A model trained here goes to PyTorch: training workdir -> to_hf -> transformers' LLaVA gives
the same logits; generate and to_hf accept a workdir; unexportable layouts fail with the reason."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from medvl_jax import config as config_lib  # noqa: E402
from medvl_jax import generate as generate_cli  # noqa: E402
from medvl_jax.convert import checkpoint_io, to_hf, workdir  # noqa: E402
from medvl_jax.convert import vlm as vlm_conv  # noqa: E402
from medvl_jax.data import chat, medsynth, pipeline  # noqa: E402
from medvl_jax.train import cli, restore  # noqa: E402

SMOKE = "configs/medsynth_sft.py:smoke"
# The main config's model merges 2x2 tokens (no Hugging Face counterpart); 16x16 patches
# without merging and the last layer's features are LLaVA's layout.
RUN = ["--config.model.vision.patch_size=16", "--config.model.vision.token_merge=1",
       "--config.model.vision.feature_layer=3", "--config.train.steps=3",
       "--config.train.checkpoint_every=3", "--config.evals={}",
       "--config.train.progress=False"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("run"))
    assert cli.main(["--config", SMOKE, "--workdir", wd] + RUN) == 0
    return wd


def test_restore_params_from_a_relative_workdir(trained, monkeypatch):
    _, _, absolute, _ = restore.restore_params(trained)
    monkeypatch.chdir(os.path.dirname(trained))
    _, _, relative, step = restore.restore_params(os.path.basename(trained))
    assert step == 3
    np.testing.assert_array_equal(np.asarray(relative["decoder"]["embedding"]),
                                  np.asarray(absolute["decoder"]["embedding"]))


def _inputs(config, vocab: int, rng):
    """A batch of 2 prompts with 2 images each (placeholders first), no padding."""
    n_img = 2 * 16
    tokens = rng.integers(20, vocab, size=(2, 70)).astype(np.int32)
    tokens[:, 1:1 + n_img] = config.image_token_id
    images = rng.normal(size=(2, 2, 64, 64, 1)).astype(np.float32)
    return tokens, images


def test_trained_workdir_exports_to_transformers_llava(trained, tmp_path):
    out = str(tmp_path / "hf")
    assert to_hf.main(["--checkpoint", trained, "--out", out]) == 0
    hf_cfg = json.load(open(f"{out}/config.json"))
    assert hf_cfg["architectures"] == ["LlavaForConditionalGeneration"]

    model, params, meta = checkpoint_io.load_checkpoint(f"{trained}/export/step_3")
    # The exported params are the trained ones, not a fresh init.
    _, _, raw, step = restore.restore_params(trained)
    assert step == 3
    np.testing.assert_array_equal(np.asarray(params["decoder"]["embedding"]),
                                  np.asarray(raw["decoder"]["embedding"]))

    tokens, images = _inputs(model.config, 200, np.random.default_rng(0))
    ones = np.ones(tokens.shape, np.int32)
    ours, _ = model.apply({"params": params}, tokens, images, input_mask=ones.astype(bool),
                          mask_ar=ones)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(
        out, attn_implementation="eager").eval()
    pixels = torch.from_numpy(images.reshape(4, 64, 64, 1).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        theirs = hf(input_ids=torch.from_numpy(tokens).long(), pixel_values=pixels).logits
    np.testing.assert_allclose(np.asarray(ours)[..., :theirs.shape[-1]], theirs.numpy(),
                               atol=1e-4)

    # The tokenizer travels with a chat template equal to the one used in training.
    tok = transformers.AutoTokenizer.from_pretrained(out)
    msgs = [{"role": "user", "content": "<image>\nIs the heart enlarged?"}]
    assert (tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            == chat.render(msgs, "gemma", add_generation_prompt=True))


def test_generate_on_a_workdir_prompts_like_training(trained, tmp_path):
    from PIL import Image

    rec = medsynth.MedSynthSource(medsynth.MedSynthConfig(kind="cxr", split="test",
                                                          num_studies=1, image_size=64))[0]
    path = str(tmp_path / "cxr.png")
    Image.fromarray(np.asarray(rec["image"])).save(path)
    text = generate_cli.run(trained, "Is the heart enlarged?", [path], max_new_tokens=6)

    # Reference: the training pipeline's own prompt and preprocessing, greedy by full forward
    # passes without a cache.
    config, task, raw, _ = restore.restore_params(trained)
    d = config.data
    feat = pipeline.Featurizer(d, task.tokenizer, train=False)
    image = feat.ops(pipeline.to_unit_range(np.asarray(rec["image"]), "cxr", d.ct_window), None)
    enc = chat.encode_prompt(task.tokenizer, [{"role": "user",
                                               "content": "<image>\nIs the heart enlarged?"}],
                             d.template, num_image_tokens=d.num_image_tokens, num_images=1)
    ids = list(enc.tokens)
    stop = task.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    params = task.model_params(raw) if hasattr(task, "model_params") else raw
    for _ in range(6):
        ones = np.ones((1, len(ids)), np.int32)
        logits, _ = task.policy.model.apply({"params": params}, np.asarray([ids]),
                                     np.asarray(image)[None, None],
                                     input_mask=ones.astype(bool), mask_ar=ones)
        ids.append(int(np.argmax(logits[0, -1])))
        if ids[-1] == stop:
            break
    new = ids[len(enc.tokens):]
    expected = task.tokenizer.decode([t for t in new if t != stop],
                                     skip_special_tokens=True).strip()
    assert text == expected


def test_unexportable_layouts_name_the_reason(tokenizer_len=300):
    from medvl_jax.models import from_config

    base = config_lib.load_config(SMOKE).model.to_dict()
    config = from_config.vlm_config(base, vocab_size=tokenizer_len, image_token_id=4)
    with pytest.raises(checkpoint_io.CheckpointError, match="token_merge=2 has no Hugging Face"):
        workdir.hf_family(config)
    base["vision"].update(token_merge=1)
    config = from_config.vlm_config(base, vocab_size=tokenizer_len, image_token_id=4)
    with pytest.raises(checkpoint_io.CheckpointError, match="feature_layer=3"):
        workdir.hf_family(config)
    base["vision"].update(feature_layer=3)
    assert workdir.hf_family(from_config.vlm_config(
        base, vocab_size=tokenizer_len, image_token_id=4)) == "LlavaForConditionalGeneration"


def test_llava_with_siglip_tower_and_last_layer_features(tmp_path):
    """HF LLaVA's vision_feature_layer=-1 is SigLIP's last layer *before* its post-norm."""
    t = transformers
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    text = dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    cfg = t.LlavaConfig(vision_config=vision, text_config=text, image_token_index=5,
                        vision_feature_layer=-1, vision_feature_select_strategy="full")
    torch.manual_seed(0)
    hf = t.LlavaForConditionalGeneration(cfg).eval()
    hf.save_pretrained(str(tmp_path))
    config, params = vlm_conv.load_hf_vlm(str(tmp_path))
    assert config.vision.feature_layer == 2
    rng = np.random.default_rng(1)
    tokens = rng.integers(10, 128, size=(1, 40)).astype(np.int32)
    tokens[0, 2:18] = 5
    images = rng.normal(size=(1, 1, 32, 32, 3)).astype(np.float32)
    from medvl_jax.models.vlm import VLM

    ones = np.ones(tokens.shape, np.int32)
    ours, _ = VLM(config).apply({"params": params}, tokens, images,
                                input_mask=ones.astype(bool), mask_ar=ones)
    with torch.no_grad():
        theirs = hf(input_ids=torch.from_numpy(tokens).long(),
                    pixel_values=torch.from_numpy(images[0].transpose(0, 3, 1, 2).copy())).logits
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-4)
