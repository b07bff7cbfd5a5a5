"""The colabs: committed without outputs, and each runs top to bottom in smoke mode.

A notebook is executed with nbclient in a fresh ``python3`` kernel, with ``SMOKE = True``
injected after its cell tagged ``parameters`` (as papermill does). The kernel inherits this
process's environment (conftest: CPU backend, tokenizer and compilation caches) except the
eight fake devices: a Colab CPU runtime has one, and compiling for eight costs the notebooks
a third more time. TMPDIR points into the test's tmp_path so that the notebook's work
directories are cleaned up. The notebooks check their own results with ``assert``; the tests
check what they printed and wrote. Each run prints its wall and CPU time (``-s`` shows them).
"""
from __future__ import annotations

import glob
import json
import os
import pathlib
import re
import resource
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLABS = ROOT / "colabs"
NAMES = ("quickstart", "convert_to_pytorch", "grpo", "contrastive")
CELL_TIMEOUT_S = 600


def _read(name: str):
    return nbformat.read(COLABS / f"{name}.ipynb", as_version=4)


def test_every_colab_is_listed_and_present():
    found = sorted(p.stem for p in COLABS.glob("*.ipynb"))
    assert found == sorted(NAMES)
    readme = (COLABS / "README.md").read_text()
    for name in NAMES:
        assert f"{name}.ipynb" in readme


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs(name):
    nb = _read(name)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}: cell {i} has outputs"
            assert cell.execution_count is None, f"{name}: cell {i} has an execution count"
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and params[0].source.startswith("SMOKE = False")


def _execute(name: str, tmp_path) -> tuple[str, float]:
    """Runs the notebook in smoke mode; returns its text outputs and the wall time."""
    nb = _read(name)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(
        "SMOKE = True", metadata={"tags": ["injected-parameters"]}))
    # No MPLBACKEND: the kernel's inline backend turns figures into image/png outputs.
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    env["TMPDIR"] = str(tmp_path)
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                              env.get("XLA_FLAGS", "")).strip()
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    cpu_start = _children_cpu()
    try:
        client.execute(env=env)
    finally:  # The executed notebook, outputs and all, for a failure's post-mortem.
        nbformat.write(nb, str(tmp_path / f"{name}.executed.ipynb"))
    seconds = time.perf_counter() - start
    cpu = _children_cpu() - cpu_start  # The kernel's, once it has exited.
    texts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                texts.append(out.text)
            elif out.output_type in ("execute_result", "display_data"):
                texts.append(out.get("data", {}).get("text/plain", ""))
    print(f"{name}: {seconds:.0f} s wall, {cpu:.0f} s CPU")
    return "\n".join(texts), seconds


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _images(name: str, tmp_path) -> int:
    nb = nbformat.read(str(tmp_path / f"{name}.executed.ipynb"), as_version=4)
    return sum("image/png" in out.get("data", {}) for c in nb.cells
               for out in c.get("outputs", []))


def _rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _number(pattern: str, text: str) -> float:
    found = re.findall(pattern, text)
    assert len(found) == 1, (pattern, found)
    return float(found[0])


def _one(pattern: str) -> str:
    found = glob.glob(pattern)
    assert len(found) == 1, (pattern, found)
    return found[0]


def test_quickstart(tmp_path):
    text, _ = _execute("quickstart", tmp_path)
    workdir = _one(str(tmp_path / "medvl_quickstart_*"))
    results = json.load(open(os.path.join(workdir, "sft", "results.json")))["test"]
    assert results["split"] == "test" and results["num_questions"] > 0
    assert "question type" in text and "overall" in text  # The final table.
    assert text.count("reference:") == 2  # One question on the radiograph, one on the volume.
    rows = [json.loads(line) for line in open(os.path.join(workdir, "ct", "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2]
    assert _images("quickstart", tmp_path) >= 5  # Data, curves, test image, CT loss, slices.


def test_convert_to_pytorch(tmp_path):
    text, _ = _execute("convert_to_pytorch", tmp_path)
    workdir = _one(str(tmp_path / "medvl_convert_*"))
    # Converted and fine-tuned models: JAX and PyTorch logits agree; fine-tuning moved them.
    assert _number(r"converted: max \|JAX - PyTorch\| logit difference (\S+)", text) < 1e-4
    assert _number(r"fine-tuned: max \|JAX - PyTorch\| logit difference (\S+)", text) < 1e-4
    assert _number(r"fine-tuning changed the logits by up to (\S+)", text) > 1e-3
    assert "PaliGemmaForConditionalGeneration" in text
    rows = _rows(os.path.join(workdir, "finetune", "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2]
    exported = json.load(open(os.path.join(workdir, "finetuned_hf", "config.json")))
    assert exported["architectures"] == ["PaliGemmaForConditionalGeneration"]
    # The same greedy answer from medvl_jax and from transformers' generate.
    ours = re.findall(r"medvl_jax: +(.*)", text)
    theirs = re.findall(r"transformers: +(.*)", text)
    assert len(ours) == 1 and ours == theirs
    assert _images("convert_to_pytorch", tmp_path) >= 1  # The fine-tuning loss.


def test_grpo(tmp_path):
    text, _ = _execute("grpo", tmp_path)
    workdir = _one(str(tmp_path / "medvl_grpo_*"))
    rows = _rows(os.path.join(workdir, "grpo", "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("reward", "reward_accuracy", "reward_length", "kl", "completion_length",
                    "entropy", "sampler_logp_gap"):
            assert key in r and r[key] == r[key], (key, r)  # Present and not NaN.
        assert 0.0 <= r["reward_accuracy"] <= 1.0 and 1 <= r["completion_length"] <= 8
    # The run with the added reward logs it.
    custom = _rows(os.path.join(workdir, "grpo_decisive", "metrics.jsonl"))
    assert [r["step"] for r in custom] == [1]
    assert -1.0 <= custom[0]["reward_decisive"] <= 0.0
    # Two rollouts (trained policy, added reward) of 2 questions x 4 sampled answers.
    assert text.count("advantage") == 16 and text.count("reference") == 4
    assert "no evaluation in this run" in text
    assert _images("grpo", tmp_path) >= 1  # The reward curves.


def test_contrastive(tmp_path):
    text, _ = _execute("contrastive", tmp_path)
    workdir = _one(str(tmp_path / "medvl_contrastive_*"))
    run = os.path.join(workdir, "siglip")
    assert [r["step"] for r in _rows(os.path.join(run, "metrics.jsonl"))] == [1, 2]
    results = json.load(open(os.path.join(run, "results.json")))
    zero_shot = results["zero_shot"]
    assert zero_shot["split"] == "test" and zero_shot["n"] == 16
    findings = {"nodule", "effusion", "cardiomegaly"}
    assert set(zero_shot["per_label"]) == findings
    for row in zero_shot["per_label"].values():
        assert {"auc", "accuracy", "positives", "n"} <= set(row) and row["n"] == 16
        assert 0.0 <= row["accuracy"] <= 1.0
    assert {k for k in results["retrieval"] if "@" in k} == {
        f"{d}@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert set(results["linear_probe"]["per_label"]) <= findings
    assert "zero-shot AUC" in text and "i2t recall" in text  # The table printed by the run.
    assert text.count("one-sentence prompts: ROC-AUC") == 2
    assert _images("contrastive", tmp_path) >= 4  # Pairs, curves, recall, prompt scores.
