"""What keeps a long run from being eaten by a stall, a preemption or a loss spike.

* :class:`Preempted`: SIGTERM (a TPU/SLURM preemption notice) becomes a flag the loop reads
  at step boundaries; the loop then saves and the command exits with
  :data:`PREEMPTED_EXIT_CODE`, which launchers treat as "requeue me".
* :class:`DataFetcher`: ``next(data_iterator)`` on a daemon thread, so the loop can give up on
  a pipeline that yields nothing for ``train.data_timeout_s`` (every record bad, a hung
  file system) and still sees SIGTERM while waiting.
* :class:`SpikeGuard`: the host side of loss-spike skipping (``train.skip_loss_spikes = k``):
  the threshold ``k × median`` of the recent applied losses, passed to the step, which does
  not apply an update whose loss exceeds it.
"""
from __future__ import annotations

import collections
import queue
import signal
import threading
import time

import jax
import numpy as np

from medvl_jax.data.errors import DataStall

# Exit status of a run that stopped on SIGTERM (saved or not): EX_TEMPFAIL from sysexits.h,
# "try again later". launch/slurm.py requeues the job on it, launch/tpu.py reruns.
PREEMPTED_EXIT_CODE = 75


class Preempted:
    """Turns SIGTERM into a flag checked at step boundaries."""

    def __init__(self):
        self.flag = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            self.flag = True
        try:
            self._old = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # Not the main thread: no handler, no flag.
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def any_process(self) -> bool:
        """Whether any process got the signal (a collective when there are several)."""
        if jax.process_count() == 1:
            return self.flag
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self.flag, np.int32))
        return bool(np.asarray(flags).any())


class PreemptedWaitingForData(RuntimeError):
    """SIGTERM came while the pipeline was not delivering; the data position is mid-read, so
    nothing is saved (the newest checkpoint stays the resume point)."""


class DataFetcher:
    """Calls ``next(iterator)`` on one daemon thread and waits for it in short slices.

    ``timeout_s`` (0: none): a DataStall is raised when no batch came in that long; ``describe``
    is called for the message (e.g. the skip counts, which say why). ``preempted``: when its
    flag is set and the batch is still not there ``grace_s`` later, PreemptedWaitingForData is
    raised. Both leave the thread behind, stuck in ``next``; it is a daemon, so the process can
    exit. Errors of the iterator are re-raised in the caller with their traceback.
    """

    def __init__(self, iterator, *, timeout_s: float = 0.0, preempted: Preempted | None = None,
                 grace_s: float = 5.0, describe=lambda: ""):
        self._it = iterator
        self.timeout_s, self.grace_s = float(timeout_s), float(grace_s)
        self._preempted, self._describe = preempted, describe
        self._requests: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        threading.Thread(target=self._serve, name="medvl-data", daemon=True).start()

    def _serve(self):
        while True:
            self._requests.get()
            try:
                self._results.put((next(self._it), None))
            except BaseException as e:  # Handed to the caller.
                self._results.put((None, e))

    def __call__(self):
        self._requests.put(None)
        start, term = time.monotonic(), None
        while True:
            try:
                value, err = self._results.get(timeout=0.2)
                break
            except queue.Empty:
                now = time.monotonic()
                if self._preempted is not None and self._preempted.flag:
                    term = term or now
                    if now - term > self.grace_s:
                        raise PreemptedWaitingForData(
                            f"SIGTERM while waiting {now - start:.0f}s for a batch") from None
                if self.timeout_s and now - start > self.timeout_s:
                    more = self._describe()
                    raise DataStall(
                        f"no batch from the data pipeline in {self.timeout_s:g}s "
                        f"(train.data_timeout_s)" + (f"; {more}" if more else "")) from None
        if err is not None:
            raise err
        return value


class SpikeGuard:
    """Loss-spike threshold: ``factor × median`` of the last ``window`` applied losses, once
    ``warmup`` of them are known (inf before, and always with ``factor = 0``).

    The loop hands it each step's loss and spike flag (:meth:`record`, a few steps at a time,
    fetched with the log line) and updates the threshold only at log steps
    (:meth:`update`), so a resumed run, restored from :meth:`state`, uses the same
    thresholds at the same steps.
    """

    def __init__(self, factor: float, *, window: int = 100, warmup: int = 20):
        self.factor, self.warmup = float(factor), int(warmup)
        self.history: collections.deque = collections.deque(maxlen=int(window))
        self.threshold = float("inf")
        self.skipped = 0

    @property
    def enabled(self) -> bool:
        return self.factor > 0

    def record(self, losses, spikes) -> None:
        """Losses of steps, and whether each was rejected as a spike."""
        for loss, spike in zip(np.asarray(losses, np.float64), np.asarray(spikes)):
            if spike:
                self.skipped += 1
            elif np.isfinite(loss):
                self.history.append(float(loss))

    def update(self) -> None:
        """A new threshold from the history (at log steps)."""
        if self.enabled and len(self.history) >= self.warmup:
            median = float(np.median(self.history))
            self.threshold = self.factor * median if median > 0 else float("inf")

    def state(self) -> dict:
        return {"history": list(self.history), "threshold": self.threshold,
                "skipped": self.skipped}

    def restore(self, state: dict | None) -> None:
        if state:
            self.history.extend(state["history"])
            self.threshold = float(state["threshold"])
            self.skipped = int(state["skipped"])
