"""Generated answers kept on disk, so that a killed evaluation continues where it stopped and
shards of one evaluation, run by separate processes, add up.

A store is a JSONL file: a header line ``{"identity": {...}}`` saying what the generations
depend on (checkpoint, step, benchmark, split, token budget), then one line per generated
answer ``{"key": ..., "id": ..., "text": ...}``, appended and flushed after every batch. A
last line cut off by a kill is ignored (and said so). Opening a store also reads the other
shards' files given to it; a file written for another identity is an error naming the field
that differs, never silently mixed in.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Iterable, Mapping


def key_of(example_id: str, prompt: str, condition: str, budget: int) -> str:
    """The key of one generation: the example, its exact prompt, the condition and the token
    budget (a hash of them, so that lines stay short)."""
    raw = json.dumps([example_id, prompt, condition, int(budget)], ensure_ascii=False)
    return hashlib.sha1(raw.encode("utf-8")).hexdigest()


class GenerationStore:
    """Generated texts by key, backed by the JSONL file ``path`` (created when missing).

    ``identity``: what the generations depend on; ``others``: further store files (other
    shards of the same evaluation) whose generations are read too.
    """

    def __init__(self, path: str, identity: Mapping, others: Iterable[str] = ()):
        self.path = os.path.abspath(path)
        self.identity = json.loads(json.dumps(dict(identity)))
        self.texts: dict[str, str] = {}
        for p in [self.path, *[os.path.abspath(o) for o in others]]:
            if os.path.isfile(p):
                self._load(p, own=p == self.path)
        self.loaded = len(self.texts)
        if not os.path.isfile(self.path):
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(self.path, "w", encoding="utf-8") as f:
                f.write(json.dumps({"identity": self.identity}) + "\n")

    def _load(self, path: str, own: bool) -> None:
        with open(path, encoding="utf-8") as f:
            content = f.read()
        if content and not content.endswith("\n"):  # A write cut off by a kill.
            print(f"generations: ignoring the unfinished last line of {path}", file=sys.stderr)
            content = content[:content.rfind("\n") + 1]
            if own:  # Appends must start on a fresh line.
                with open(path, "w", encoding="utf-8") as f:
                    f.write(content)
        lines = content.split("\n")
        try:
            header = json.loads(lines[0])["identity"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}:1: not a generations file (its first line must be "
                             f"{{\"identity\": ...}}); delete it to start afresh") from None
        for field in sorted(set(header) | set(self.identity)):
            if header.get(field) != self.identity.get(field):
                raise ValueError(
                    f"{path} holds generations for {field}={header.get(field)!r}, this "
                    f"evaluation has {field}={self.identity.get(field)!r}; delete the file "
                    f"(or pass --fresh) to generate again")
        for lineno, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                self.texts[rec["key"]] = rec["text"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}:{lineno}: not a generation record") from None

    def __contains__(self, key: str) -> bool:
        return key in self.texts

    def get(self, key: str) -> str:
        """The text stored under ``key``."""
        return self.texts[key]

    def add(self, items: Iterable[tuple[str, str, str]]) -> None:
        """Appends ``(key, example id, text)`` items and flushes them to disk."""
        lines = []
        for key, example_id, text in items:
            self.texts[key] = text
            lines.append(json.dumps({"key": key, "id": example_id, "text": text},
                                    ensure_ascii=False))
        if not lines:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
