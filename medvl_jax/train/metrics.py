"""Metrics: JSONL lines and TensorBoard events in the workdir, and a console progress bar."""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
import tqdm


class MetricsWriter:
    """Writes ``metrics.jsonl`` (one JSON object per logged step), TensorBoard events under
    ``tb/`` and evaluation results as ``eval_<step>.json``. Only process 0 writes."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.workdir, self.enabled = workdir, enabled
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter  # TF-free event writer.
            self._tb = SummaryWriter(os.path.join(workdir, "tb"))
            self._f = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

    def write(self, step: int, row: dict) -> None:
        """One metrics line (and a TensorBoard scalar per numeric value)."""
        if not self.enabled:
            return
        self._f.write(json.dumps({"step": step, "time": time.time(), **row},
                                 default=_jsonable) + "\n")
        self._f.flush()
        for k, v in row.items():
            if isinstance(v, (int, float)) and k != "step":
                self._tb.add_scalar(f"train/{k}", v, step)

    def write_eval(self, step: int, results: dict, *, name: str | None = None) -> None:
        """Evaluation results to ``eval_<name>_<step>.json`` (``eval_<step>.json`` without a
        name) and their numbers to TensorBoard under ``eval/<name>/``."""
        if not self.enabled:
            return
        stem = f"eval_{name}_{step}" if name else f"eval_{step}"
        with open(os.path.join(self.workdir, stem + ".json"), "w") as f:
            json.dump({"step": step, **results}, f, indent=1, default=_jsonable)
        tag = f"eval/{name}/" if name else "eval/"
        for k, v in _flatten(results).items():
            self._tb.add_scalar(tag + k, v, step)
        self._tb.flush()

    def close(self) -> None:
        """Flushes and closes the files (idempotent)."""
        if self.enabled:
            self.enabled = False
            self._f.close()
            self._tb.close()


def _jsonable(x):
    """numpy/jax scalars and arrays as plain JSON values."""
    x = np.asarray(x)
    return x.item() if x.ndim == 0 else x.tolist()


def _flatten(d: dict, prefix: str = "") -> dict:
    """Numeric leaves of a nested dict as ``{"a/b": number}`` (bools and strings dropped)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
        elif isinstance(v, (np.ndarray, jax.Array)) and np.ndim(v) == 0:
            out[f"{prefix}{k}"] = float(v)
    return out


class Progress:
    """A tqdm bar over steps with ETA; shows the latest loss and tokens/s (examples/s for a
    task without tokens)."""

    def __init__(self, start: int, total: int, *, enabled: bool = True):
        self._bar = tqdm.tqdm(total=total, initial=start, disable=not enabled, unit="step",
                              dynamic_ncols=True)
        self._n = start

    def update(self, step: int, row: dict | None = None) -> None:
        self._bar.update(step - self._n)
        self._n = step
        if row:
            speed = ({"tok_s": f"{row['tokens_per_s']:.0f}"} if row.get("tokens_per_s")
                     else {"ex_s": f"{row.get('examples_per_s', 0):.0f}"})
            self._bar.set_postfix(loss=f"{row['loss']:.4f}", **speed)

    def close(self) -> None:
        self._bar.close()


def compiled_flops(compiled) -> float | None:
    """FLOPs of a compiled step from XLA's cost analysis (None if the backend gives none)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # Best-effort and backend-dependent.
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0)) or None
