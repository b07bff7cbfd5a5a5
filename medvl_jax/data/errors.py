"""Errors raised by the data layer, and the counter used when a config asks to skip bad input.

Every reader, source and transform raises :class:`DataError` with the file or record named, so
a bad example never turns into a crash deep inside a batch with no clue where it came from.
"""
from __future__ import annotations

import collections
import threading


class DataError(ValueError):
    """Bad input data. The message names the file or record and what is wrong with it."""

    def __init__(self, message: str, *, where: str | None = None, reason: str = "invalid"):
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: {message}" if where else message)


class SkipCounter:
    """Thread-safe counts of skipped records by reason, reported in the logs."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()
        self.examples: list[str] = []  # The first few messages, for the log.

    def add(self, err: DataError) -> None:
        with self._lock:
            self._counts[err.reason] += 1
            if len(self.examples) < 10:
                self.examples.append(str(err))

    @property
    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())
