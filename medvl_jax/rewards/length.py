"""Length penalty counted in tokens (never characters).

The soft overlong penalty of DAPO (Yu et al. 2025): 0 up to ``max_tokens - buffer_tokens``,
then falling linearly to -1 at ``max_tokens``, and -1 beyond. ``buffer_tokens = 0`` makes it a
hard penalty (-1 only for completions longer than ``max_tokens``, typically truncated ones).
"""
from __future__ import annotations

import functools
from typing import Sequence


def length_penalty(prompts: list[str], completions: list[str], *,
                   completion_lengths: Sequence[int] | None = None, max_tokens: int,
                   buffer_tokens: int = 0, **_) -> list[float]:
    """Penalty in [-1, 0] per completion from its length in tokens (``completion_lengths``)."""
    del prompts
    if completion_lengths is None:
        raise ValueError("length_penalty needs completion_lengths (tokens per completion); "
                         "lengths are counted in tokens, not characters")
    if len(completion_lengths) != len(completions):
        raise ValueError(f"completion_lengths has {len(completion_lengths)} entries for "
                         f"{len(completions)} completions")
    if max_tokens <= 0 or not 0 <= buffer_tokens <= max_tokens:
        raise ValueError(f"length_penalty needs max_tokens > 0 and 0 <= buffer_tokens <= "
                         f"max_tokens, got max_tokens={max_tokens}, buffer_tokens={buffer_tokens}")
    out = []
    start = max_tokens - buffer_tokens
    for n in completion_lengths:
        n = int(n)
        if n <= start:
            out.append(0.0)
        elif n > max_tokens or buffer_tokens == 0:
            out.append(-1.0)
        else:
            out.append(-(n - start) / buffer_tokens)
    return out


def make_length_penalty(max_tokens: int, buffer_tokens: int = 0):
    """:func:`length_penalty` with its limits fixed (a reward function of the usual signature)."""
    fn = functools.partial(length_penalty, max_tokens=int(max_tokens),
                           buffer_tokens=int(buffer_tokens))
    fn.__name__ = "length_penalty"  # type: ignore[attr-defined]
    return fn
