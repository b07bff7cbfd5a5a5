"""Format rewards: does a completion follow the requested output layout?

``format_reward`` wants exactly ``<think>…</think><answer>…</answer>`` (whitespace between and
around the blocks allowed, nothing else, each tag once); ``answer_format_reward`` wants exactly
one ``<answer>…</answer>`` block and nothing outside it. Both give 1.0 or 0.0.
"""
from __future__ import annotations

import re

_THINK_ANSWER = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_ANSWER_ONLY = re.compile(r"\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_TAG = re.compile(r"</?(think|answer)>")


def _tags_once(text: str, names: tuple[str, ...]) -> bool:
    """Each tag of ``names`` opens and closes exactly once, and no other tag of ours appears."""
    found = _TAG.findall(text)
    return sorted(found) == sorted(n for n in names for _ in range(2))


def format_reward(prompts: list[str], completions: list[str], **_) -> list[float]:
    """1.0 for ``<think>…</think><answer>…</answer>`` with a non-empty answer, else 0.0."""
    del prompts
    out = []
    for c in completions:
        m = _THINK_ANSWER.fullmatch(c)
        ok = m is not None and _tags_once(c, ("think", "answer")) and m.group(2).strip() != ""
        out.append(float(ok))
    return out


def answer_format_reward(prompts: list[str], completions: list[str], **_) -> list[float]:
    """1.0 for a single non-empty ``<answer>…</answer>`` block and nothing else, else 0.0."""
    del prompts
    out = []
    for c in completions:
        m = _ANSWER_ONLY.fullmatch(c)
        out.append(float(m is not None and _tags_once(c, ("answer",))
                         and m.group(1).strip() != ""))
    return out
