"""Fine-tune configs from converted checkpoints: a tiny random PaliGemma, LLaVA and Gemma 3
model is written with transformers, converted with ``from_hf`` and trained for 2 steps with
``configs/<family>_sft.py:smoke --config.init_from=DIR``; the run must start from exactly the
converted weights and change them."""
import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from medvl_jax import config as config_lib  # noqa: E402
from medvl_jax.convert import checkpoint_io, from_hf  # noqa: E402
from medvl_jax.data import pipeline  # noqa: E402
from medvl_jax.tasks import base, policy  # noqa: E402
from medvl_jax.train import restore, run  # noqa: E402
from medvl_jax.tasks.sft import SFTTask  # noqa: E402
from medvl_jax.train import checkpoint as ckpt_lib  # noqa: E402
from medvl_jax.train import cli  # noqa: E402

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16)
RUN = ["--config.evals={}", "--config.train.progress=False"]


@pytest.fixture(scope="module")
def tokenizer():
    return pipeline.make_tokenizer("medsynth")  # Holds <image> and every template's markers.


def _hf_config(family: str, vocab: int, image_id: int):
    t = transformers
    text = dict(TEXT, vocab_size=vocab)
    if family == "paligemma":
        return t.PaliGemmaConfig(vision_config=dict(VISION, image_size=16, patch_size=8),
                                 text_config=dict(model_type="gemma", **text),
                                 image_token_index=image_id, projection_dim=32)
    if family == "llava":
        return t.LlavaConfig(vision_config=dict(model_type="clip_vision_model", image_size=16,
                                                patch_size=8, **VISION),
                             text_config=dict(model_type="llama", **text),
                             image_token_index=image_id)
    return t.Gemma3Config(vision_config=dict(VISION, image_size=32, patch_size=8,
                                             vision_use_head=False),
                          text_config=dict(text, sliding_window=8, query_pre_attn_scalar=16),
                          mm_tokens_per_image=4, image_token_index=image_id,
                          boi_token_index=5, eoi_token_index=6)


def _convert(family: str, tokenizer, tmp_path) -> str:
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(
        _hf_config(family, len(tokenizer), tokenizer.convert_tokens_to_ids("<image>")))
    hf_dir, ckpt = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    assert from_hf.main(["--hf_dir", hf_dir, "--out", ckpt]) == 0
    return ckpt


@pytest.mark.parametrize("family", ["paligemma", "llava", "medgemma"])
def test_finetune_starts_from_the_converted_weights(family, tokenizer, tmp_path):
    ckpt = _convert("gemma3" if family == "medgemma" else family, tokenizer, tmp_path)
    spec = f"configs/{family}_sft.py:{'stage1,smoke' if family == 'llava' else 'smoke'}"
    wd = str(tmp_path / "wd")
    assert cli.main(["--config", spec, "--workdir", wd, f"--config.init_from={ckpt}"] + RUN) == 0

    # The loss of step 0 (logged at step 1) is the converted model's loss on the first batch.
    overrides, _ = config_lib.parse_overrides([f"--config.init_from={ckpt}"] + RUN)
    config = policy.resolve_config(run.complete(config_lib.load_config(spec, overrides)),
                                   restore.load(ckpt))
    assert config.tokenizer == os.path.join(ckpt, "tokenizer")
    assert config.data.num_image_tokens == 4
    tok = pipeline.make_tokenizer(config.tokenizer)
    task = SFTTask(config, tok)
    _, params, _ = checkpoint_io.load_checkpoint(ckpt)
    batch = next(pipeline.build_iterator(config.data, tok, split="train", process_index=0,
                                         process_count=1))
    want = float(task.loss(params, batch, jax.random.key(0))[0])
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    np.testing.assert_allclose(losses[0], want, rtol=1e-5)

    # It trained: the saved params moved (stage 1 of LLaVA: the projector only).
    saved = ckpt_lib.CheckpointManager(os.path.join(wd, "checkpoints")).restore_state(2)
    flat_new = {"/".join(map(str, k)): v for k, v in
                jax.tree_util.tree_flatten_with_path(saved["params"])[0]}
    flat_old = {"/".join(map(str, k)): v for k, v in
                jax.tree_util.tree_flatten_with_path(params)[0]}
    assert sorted(flat_new) == sorted(flat_old)
    changed = {k for k in flat_old if not np.array_equal(np.asarray(flat_new[k]),
                                                         np.asarray(flat_old[k]))}
    assert changed and all(np.isfinite(np.asarray(v)).all() for v in flat_new.values())
    if family == "llava":
        assert all("projector" in k for k in changed)


def test_mismatches_are_named(tokenizer, tmp_path):
    ckpt = _convert("paligemma", tokenizer, tmp_path)
    ckpt_cfg = restore.load(ckpt).model_config
    import dataclasses

    other = dataclasses.replace(ckpt_cfg, text=dataclasses.replace(ckpt_cfg.text, num_layers=2))
    with pytest.raises(ValueError, match="model.text.num_layers=2 in the config but 1"):
        base.check_same_model(other, ckpt_cfg, ckpt)
    big = transformers.AutoTokenizer.from_pretrained(os.path.join(ckpt, "tokenizer"))
    big.add_tokens([f"extra{i}" for i in range(8)])
    with pytest.raises(ValueError, match=f"{len(big)} tokens but init_from=.* vocabulary of "
                                         f"{len(tokenizer)}"):
        policy.check_tokenizer(big, ckpt_cfg, ckpt)
    # A config without init_from and without a model section says what to do.
    with pytest.raises(ValueError, match="--config.init_from=DIR"):
        policy.resolve_config(config_lib.load_config("configs/paligemma_sft.py:smoke"), None)
