"""CLI round trips: HF dir -> from_hf -> to_hf -> ``from_pretrained``, and from_hf -> generate;
corrupt, truncated and unsupported checkpoints reported on one line with exit code 2."""
from __future__ import annotations

import json
import os
import struct
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from medvl_jax.convert import checkpoint_io, from_hf, hf_io, to_hf

try:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from medvl_jax import generate as generate_cli
except ImportError:  # The round trips need them; the error tests below do not.
    torch = transformers = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch and transformers")

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


@needs_torch
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


def _one_line_error(capsys) -> str:
    """The CLI's stderr: exactly one ``error:`` line (no traceback); returns it."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_cli_errors_name_the_problem(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    assert from_hf.main(["--hf_dir", str(tmp_path / "hf"), "--out", str(tmp_path / "o")]) == 2
    assert "missing config.json" in _one_line_error(capsys)
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"architectures": ["FooLM"]}))
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
    assert from_hf.main(["--hf_dir", str(tmp_path / "hf"), "--out", str(tmp_path / "o")]) == 2
    assert "unknown architecture ['FooLM']" in _one_line_error(capsys)
    with pytest.raises(checkpoint_io.CheckpointError, match="no medvl_meta.json"):
        checkpoint_io.load_checkpoint(str(tmp_path / "hf"))
    assert to_hf.main(["--checkpoint", str(tmp_path / "hf"), "--out", str(tmp_path / "o")]) == 2
    assert "no medvl_meta.json" in _one_line_error(capsys)
    assert to_hf.main(["--checkpoint", str(tmp_path / "hf"), "--out", str(tmp_path / "o"),
                       "--verbose"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("error: ")


# A tiny Llama config.json: the architecture is supported, so the reader gets to the weights.
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 8,
         "hidden_size": 4, "intermediate_size": 8, "num_attention_heads": 1,
         "num_key_value_heads": 1, "num_hidden_layers": 1}


def _hf_dir(tmp_path, config: dict) -> str:
    """A directory with ``config`` and a real safetensors file written by the library."""
    d = tmp_path / "hf"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    save_file({"model.embed_tokens.weight": rng.normal(size=(8, 4)).astype(np.float32),
               "model.norm.weight": np.ones(4, np.float32)}, str(d / "model.safetensors"))
    return str(d)


def test_reader_matches_the_safetensors_library(tmp_path):
    path = os.path.join(_hf_dir(tmp_path, LLAMA), "model.safetensors")
    from safetensors.numpy import load_file

    want = load_file(path)
    got = dict(hf_io.iter_safetensors(path))
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def _corrupt(path: str, how: str) -> None:
    data = bytearray(open(path, "rb").read())
    n = struct.unpack("<Q", data[:8])[0]
    if how == "huge_header_length":
        data[:8] = struct.pack("<Q", 2**60)
    elif how == "header_longer_than_file":
        data[:8] = struct.pack("<Q", len(data))
    elif how == "truncated":
        del data[-10:]
    elif how == "shorter_than_8_bytes":
        del data[5:]
    elif how == "garbage_header":
        data[8:8 + n] = b"\xff" * n
    elif how == "wrong_shape":  # The header claims more elements than its byte range holds.
        header = json.loads(bytes(data[8:8 + n]))
        header["model.norm.weight"]["shape"] = [5]
        blob = json.dumps(header, separators=(",", ":")).encode().ljust(n)
        assert len(blob) == n
        data[8:8 + n] = blob
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("how, message", [
    ("huge_header_length", "header length 1152921504606846976 exceeds the file's"),
    ("header_longer_than_file", "exceeds the file's"),
    ("truncated", "the file holds only"),
    ("shorter_than_8_bytes", "5 bytes, too short for a safetensors file"),
    ("garbage_header", "header is not valid JSON"),
    ("wrong_shape", "hold 16 bytes but F32 [5] needs 20"),
])
def test_corrupt_safetensors_are_named_on_one_line(tmp_path, capsys, how, message):
    hf_dir = _hf_dir(tmp_path, LLAMA)
    path = os.path.join(hf_dir, "model.safetensors")
    _corrupt(path, how)
    start = time.perf_counter()
    with pytest.raises(hf_io.CheckpointFileError) as info:
        list(hf_io.iter_safetensors(path))
    assert info.value.path == path and str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)
    out = str(tmp_path / "out")
    assert from_hf.main(["--hf_dir", hf_dir, "--out", out]) == 2
    err = _one_line_error(capsys)
    assert path in err and message in err
    assert time.perf_counter() - start < 2  # No attempt to read or allocate 2**60 bytes.
    assert not os.path.exists(out)  # Refused before anything was written.


def test_truncated_file_names_the_file_and_tensor(tmp_path, capsys):
    hf_dir = _hf_dir(tmp_path, LLAMA)
    path = os.path.join(hf_dir, "model.safetensors")
    _corrupt(path, "truncated")
    assert from_hf.main(["--hf_dir", hf_dir, "--out", str(tmp_path / "out")]) == 2
    err = _one_line_error(capsys)
    assert path in err and "'model.norm.weight'" in err and "truncated" in err


def test_sharded_index_naming_a_missing_shard(tmp_path, capsys):
    hf_dir = _hf_dir(tmp_path, LLAMA)
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"weight_map": {"a": "model-00001-of-00002.safetensors"}}, f)
    assert from_hf.main(["--hf_dir", hf_dir, "--out", str(tmp_path / "out")]) == 2
    assert "model-00001-of-00002.safetensors: listed in" in _one_line_error(capsys)
    open(index, "w").write("{not json")
    assert from_hf.main(["--hf_dir", hf_dir, "--out", str(tmp_path / "out")]) == 2
    assert f"{index}: not valid JSON" in _one_line_error(capsys)


@pytest.mark.parametrize("config, message", [
    ({"model_type": "mamba"},
     "unknown architecture None (model_type 'mamba'); supported architectures: "),
    ({"model_type": "llama"}, "for model_type 'llama' add \"architectures\": "
                              "[\"LlamaForCausalLM\"]"),
    ({"architectures": ["LlavaForConditionalGeneration"], "text_config": {"model_type": "phi3"},
      "vision_config": {"model_type": "clip_vision_model"}, "image_token_index": 4},
     "unsupported text_config.model_type 'phi3'; supported: gemma, gemma2, gemma3_text, "
     "llama, mistral, qwen2"),
    ({"architectures": ["LlavaForConditionalGeneration"], "text_config": LLAMA,
      "vision_config": {"model_type": "siglip2_vision_model"}, "image_token_index": 4},
     "unsupported vision model_type 'siglip2_vision_model'; supported: siglip_vision_model, "
     "clip_vision_model"),
    ({"architectures": ["LlamaForCausalLM"], "vocab_size": 8},
     "config.json: missing field 'num_attention_heads'"),
])
def test_unsupported_configs_name_the_supported_ones(tmp_path, capsys, config, message):
    hf_dir = _hf_dir(tmp_path, config)
    assert from_hf.main(["--hf_dir", hf_dir, "--out", str(tmp_path / "out")]) == 2
    err = _one_line_error(capsys)
    assert message in err and os.path.join(hf_dir, "config.json") in err
    if config.get("model_type") == "mamba":
        assert "llama" in err and "paligemma" in err and "bert" in err  # The model types.


@needs_torch
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
