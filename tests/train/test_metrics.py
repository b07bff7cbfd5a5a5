"""Metrics written by the loop: JSONL lines, TensorBoard events (read back from the file),
evaluation JSON, throughput and MFU."""
import glob
import json
import os
import struct

import pytest
from tensorboardX.proto import event_pb2

from medvl_jax.train import loop
from tests.train import tiny


def _read_events(path):
    """Scalars of a TensorBoard event file, parsed from its TFRecord framing:
    [uint64 length][uint32 crc][payload][uint32 crc] per record."""
    out = {}
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
        pos += 12 + n + 4
        for v in ev.summary.value:
            out.setdefault(v.tag, {})[ev.step] = v.simple_value
    return out


class TokenTask(tiny.TinyTask):
    def count_tokens(self, batch):
        return 2 * len(batch["x"])


def test_metrics_files(tmp_path):
    wd = str(tmp_path)
    cfg = tiny.config(steps=4, peak_flops_per_device=1e9, checkpoint_every=0)
    task = TokenTask()
    results = loop.train(cfg, wd, task, data_iter_fn=tiny.data_iter,
                         evaluators={"val": tiny.Validation(task, every=2)})

    rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        for key in ("loss", "learning_rate", "grad_norm", "accuracy", "step_time",
                    "examples_per_s", "tokens_per_s", "mfu", "skipped_nonfinite"):
            assert key in r, key
        assert r["examples_per_s"] == pytest.approx(16 / r["step_time"], rel=1e-9)
        assert r["tokens_per_s"] == pytest.approx(32 / r["step_time"], rel=1e-9)
        # MFU = per-device FLOPs of a step / step time / per-device peak.
        flops = tiny.TinyTask.flops_per_example * 16 / 8
        assert r["mfu"] == pytest.approx(flops / r["step_time"] / 1e9, rel=1e-9)
    # Warmup 2 then cosine to 0 over the remaining 2 steps (lr 0.05), by hand:
    assert [r["learning_rate"] for r in rows] == pytest.approx([0.0, 0.025, 0.05, 0.025])

    files = glob.glob(os.path.join(wd, "tb", "events.out.tfevents.*"))
    assert len(files) == 1
    events = _read_events(files[0])
    assert sorted(events["train/loss"]) == [1, 2, 3, 4]
    for r in rows:
        assert events["train/loss"][r["step"]] == pytest.approx(r["loss"], rel=1e-6)
    assert set(events["eval/val/accuracy"]) == {2, 4}

    for step in (2, 4):
        ev = json.load(open(os.path.join(wd, f"eval_val_{step}.json")))
        assert ev["step"] == step and ev["n"] == 64 and 0 <= ev["accuracy"] <= 1
        assert events["eval/val/accuracy"][step] == pytest.approx(ev["accuracy"])
    assert results == {"val": {"accuracy": ev["accuracy"], "n": 64}}
