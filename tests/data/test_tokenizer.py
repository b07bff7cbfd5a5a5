"""Tokenizer training, caching and loading (medvl_jax.data.tokenizer)."""
import concurrent.futures
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import pytest
import transformers

from medvl_jax.data import tokenizer as tok
from medvl_jax.data.errors import DataError

SENTENCES = [
    "The heart size is normal. No pleural effusion or pneumothorax.",
    "There is a 12 mm nodule in the right upper lobe.",
    "Mild cardiomegaly with small bilateral pleural effusions.",
    "Impression: no acute cardiopulmonary process.",
    "Findings: the lungs are clear; the mediastinal contours are within normal limits.",
    "A 3.5 cm mass in the left lower lobe, box at (104, 233, 187, 301).",
    "Degenerative changes of the thoracic spine.",
    "Endotracheal tube terminates 4 cm above the carina.",
    "Right-sided central venous catheter with its tip in the superior vena cava.",
    "Patchy opacity at the left lung base, which may represent atelectasis or pneumonia.",
]


def corpus(n: int = 30) -> list[str]:
    """Radiology-like sentences with varied numbers, so number merges would be frequent."""
    out = []
    for i in range(n):
        for j, s in enumerate(SENTENCES):
            out.append(f"{s} Measured {10 + (7 * i + j) % 90} mm, count {i * 13 % 100}.")
    return out


@pytest.fixture(scope="module")
def trained():
    return tok.train_bpe_tokenizer(corpus(), vocab_size=400)


def test_special_tokens_are_single_ids_and_set(trained):
    assert (trained.pad_token, trained.eos_token, trained.bos_token, trained.unk_token) == (
        "<pad>", "<eos>", "<bos>", "<unk>")
    # Ids follow DEFAULT_SPECIAL_TOKENS' order.
    for i, t in enumerate(tok.DEFAULT_SPECIAL_TOKENS):
        assert trained.convert_tokens_to_ids(t) == i
    assert trained.pad_token_id == 0 and trained.eos_token_id == 1 and trained.bos_token_id == 2
    text = "".join(tok.DEFAULT_SPECIAL_TOKENS)
    assert trained(text, add_special_tokens=False)["input_ids"] == list(
        range(len(tok.DEFAULT_SPECIAL_TOKENS)))
    # No post-processor: nothing is added around plain text.
    plain = trained("normal heart")["input_ids"]
    assert plain == trained("normal heart", add_special_tokens=False)["input_ids"]


def test_vocab_size_reached(trained):
    assert len(trained) == 400


def test_digits_split_individually(trained):
    pieces = trained.tokenize("A 12345 mm nodule at (104, 233, 187, 301), 90 mm")
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert "".join(digit_pieces) == "12345104233187301" "90"
    assert all(len(p) == 1 for p in digit_pieces)
    # No learned token contains a digit together with anything else.
    for t in trained.get_vocab():
        if any(c.isdigit() for c in t):
            assert len(t) == 1, t


@pytest.mark.parametrize("text", [
    "Größe 12€ — 肺結節 🫁 naïve\tcafé\r\nZeile\u00a0zwei \x00\x7f",
    "  leading and trailing spaces  ",
    "Ελληνικά και العربية",
])
def test_byte_level_roundtrip_of_unseen_text(trained, text):
    ids = trained(text, add_special_tokens=False)["input_ids"]
    assert trained.unk_token_id not in ids
    assert trained.decode(ids) == text


def test_training_is_deterministic(trained, tmp_path):
    again = tok.train_bpe_tokenizer(corpus(), vocab_size=400)
    trained.save_pretrained(tmp_path / "a")
    again.save_pretrained(tmp_path / "b")
    a = (tmp_path / "a" / "tokenizer.json").read_bytes()
    b = (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert a == b
    assert json.loads(a)["model"]["merges"]  # Something was learned.


def test_training_is_deterministic_across_processes(trained):
    # A fresh interpreter has different hash seeds (Python and Rust): the result must not care.
    code = (
        "import hashlib, sys; sys.path.insert(0, %r); "
        "from tests.data.test_tokenizer import corpus; "
        "from medvl_jax.data import tokenizer as tok; "
        "t = tok.train_bpe_tokenizer(corpus(), vocab_size=400); "
        "print(hashlib.sha256(t.backend_tokenizer.to_str().encode()).hexdigest())"
    ) % str(pathlib.Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True).stdout.split()[-1]
    assert out == hashlib.sha256(trained.backend_tokenizer.to_str().encode()).hexdigest()


def test_save_load_roundtrip(trained, tmp_path):
    trained.save_pretrained(tmp_path)
    loaded = tok.load_tokenizer(tmp_path)
    assert isinstance(loaded, transformers.PreTrainedTokenizerBase)
    assert loaded.get_vocab() == trained.get_vocab()
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id,
            loaded.unk_token_id) == (0, 2, 1, 3)
    for text in SENTENCES + ["<start_of_turn>user\n<image> 12 mm<end_of_turn>"]:
        assert (loaded(text, add_special_tokens=False)["input_ids"]
                == trained(text, add_special_tokens=False)["input_ids"])


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as e:
        tok.load_tokenizer(missing)
    assert str(missing) in str(e.value) and e.value.reason == "tokenizer"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no tokenizer files") as e:
        tok.load_tokenizer(empty)
    assert str(empty) in str(e.value)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{ not json")
    (broken / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    with pytest.raises(ValueError, match="cannot load") as e:
        tok.load_tokenizer(broken)
    assert str(broken) in str(e.value)


def test_train_argument_errors():
    with pytest.raises(ValueError, match="missing"):
        tok.train_bpe_tokenizer(SENTENCES, vocab_size=400, special_tokens=["<pad>", "<eos>"])
    with pytest.raises(ValueError, match="too small"):
        tok.train_bpe_tokenizer(SENTENCES, vocab_size=260)


class CountingCorpus:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return iter(corpus(10))


def test_cached_tokenizer_trains_once(tmp_path):
    texts = CountingCorpus()
    first = tok.cached_tokenizer("unit", texts, vocab_size=300, cache_dir=tmp_path)
    assert texts.calls == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unit-v300"]  # No temp dirs left.
    second = tok.cached_tokenizer("unit", texts, vocab_size=300, cache_dir=tmp_path)
    assert texts.calls == 1
    assert second.get_vocab() == first.get_vocab()
    # Equal to a tokenizer trained directly on the same texts.
    direct = tok.train_bpe_tokenizer(corpus(10), vocab_size=300)
    assert second.get_vocab() == direct.get_vocab()
    # Another vocabulary size is another cache entry.
    tok.cached_tokenizer("unit", texts, vocab_size=320, cache_dir=tmp_path)
    assert texts.calls == 2


def test_cached_tokenizer_default_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVL_JAX_CACHE", str(tmp_path))
    tok.cached_tokenizer("envtest", CountingCorpus(), vocab_size=300)
    assert (tmp_path / "tokenizers" / "envtest-v300" / "tokenizer.json").is_file()


def test_cached_tokenizer_crash_leaves_nothing(tmp_path):
    def failing():
        yield "some text"
        raise RuntimeError("corpus generator crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        tok.cached_tokenizer("crash", failing, vocab_size=300, cache_dir=tmp_path)
    assert not (tmp_path / "crash-v300").exists()
    # A stale temp dir (e.g. from a killed process) does not count as a cached tokenizer.
    stale = tmp_path / ".crash-v300.tmp-dead"
    stale.mkdir()
    (stale / "tokenizer_config.json").write_text("{}")
    texts = CountingCorpus()
    t = tok.cached_tokenizer("crash", texts, vocab_size=300, cache_dir=tmp_path)
    assert texts.calls == 1 and len(t) == 300


def test_cached_tokenizer_rejects_path_names(tmp_path):
    with pytest.raises(ValueError, match="plain file name"):
        tok.cached_tokenizer("a/b", CountingCorpus(), cache_dir=tmp_path)


def test_cached_tokenizer_concurrent_first_use(tmp_path):
    # Several workers racing to create the same entry all get the same complete tokenizer.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(
            lambda _: tok.cached_tokenizer("race", CountingCorpus(), vocab_size=300,
                                           cache_dir=tmp_path), range(4)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race-v300"]
    assert all(r.get_vocab() == results[0].get_vocab() for r in results)
