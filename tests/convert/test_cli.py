"""CLI round trips: HF dir -> from_hf -> to_hf -> ``from_pretrained``, and from_hf -> generate."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from medvl_jax import generate as generate_cli  # noqa: E402
from medvl_jax.convert import checkpoint_io, from_hf, to_hf  # noqa: E402

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"] + [f"w{i}" for i in range(59)]


def _tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                                bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


def _hf_llama(path: str):
    cfg = transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=2, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    model.eval().save_pretrained(path)
    tokenizer = _tokenizer()
    tokenizer.save_pretrained(path)
    return model, tokenizer


def test_from_hf_to_hf_roundtrip_and_generate(tmp_path, capsys):
    hf_dir, ckpt, out = (str(tmp_path / d) for d in ("hf", "ckpt", "out"))
    model, tokenizer = _hf_llama(hf_dir)
    assert from_hf.main(["--hf_dir", hf_dir, "--out", ckpt]) == 0
    meta = json.load(open(f"{ckpt}/medvl_meta.json"))
    assert meta["schema_version"] == 1 and meta["family"] == "LlamaForCausalLM"
    assert meta["hf_config"]["hidden_size"] == 32
    assert (tmp_path / "ckpt" / "tokenizer" / "tokenizer.json").exists()

    assert to_hf.main(["--checkpoint", ckpt, "--out", out]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    ids = torch.tensor([[1, 7, 9, 30, 41, 12, 5, 60]])
    with torch.no_grad():
        np.testing.assert_allclose(back(ids).logits.numpy(), model(ids).logits.numpy(),
                                   atol=1e-5)
    assert transformers.AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("w3") == 8

    prompt = "w1 w7 w22 w5 w40"
    capsys.readouterr()
    assert generate_cli.main(["--checkpoint", ckpt, "--prompt", prompt,
                              "--max_new_tokens", "12"]) == 0
    printed = capsys.readouterr().out.strip()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=12, eos_token_id=2, pad_token_id=0)
    expected = tokenizer.decode(ref[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    assert printed == expected and expected


def test_cli_errors_name_the_problem(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    assert from_hf.main(["--hf_dir", str(tmp_path / "hf"), "--out", str(tmp_path / "o")]) == 1
    assert "missing config.json" in capsys.readouterr().err
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"architectures": ["FooLM"]}))
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
    assert from_hf.main(["--hf_dir", str(tmp_path / "hf"), "--out", str(tmp_path / "o")]) == 1
    assert "unknown architecture ['FooLM']" in capsys.readouterr().err
    with pytest.raises(checkpoint_io.CheckpointError, match="no medvl_meta.json"):
        checkpoint_io.load_checkpoint(str(tmp_path / "hf"))


def test_generate_cli_with_png_for_llava(tmp_path, capsys):
    from PIL import Image as PILImage

    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8)
    text = dict(model_type="llama", vocab_size=len(WORDS), hidden_size=32, intermediate_size=64,
                num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                max_position_embeddings=64)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=4)
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    hf_dir, ckpt = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    model.eval().save_pretrained(hf_dir)
    tokenizer = _tokenizer()
    tokenizer.save_pretrained(hf_dir)
    gray = np.random.default_rng(0).integers(0, 256, size=(16, 16)).astype(np.uint8)
    PILImage.fromarray(gray).save(tmp_path / "x.png")
    assert from_hf.main(["--hf_dir", hf_dir, "--out", ckpt]) == 0
    capsys.readouterr()
    assert generate_cli.main(["--checkpoint", ckpt, "--prompt", "w9 w10 w11", "--image",
                              str(tmp_path / "x.png"), "--max_new_tokens", "10"]) == 0
    printed = capsys.readouterr().out.strip()

    # Reference: 4 image tokens (2x2 patches, class token dropped) then the text; pixels scaled
    # to [0, 1] by min/max, replicated to RGB, normalised with mean = std = 0.5.
    x = gray.astype(np.float32)
    x = (x - x.min()) / (x.max() - x.min())
    pix = torch.tensor(np.repeat(((x - 0.5) / 0.5)[None], 3, axis=0)[None])
    ids = torch.tensor([[4] * 4 + tokenizer("w9 w10 w11")["input_ids"]])
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), pixel_values=pix,
                             do_sample=False, max_new_tokens=10, eos_token_id=2, pad_token_id=0)
    expected = tokenizer.decode(ref[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    assert printed == expected and expected
