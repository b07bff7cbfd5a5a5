"""The task layer: the table of tasks, per-task defaults, the import rules, init_from with a
training workdir, gradient accumulation that keeps each recipe's meaning, and a user's own
LLaVA-Med JSON evaluated during SFT by a declared evaluator."""
import ast
import json
import os
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from medvl_jax import config as config_lib
from medvl_jax import tasks
from medvl_jax.evaluate import evaluators, scoring
from medvl_jax.tasks import base
from medvl_jax.train import loop, restore, run

PACKAGE = pathlib.Path(tasks.__file__).resolve().parents[1]
FAST = [("train.progress", False), ("model.vision.depth", 1), ("model.text.num_layers", 1)]


# --- the table of tasks ------------------------------------------------------------------

def test_unknown_task_lists_the_known_ones():
    known = tasks.known()
    assert {"sft", "dpo", "grpo", "contrastive", "classify"} <= set(known)
    assert "policy" not in known and "base" not in known  # Helpers are not tasks.
    with pytest.raises(ValueError, match=r"unknown task 'sftt'; known tasks: \[.*'sft'"):
        tasks.get("sftt")
    config = config_lib.load_config("configs/medsynth_sft.py:smoke", {})
    with config.ignore_type():
        config.task = "nope"
    with pytest.raises(ValueError, match="known tasks"):
        run.validate(config)


def test_a_task_outside_the_package_by_module_path(tmp_path, monkeypatch):
    pkg = tmp_path / "mylab_tasks"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "echo.py").write_text(
        "import ml_collections\n"
        "from medvl_jax.tasks import base\n"
        "class Echo(base.Task):\n"
        "    name = 'echo'\n"
        "    @staticmethod\n"
        "    def default_config():\n"
        "        c = ml_collections.ConfigDict()\n"
        "        c.scale = 2.0\n"
        "        return c\n"
        "TASK = Echo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cls = tasks.get("mylab_tasks.echo")
    assert cls.name == "echo" and issubclass(cls, base.Task)
    config = ml_collections.ConfigDict({"task": "mylab_tasks.echo"})
    assert tasks.complete_config(config).echo.scale == 2.0
    (pkg / "notask.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines no TASK"):
        tasks.get("mylab_tasks.notask")


def test_task_defaults_are_merged_under_the_given_fields():
    config = config_lib.load_config_file("configs/medsynth_dpo.py:smoke")
    assert set(config.dpo) < set(tasks.get("dpo").default_config())  # Only a few given.
    full = run.complete(config)
    assert full.to_dict() == config_lib.load_config("configs/medsynth_dpo.py:smoke").to_dict()
    assert full.dpo.beta == 0.1 and full.dpo.nll_weight == 1.0  # The config's own values.
    assert full.dpo.label_smoothing == 0.0 and full.dpo.mistake_batch_size == 64  # Defaults.
    assert full.dpo.pair_weights.mistake == 1.0
    with full.unlocked():
        full.dpo.betaa = 1.0
    with pytest.raises(KeyError, match=r"dpo\.betaa.*did you mean beta"):
        run.validate(full)


def test_the_loop_refuses_what_is_not_a_task(tmp_path):
    config = run.load("configs/medsynth_sft.py:smoke")
    with pytest.raises(TypeError, match="Task"):
        loop.train(config, str(tmp_path), object())


def test_evaluators_the_model_cannot_serve_are_named():
    config = run.load("configs/medsynth_classify.py:smoke", [
        ("evals", {"zs": evaluators.entry("zero_shot", {"cxr": {"kind": "medsynth"}})})])
    _, task, _ = run.build(config)
    with pytest.raises(ValueError, match=r"evals\.zs is a zero_shot evaluator, which needs "
                                         r"\['image_embeddings', 'text_embeddings'\]"):
        evaluators.build(config, task)
    with pytest.raises(KeyError, match=r"evals\.t\.protocl.*did you mean protocol"):
        evaluators.check_entry("evals.t", {"type": "vqa", "data": {"a": {}}, "protocl": "x"})


# --- imports ---------------------------------------------------------------------------------

def _imports(path: pathlib.Path, modules) -> list[tuple[str, bool]]:
    """(imported medvl_jax module, at module level) of every import in a file: ``from pkg
    import mod`` imports the module ``pkg.mod``, ``from mod import name`` the module."""
    tree = ast.parse(path.read_text())
    module_level = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [m for m in subs if m in modules] or [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for n in names:
            if n.startswith("medvl_jax"):
                out.append((n, id(node) in module_level))
    return out


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def test_no_layer_imports_the_command_line_modules_and_no_cycles():
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    clis = {"medvl_jax.train.cli", "medvl_jax.evaluate.cli", "medvl_jax.convert.workdir",
            "medvl_jax.train.run"}
    for name, path in files.items():
        if name.split(".")[1:2] in (["models"], ["data"], ["sampling"], ["tasks"]):
            bad = [m for m, _ in _imports(path, files) if m in clis]
            assert not bad, f"{name} imports {bad}"
    # Module-level imports (what runs at import time) form no cycle.
    graph = {name: {m for m, top in _imports(path, files) if top and m in files and m != name}
             for name, path in files.items()}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack + [node, nxt])}")
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])
    # No task name in the command-line modules.
    for name in clis:
        text = files[name].read_text()
        for task in ("sft", "dpo", "grpo", "contrastive", "classify"):
            assert f'"{task}"' not in text and f"'{task}'" not in text, (name, task)


# --- init_from: a training workdir -----------------------------------------------------------

@pytest.fixture(scope="module")
def sft_workdir(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("sft") / "run")
    config = run.load("configs/medsynth_sft.py:smoke", FAST + [
        ("train.steps", 2), ("train.checkpoint_every", 2), ("evals", {})])
    assert run.train(config, wd) == 0
    return wd


def test_init_from_a_training_workdir(sft_workdir, tmp_path):
    """--config.init_from=<workdir> starts from its newest checkpoint: with lr 0 the new run's
    weights are the workdir's, and its saved config holds the model, so it rebuilds alone."""
    want = restore.load(sft_workdir).params
    wd = str(tmp_path / "again")
    config = run.load("configs/medsynth_sft.py:smoke", FAST + [
        ("train.steps", 1), ("train.checkpoint_every", 1), ("evals", {}),
        ("init_from", sft_workdir), ("optim.lr", 0.0), ("optim.warmup_steps", 0)])
    assert run.train(config, wd) == 0
    got = restore.load(wd).params
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    saved, _ = restore.saved_config(wd)
    assert saved.init_from == os.path.abspath(sft_workdir)
    # A model section that differs from the workdir's names the field.
    bad = run.load("configs/medsynth_sft.py:smoke", FAST + [
        ("init_from", sft_workdir), ("model.text.mlp_dim", 64), ("evals", {})])
    with pytest.raises(ValueError, match=r"model\.text\.mlp_dim=64 in the config"):
        run.train(bad, str(tmp_path / "bad"))


def test_every_config_smoke_loads_standalone():
    """Every config's :smoke builds its task without init_from (the converted-checkpoint
    fine-tune configs excepted: they say what they need)."""
    for path in sorted(pathlib.Path("configs").glob("*.py")):
        config = run.load(f"{path}:smoke")
        if config.get("model"):
            config, task, _ = run.build(config)
            evaluators.build(config, task)
        else:
            with pytest.raises(ValueError, match="init_from"):
                run.build(config)


# --- gradient accumulation keeps the recipe's meaning -----------------------------------------

def test_contrastive_refuses_gradient_accumulation():
    config = run.load("configs/medsynth_siglip.py:smoke", [("optim.grad_accum", 2)])
    with pytest.raises(ValueError, match=r"optim.grad_accum=2: a contrastive loss contrasts "
                                         r"each example with every other example"):
        run.build(config)


def test_grpo_token_mean_over_the_whole_batch_under_accumulation():
    """One step with grad_accum=2 equals one step on the whole batch: token_mean divides by
    the completion tokens of the whole batch, not each microbatch's (the microbatches here
    have very different completion lengths)."""
    def step(accum):
        config = run.load("configs/medsynth_grpo.py:smoke", FAST + [
            ("optim.grad_accum", accum), ("grpo.beta", 0.0)])
        _, task, _ = run.build(config)
        b = 8
        batch = dict(task.dummy_batch(b))
        rng = np.random.default_rng(0)
        p, t = config.data.max_length, config.grpo.max_new_tokens
        batch["tokens"] = batch["tokens"].copy()
        batch["tokens"][:, p:] = rng.integers(5, 200, (b, t))
        # Rows 0, 2, 4, 6 (microbatch 0 under stride-2 splitting) have 1 token, the others t.
        lengths = np.where(np.arange(b) % 2 == 0, 1, t)
        batch["completion_mask"] = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
        batch["input_mask"] = np.concatenate(
            [batch["input_mask"][:, :p], batch["completion_mask"].astype(bool)], 1)
        batch["old_logp"] = rng.normal(-2, 0.1, (b, t)).astype(np.float32)
        batch["advantages"] = rng.normal(0, 1, (b,)).astype(np.float32)
        params = nn.unbox(jax.jit(task.init)(jax.random.key(0), batch))
        tx = optax.sgd(1.0)
        state = loop.state_lib.new_state(params, tx)
        fn = jax.jit(loop.make_train_step(task, tx, lambda s: 1.0, accum))
        new, metrics = fn(state, batch, jax.random.key(1))
        return params, new.params, metrics, task, batch

    p0, one, m1, task, batch = step(1)
    _, two, m2, _, _ = step(2)
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
    # Per-microbatch token means would weigh the short completions 7x more: not the same loss.
    halves = [jax.tree.map(lambda x: x[i::2], batch) for i in range(2)]
    naive = np.mean([float(task.loss(p0, h, None)[0]) for h in halves])
    assert abs(naive - float(m1["loss"])) > 1e-3


# --- a user's LLaVA-Med JSON, held-out split evaluated during SFT ----------------------------

def test_llava_med_json_held_out_split_is_evaluated_during_sft(tmp_path):
    from PIL import Image

    for i in range(6):
        Image.fromarray(np.full((40, 40), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")

    def record(i):
        answer = "yes" if i % 2 else "no"
        return {"id": f"q{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nIs there an effusion?"},
            {"from": "gpt", "value": answer}]}
    (tmp_path / "train.json").write_text(json.dumps([record(i) for i in range(4)]))
    (tmp_path / "test.json").write_text(json.dumps([record(i) for i in range(4, 6)]))
    heldout = {"mine": {"kind": "json", "path": str(tmp_path / "test.json"),
                        "format": "llava"}}
    wd = str(tmp_path / "run")
    config = run.load("configs/medsynth_sft.py:smoke", FAST + [
        ("data.sources", {"mine": {"kind": "json", "path": str(tmp_path / "train.json")}}),
        ("data.max_images", 1), ("train.steps", 2), ("train.checkpoint_every", 0),
        ("evals", {"heldout": evaluators.entry("vqa", heldout, protocol="exact", every=1,
                                               batch_size=2, max_new_tokens=4)})])
    assert run.train(config, wd) == 0
    for step in (1, 2):  # Every step (during training), and at the end.
        res = json.load(open(os.path.join(wd, f"eval_heldout_{step}.json")))
        assert res["num_questions"] == 2 and res["split"] == "test"
        assert [r["id"] for r in res["predictions"]] == ["q4", "q5"]
        for r in res["predictions"]:
            assert r["answer"] == ("no" if r["id"] == "q4" else "yes")
            want = float(scoring.normalise(r["prediction"]) == scoring.normalise(r["answer"]))
            assert r["score"] == want
    final = json.load(open(os.path.join(wd, "results.json")))["heldout"]
    assert final["overall"] == pytest.approx(np.mean([r["score"] for r in res["predictions"]]))
