"""Errors raised by the data layer, and the one guard every training iterator puts around the
functions that read and featurise records.

Every reader, source and transform raises :class:`DataError` with the file or record named, so
a bad example never turns into a crash deep inside a batch with no clue where it came from.
:func:`guarded` adds the record's location (``file:line``, ``file[index]`` or the study id)
when the error does not name it (a missing image names the image, not the JSONL line that
referenced it). With ``data.skip_bad_examples`` the guard drops the record instead and counts
it in a :class:`SkipCounter`: per distinct record, by reason, the first offenders printed with
their location, and a ceiling (``data.max_skip_fraction``) past which the run stops.
"""
from __future__ import annotations

import collections
import sys
import threading
from typing import Any, Callable

# The skip ceiling is judged once this many records have been read, so one bad record among
# the first few does not stop a run whose data is 99.9% good.
MIN_READS_FOR_CEILING = 200
SHOWN_OFFENDERS = 10  # Distinct bad records printed (and kept for error messages).


class DataError(ValueError):
    """Bad input data. The message names the file or record and what is wrong with it."""

    def __init__(self, message: str, *, where: str | None = None, reason: str = "invalid"):
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: {message}" if where else message)


class TooManyBadRecords(RuntimeError):
    """More than ``data.max_skip_fraction`` of the records read were bad. Not a DataError, so
    no guard downstream swallows it: it ends the run."""


class DataStall(RuntimeError):
    """The data pipeline gave no batch within ``train.data_timeout_s``."""


def record_key(record: Any) -> str | None:
    """Where a record (or the example or pair made of it) comes from: ``meta.where`` / ``where``
    (``file:line``, ``file[index]``), else its ``id``; None if it names neither."""
    if not isinstance(record, dict):
        return None
    meta = record.get("meta")
    where = (meta.get("where") if isinstance(meta, dict) else None) or record.get("where")
    key = where or record.get("id")
    if isinstance(key, bytes):
        key = key.decode("utf-8", "replace")
    return str(key) if key not in (None, "") else None


def located(err: DataError, record: Any) -> DataError:
    """``err`` with the record's location in front when its message does not name it yet."""
    key = record_key(record)
    if key is None or key in str(err):
        return err
    out = DataError(str(err), where=key, reason=err.reason)
    out.__cause__ = err
    return out


class SkipCounter:
    """Thread-safe counts of skipped records (grain reads with several threads).

    ``total`` and ``counts`` (by reason) count distinct records: a bad record read again in a
    later epoch is not counted twice. ``max_fraction`` is the ceiling on the fraction of reads
    that were bad (judged from MIN_READS_FOR_CEILING reads on); past it :meth:`add` raises
    :class:`TooManyBadRecords` naming the first offenders. The state (:meth:`state`) is saved
    with every checkpoint, so a resumed run keeps counting where it stopped.
    """

    def __init__(self, max_fraction: float = 1.0, *, echo: bool = True):
        self.max_fraction = float(max_fraction)
        self.echo = echo  # Print each new bad record (the first SHOWN_OFFENDERS) to stderr.
        self._lock = threading.Lock()
        self._reads = 0
        self._bad_reads = 0
        self._bad: dict[str, str] = {}  # record key -> reason
        self.examples: list[str] = []   # Messages of the first distinct bad records.

    def read(self) -> None:
        """Counts one record read (the first stage of a pipeline calls this)."""
        with self._lock:
            self._reads += 1

    def add(self, err: DataError, record: Any = None) -> None:
        """Counts ``err`` as a skip of ``record``; raises TooManyBadRecords past the ceiling."""
        key = record_key(record) or err.where or str(err)
        with self._lock:
            self._bad_reads += 1
            new = key not in self._bad
            if new:
                self._bad[key] = err.reason
                if len(self.examples) < SHOWN_OFFENDERS:
                    self.examples.append(str(err))
                    if self.echo:
                        print(f"skipping bad record: {err}", file=sys.stderr, flush=True)
            reads, bad = max(self._reads, self._bad_reads), self._bad_reads
        if reads >= MIN_READS_FOR_CEILING and bad > self.max_fraction * reads:
            raise TooManyBadRecords(
                f"{bad} of {reads} records read were bad, more than data.max_skip_fraction="
                f"{self.max_fraction:g}; stopping. {self.summary()}")

    @property
    def counts(self) -> dict[str, int]:
        """Distinct bad records by reason."""
        with self._lock:
            return dict(collections.Counter(self._bad.values()))

    @property
    def total(self) -> int:
        """Distinct bad records."""
        with self._lock:
            return len(self._bad)

    def summary(self) -> str:
        """One paragraph: how many distinct records were skipped, why, and the first ones."""
        with self._lock:
            n, reasons, shown = len(self._bad), collections.Counter(self._bad.values()), \
                list(self.examples)
        if not n:
            return "no bad records"
        by_reason = ", ".join(f"{r}: {c}" for r, c in sorted(reasons.items()))
        return f"skipped {n} bad record(s) ({by_reason}); first: " + "; ".join(shown)

    def state(self) -> dict:
        """JSON-able counts, saved with checkpoints."""
        with self._lock:
            return {"reads": self._reads, "bad_reads": self._bad_reads, "bad": dict(self._bad),
                    "examples": list(self.examples)}

    def restore(self, state: dict | None) -> None:
        """Continues from :meth:`state` (None: nothing saved, counts start at zero)."""
        if not state:
            return
        with self._lock:
            self._reads = int(state.get("reads", 0))
            self._bad_reads = int(state.get("bad_reads", 0))
            self._bad = dict(state.get("bad", {}))
            self.examples = list(state.get("examples", []))


def guarded(fn: Callable, skips: SkipCounter | None, *, first_stage: bool = False) -> Callable:
    """Wraps ``fn(record, rng)`` for a grain ``random_map``.

    A None input (a record an earlier stage dropped) passes through as None. A DataError gets
    the record's location added; with ``skips`` it is counted and the record dropped (None is
    returned), without it the error is raised. ``first_stage``: this stage reads records from
    the source, so it counts the reads the skip ceiling is judged against.
    """

    def call(record, rng):
        if record is None:
            return None
        if first_stage and skips is not None:
            skips.read()
        try:
            return fn(record, rng)
        except DataError as e:
            err = located(e, record)
            if skips is None:
                raise err
            skips.add(err, record)
            return None

    return call
