"""Tokenizers: load a Hugging Face tokenizer from disk, or train a small byte-level BPE.

Real checkpoints (Gemma, Llama, Qwen…) come with their own tokenizer, loaded from a local
directory with :func:`load_tokenizer`. Synthetic data (MedSynth) and tests use a small BPE
trained on the corpus itself (:func:`train_bpe_tokenizer`), cached on disk after the first use
(:func:`cached_tokenizer`).

The trained tokenizer:

* is byte-level, so any text (any script, emoji, control characters) encodes losslessly and
  ``<unk>`` is never produced;
* splits digits individually: counts, sizes and box coordinates tokenise digit by digit, so
  "12 mm" and "21 mm" share their tokens;
* has no post-processor: ``tokenizer(text)`` adds no ``<bos>``/``<eos>``; the chat templates in
  :mod:`medvl_jax.data.chat` place every marker themselves;
* is deterministic: the same texts give byte-identical vocabulary and merges, in any process
  (so every host of a multi-host job trains the same tokenizer).
"""
from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from typing import Callable, Iterable, Sequence

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from medvl_jax.data.errors import DataError

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
IMAGE = "<image>"

# The ids follow this order: <pad> = 0, <eos> = 1, <bos> = 2, <unk> = 3, <image> = 4, then the
# turn markers of every chat template in medvl_jax.data.chat, so one trained tokenizer serves
# all of them.
DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = (
    PAD, EOS, BOS, UNK, IMAGE,
    "<start_of_turn>", "<end_of_turn>",                       # gemma
    "<|im_start|>", "<|im_end|>",                             # chatml / qwen2
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",  # llama3
)
_REQUIRED = (PAD, EOS, BOS, UNK, IMAGE)
_BYTE_ALPHABET = 256


def load_tokenizer(path: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
    """Loads a Hugging Face tokenizer saved in the local directory ``path`` (never downloads).

    Raises :class:`DataError` (a ``ValueError``) naming ``path`` if the directory is missing,
    holds no tokenizer files, or cannot be read.
    """
    p = pathlib.Path(path).expanduser()
    if not p.is_dir():
        what = "is not a directory" if p.exists() else "does not exist"
        raise DataError(f"tokenizer directory {what}", where=str(p), reason="tokenizer")
    known = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
             "vocab.txt")
    if not any((p / name).is_file() for name in known):
        raise DataError(f"no tokenizer files in the directory (expected one of {list(known)})",
                        where=str(p), reason="tokenizer")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # Whatever the loader raises, name the directory.
        raise DataError(f"cannot load the tokenizer: {type(e).__name__}: {e}", where=str(p),
                        reason="tokenizer") from e


def train_bpe_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = 1024,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
) -> transformers.PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer on ``texts`` (see the module docstring for its rules).

    Args:
      texts: the training corpus, any iterable of strings (read once).
      vocab_size: the target vocabulary size, special tokens and the 256 byte symbols included.
        A small corpus may run out of merges first; the vocabulary is then smaller.
      special_tokens: added first, in this order (ids 0, 1, …). Must contain ``<pad>``,
        ``<eos>``, ``<bos>``, ``<unk>`` and ``<image>``; each is a single, never-split token.

    Returns:
      A ``PreTrainedTokenizerFast`` with pad/bos/eos/unk set and the other special tokens
      registered as extra special tokens.
    """
    special = list(special_tokens)
    missing = [t for t in _REQUIRED if t not in special]
    if missing:
        raise ValueError(f"special_tokens must contain {list(_REQUIRED)}; missing {missing}")
    if len(set(special)) != len(special):
        raise ValueError(f"special_tokens has duplicates: {special}")
    if vocab_size < _BYTE_ALPHABET + len(special):
        raise ValueError(f"vocab_size={vocab_size} is too small: the {_BYTE_ALPHABET} byte "
                         f"symbols and {len(special)} special tokens need "
                         f"{_BYTE_ALPHABET + len(special)}")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((str(t) for t in texts), trainer=trainer)
    return _wrap(tok, special)


def _wrap(tok: Tokenizer, special: list[str]) -> transformers.PreTrainedTokenizerFast:
    extra = [t for t in special if t not in (PAD, EOS, BOS, UNK)]
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=BOS, unk_token=UNK,
        extra_special_tokens=extra)


def default_cache_dir() -> pathlib.Path:
    """``$MEDVL_JAX_CACHE/tokenizers`` if that variable is set, else
    ``~/.cache/medvl_jax/tokenizers``."""
    root = os.environ.get("MEDVL_JAX_CACHE")
    base = pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "medvl_jax"
    return base.expanduser() / "tokenizers"


def cached_tokenizer(
    name: str,
    texts_fn: Callable[[], Iterable[str]],
    *,
    vocab_size: int = 1024,
    cache_dir: str | os.PathLike | None = None,
) -> transformers.PreTrainedTokenizerFast:
    """A BPE tokenizer trained on ``texts_fn()`` on first use, then loaded from disk.

    It lives in ``<cache_dir>/<name>-v<vocab_size>`` (``cache_dir`` defaults to
    :func:`default_cache_dir`). ``texts_fn`` is only called when that directory does not exist.
    The tokenizer is written to a temporary directory beside it and renamed into place, so a
    crash never leaves a half-written tokenizer, and processes racing to create it all end up
    loading the same complete copy. The cache key is the name and vocabulary size only: use a
    new name when the corpus changes.
    """
    if not name or os.sep in name or name.startswith("."):
        raise ValueError(f"cached_tokenizer name must be a plain file name, got {name!r}")
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / f"{name}-v{vocab_size}"
    if not target.exists():
        tok = train_bpe_tokenizer(texts_fn(), vocab_size=vocab_size)
        root.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
        try:
            tok.save_pretrained(str(tmp))
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.exists():  # Not a lost race: a real failure.
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(target)
