"""Bad data in a real run: skips counted per distinct record with its file:line (contrastive
pairs here; every task's iterator shares the guard), saved with checkpoints; a run whose data
is all bad stops with an error, by the skip ceiling or by the stall timeout; SIGTERM while the
pipeline is stalled ends the process within seconds."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from medvl_jax.data.errors import TooManyBadRecords
from medvl_jax.train import checkpoint as ckpt_lib
from medvl_jax.train import guards, run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = "configs/medsynth_siglip.py:smoke"
TINY = [("model.vision.depth", 1), ("model.text.depth", 1), ("train.progress", False),
        ("train.log_every", 1), ("data.max_length", 32), ("model.text.max_len", 32),
        ("data.batch_size", 8), ("evals", {}), ("data.skip_bad_examples", True),
        ("data.shuffle", False)]


def _pairs(tmp_path, n, missing):
    """A JSONL of ``n`` pairs whose 1-based lines in ``missing`` name absent images."""
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            if i + 1 not in missing:
                Image.fromarray(np.full((64, 64), 15 * i, np.uint8)).save(tmp_path / f"{i}.png")
            f.write(json.dumps({"image": f"{i}.png", "text": f"Image {i}. Finding {i}."}) + "\n")
    return str(path)


def _config(path, *overrides):
    cfg = run.load(SMOKE, TINY + list(overrides))
    cfg.data.sources = {"p": {"kind": "pairs", "path": path}}
    return cfg


def _rows(wd):
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_one_bad_record_is_one_skip_named_by_its_line(tmp_path, capsys):
    path = _pairs(tmp_path, 16, missing={3})
    wd = str(tmp_path / "run")
    # 6 steps of 8 pairs read the 16 records three times: still one bad record.
    cfg = _config(path, ("train.steps", 6), ("train.checkpoint_every", 6))
    assert run.train(cfg, wd) == 0
    assert [r["skipped_examples"] for r in _rows(wd)][-1] == 1
    err = capsys.readouterr()
    assert f"{path}:3" in err.err and "2.png" in err.err  # The line and the image it names.
    assert "skipped 1 bad record(s)" in err.out
    meta = ckpt_lib.CheckpointManager(os.path.join(wd, "checkpoints")).read_metadata(6)
    assert list(meta["skips"]["bad"]) == [f"{path}:3"] and meta["skips"]["bad_reads"] >= 3


def test_all_bad_records_stop_the_run_at_the_ceiling(tmp_path):
    path = _pairs(tmp_path, 8, missing=set(range(1, 9)))
    start = time.monotonic()
    with pytest.raises(TooManyBadRecords, match=r"max_skip_fraction=0.1.*pairs.jsonl:1"):
        run.train(_config(path, ("train.steps", 2)), str(tmp_path / "run"))
    assert time.monotonic() - start < 120


def test_all_bad_records_without_a_ceiling_stop_at_the_stall_timeout(tmp_path):
    path = _pairs(tmp_path, 8, missing=set(range(1, 9)))
    with pytest.raises(guards.DataStall, match=r"in 3s .*skipped 8 bad record"):
        run.train(_config(path, ("train.steps", 2), ("data.max_skip_fraction", 1.0),
                          ("train.data_timeout_s", 3.0)), str(tmp_path / "run"))


def test_sigterm_during_a_data_stall_ends_the_process(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "tests.train.tiny", str(tmp_path), "8",
                             "stall"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    line = ""
    while "STALLED" not in line and time.monotonic() < deadline:
        line = proc.stdout.readline()
    assert "STALLED" in line
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 30
    assert proc.returncode == 0, err[-2000:]
    assert "nothing saved" in out and "RESULT {'preempted_at': None}" in out
