"""``python -m medvl_jax.data.inspect``: examples printed; a bad record stops it with one line
naming its ``file:line``, or is skipped, counted and listed with ``data.skip_bad_examples``."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medvl_jax.data import inspect
from medvl_jax.data import tokenizer as tok

TEXTS = ["Is there a pleural effusion?", "Yes.", "No.", "Describe the image.",
         "Normal chest radiograph."]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tok.train_bpe_tokenizer(TEXTS * 20, vocab_size=300).save_pretrained(str(path))
    return str(path)


def _setup(tmp_path, tokenizer_dir) -> tuple[str, str]:
    """A JSONL file of three records (the second names a missing image) and a config file
    reading it; returns (config path, JSONL path)."""
    Image.fromarray((np.arange(20 * 24) % 251).astype(np.uint8).reshape(20, 24)).save(
        tmp_path / "img.png")
    records = [{"id": f"r{i}", "image": "missing.png" if i == 1 else "img.png",
                "conversations": [{"from": "human", "value": "<image>\nIs there a pleural "
                                                            "effusion?"},
                                  {"from": "gpt", "value": "Yes."}]} for i in range(3)]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    config = tmp_path / "inspect_config.py"
    config.write_text(
        "import ml_collections\n"
        "from medvl_jax.data import pipeline\n\n"
        "def get_config():\n"
        "    c = ml_collections.ConfigDict()\n"
        f"    c.tokenizer = {tokenizer_dir!r}\n"
        "    c.data = pipeline.default_config()\n"
        f"    c.data.sources = {{'q': {{'kind': 'json', 'weight': 1.0, 'path': {str(data)!r}}}}}\n"
        "    c.data.image_size = 16\n"
        "    c.data.num_image_tokens = 4\n"
        "    c.data.max_length = 48\n"
        "    return c\n")
    return str(config), str(data)


def test_bad_record_is_one_line_naming_it(tmp_path, capsys, tokenizer_dir):
    config, data = _setup(tmp_path, tokenizer_dir)
    out = str(tmp_path / "grid.png")
    assert inspect.main(["--config", config, "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{data}:2" in err and "missing.png" in err


def test_skip_bad_examples_counts_and_lists_them(tmp_path, capsys, tokenizer_dir):
    config, data = _setup(tmp_path, tokenizer_dir)
    out = tmp_path / "grid.png"
    assert inspect.main(["--config", config, "--out", str(out),
                         "--config.data.skip_bad_examples=True"]) == 0
    printed = capsys.readouterr().out
    assert "-- r0 " in printed and "-- r2 " in printed and "-- r1 " not in printed
    assert "skipped 1 bad record(s)" in printed
    listed = [line for line in printed.splitlines() if f"{data}:2" in line]
    assert len(listed) == 1 and "missing.png" in listed[0]
    assert Image.open(out).size == (4 * 16, 16)  # The two good images, one row of the grid.


def test_num_counts_shown_examples_past_skipped_ones(tmp_path, capsys, tokenizer_dir):
    config, _ = _setup(tmp_path, tokenizer_dir)
    assert inspect.main(["--config", config, "--out", str(tmp_path / "g.png"), "--num", "2",
                         "--config.data.skip_bad_examples=True"]) == 0
    printed = capsys.readouterr().out
    assert "-- r0 " in printed and "-- r2 " in printed


def test_bad_config_value_is_one_line(tmp_path, capsys, tokenizer_dir):
    config, _ = _setup(tmp_path, tokenizer_dir)
    assert inspect.main(["--config", config, "--config.data.image_size=0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.image_size=0" in err
