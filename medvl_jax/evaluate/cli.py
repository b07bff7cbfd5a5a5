"""Command line of evaluation: named, versioned protocols on a benchmark, with sanity baselines.

    python -m medvl_jax.evaluate --checkpoint DIR [--config configs/X.py[:arg]] \
        [--benchmark medsynth] [--protocol NAME[,NAME...]] [--baselines no_image,blur,noise]
        [--data_dir DIR] [--split test] [--limit N] [--out DIR] [--config.k=v ...]

``DIR`` is either

* a training workdir: its newest checkpoint under ``DIR/checkpoints`` is restored onto the
  task's abstract train state (the sharded layout the training loop uses). Without
  ``--config`` the config saved with that checkpoint is used; a config whose ``model``
  section is empty (the fine-tune configs) takes the model, tokenizer and image fields from
  the saved one; or
* a converted checkpoint directory (``python -m medvl_jax.convert.from_hf``): used as the
  config's ``init_from`` (see medvl_jax.tasks.pretrained), its params evaluated as they are
  (``--config`` is then required).

Generative tasks (sft, dpo, grpo) are evaluated by :mod:`medvl_jax.evaluate.harness`:
``--benchmark`` is ``medsynth`` (every question of the config's MedSynth sources),
``medsynth_report`` or a name of :mod:`medvl_jax.data.benchmarks`; ``--protocol`` is one or
more names of :data:`medvl_jax.evaluate.protocols.PROTOCOLS` (default: ``medsynth`` on
MedSynth benchmarks, ``exact`` elsewhere); ``--baselines`` are sanity conditions of
:mod:`medvl_jax.evaluate.baselines` (``off`` for none). Greedy decoding, deterministic. A
per-question-type table per protocol (real score beside each baseline) is printed, and
``<out>`` (default ``DIR``) receives

    eval_<benchmark>_<split>.json                             summary, stamped with each
                                                              protocol's name and version
    predictions_<benchmark>_<split>_<protocol>_<condition>.jsonl   one row per example
    scores_<benchmark>_<split>.png                            bar chart: scores vs baselines

A contrastive checkpoint gets the task's own zero-shot classification and retrieval
evaluation (``medvl_jax.evaluate.retrieval``: ROC AUC, accuracy, Recall@K), stamped as
protocol ``contrastive_zero_shot`` version 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import ml_collections

from medvl_jax import config as config_lib
from medvl_jax.convert import checkpoint_io
from medvl_jax.data import pipeline
from medvl_jax.evaluate import baselines as baselines_lib
from medvl_jax.evaluate import harness
from medvl_jax.evaluate import protocols as protocols_lib
from medvl_jax.tasks import pretrained
from medvl_jax.train import cli as train_cli


def _saved_config(manager, step: int) -> dict:
    cfg = manager.read_metadata(step).get("config")
    return json.loads(cfg) if isinstance(cfg, str) else (cfg or {})


def _with(config: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
    """A locked copy of ``config`` with top-level or dotted (``data__x``) fields set."""
    out = ml_collections.ConfigDict(config.to_dict())
    for key, value in fields.items():
        node, *rest = key.split("__")
        if rest:
            out[node][rest[0]] = value
        else:
            out[node] = value
    out.lock()
    return out


def _first_difference(a, b, prefix: str = "") -> str | None:
    """The first dotted key where two nested dicts differ, or None."""
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            d = _first_difference(x, y, f"{prefix}{key}.")
            if d:
                return d
        elif (list(x) if isinstance(x, tuple) else x) != (list(y) if isinstance(y, tuple) else y):
            return f"{prefix}{key} (config {x!r}, checkpoint {y!r})"
    return None


def load(config: ml_collections.ConfigDict, directory: str):
    """``(config, task, params, step)`` for evaluating ``directory`` (a training workdir or a
    converted checkpoint) with ``config``; ``step`` is None for a converted checkpoint."""
    import jax

    from medvl_jax.parallel import mesh as mesh_lib
    from medvl_jax.train import loop, optim
    from medvl_jax.train import state as state_lib

    directory = os.path.abspath(directory)
    ckpt_dir = os.path.join(directory, "checkpoints")
    if os.path.isfile(os.path.join(directory, checkpoint_io.META_FILE)):
        config = pretrained.resolve_config(_with(config, init_from=directory))
        tokenizer = pipeline.make_tokenizer(config.tokenizer)
        pretrained.check_tokenizer(tokenizer, pretrained.checkpoint_config(directory), directory)
        task = train_cli.TASKS[config.task][0](config, tokenizer)
        return config, task, pretrained.load_params(directory, task), None
    manager, step = _latest_checkpoint(ckpt_dir)
    if step is None:
        raise FileNotFoundError(
            f"--checkpoint {directory}: neither a training workdir (no complete checkpoint "
            f"under {ckpt_dir}) nor a converted checkpoint (no {checkpoint_io.META_FILE})")
    saved = _saved_config(manager, step)
    if (not config.get("init_from") and "model" in config and not config.model
            and saved.get("model")):
        data = saved.get("data", {})
        config = _with(config, model=saved.get("model"), tokenizer=saved.get("tokenizer"),
                       data__image_size=data.get("image_size"),
                       data__num_image_tokens=data.get("num_image_tokens"))
    config = pretrained.resolve_config(config)
    if saved.get("model") is not None:
        diff = _first_difference(config.model.to_dict(), saved["model"], "model.")
        if diff:
            raise ValueError(f"--checkpoint {directory} (step {step}) was trained with another "
                             f"model: {diff}")
    tokenizer = pipeline.make_tokenizer(config.tokenizer)
    task = train_cli.TASKS[config.task][0](config, tokenizer)

    # The train state's abstract layout, exactly as the loop builds it.
    mesh = mesh_lib.make_mesh(dict(config.train.mesh))
    init_rng = jax.random.split(jax.random.key(config.train.seed))[0]
    dummy = task.dummy_batch(int(config.data.batch_size) // jax.process_count())
    _, params_shape = state_lib.abstract_params(task.init, init_rng, dummy)
    tx, _ = optim.make_optimizer(loop.optim_config(config), params_shape, config.train.steps)
    target, _ = state_lib.abstract_state(task.init, tx, mesh, init_rng, dummy)
    try:
        state = manager.restore_state(step, target)
    except Exception as e:  # Orbax names the leaf; add which checkpoint and why.
        raise ValueError(f"cannot restore {ckpt_dir} step {step} with this config (model, "
                         f"optim.freeze or LoRA settings differ from the run's?): "
                         f"{type(e).__name__}: {e}") from e
    return config, task, state.params, step


def _progress(split: str):
    """A progress callback ``(done, total)`` over batches (tqdm on stderr)."""
    try:
        from tqdm import tqdm
    except ImportError:  # A plain percentage line.
        def show(done, total):
            print(f"\revaluating {split}: {100 * done // total}%", end="\n" if done == total
                  else "", file=sys.stderr, flush=True)
        return show, lambda: None
    bar = tqdm(desc=f"evaluating {split}", unit="batch", file=sys.stderr)

    def show(done, total):
        bar.total = total
        bar.update(done - bar.n)
    return show, bar.close


# The stamp of a contrastive checkpoint's evaluation (the task's zero-shot classification,
# retrieval and linear probe).
CONTRASTIVE_PROTOCOL = {"protocol": "contrastive_zero_shot", "version": "1"}


def _latest_checkpoint(ckpt_dir: str):
    """``(checkpoint manager, newest complete step)`` of ``ckpt_dir``; ``(None, None)`` when
    it holds none."""
    from medvl_jax.train import checkpoint as ckpt_lib

    if not os.path.isdir(ckpt_dir):
        return None, None
    manager = ckpt_lib.CheckpointManager(ckpt_dir, async_save=False)
    step = manager.latest_step()
    return (manager, step) if step is not None else (None, None)


def config_from_checkpoint(directory: str, overrides=()) -> ml_collections.ConfigDict:
    """The config saved with the newest checkpoint of training workdir ``directory``, with
    ``overrides`` (``(dotted key, value)`` pairs) applied; locked."""
    ckpt_dir = os.path.join(os.path.abspath(directory), "checkpoints")
    manager, step = _latest_checkpoint(ckpt_dir)
    if step is None:
        raise FileNotFoundError(
            f"--checkpoint {directory}: no training checkpoint under {ckpt_dir} to take the "
            f"config from; pass --config (required for a converted checkpoint)")
    saved = _saved_config(manager, step)
    if not saved:
        raise ValueError(f"--checkpoint {directory} (step {step}) holds no saved config; "
                         f"pass --config")
    config = ml_collections.ConfigDict(saved)
    for key, value in overrides:
        config_lib.apply_override(config, key, value)
    config.lock()
    return config


def _files(benchmark: str, split: str) -> tuple[str, str, str]:
    stem = f"{benchmark}_{split}"
    return f"eval_{stem}.json", f"predictions_{stem}_{{protocol}}_{{condition}}.jsonl", \
        f"scores_{stem}.png"


def evaluate(config: ml_collections.ConfigDict, directory: str, *, split: str = "test",
             out: str | None = None, benchmark: str = "medsynth",
             protocols: str | list | None = None,
             baselines: str | list = ",".join(baselines_lib.DEFAULT),
             data_dir: str | None = None, limit: int | None = None) -> dict:
    """Evaluates ``directory`` (see :func:`load`) on ``benchmark`` under ``protocols``
    (names, comma-separated or a list; default by benchmark) and ``baselines``, writes the
    summary, prediction and chart files into ``out`` (default: ``directory``) and returns
    the results (predictions included, ``"files"`` naming what was written)."""
    # Names are checked before the checkpoint is loaded.
    named = protocols is not None
    plist = protocols_lib.parse_list(protocols if named else
                                     protocols_lib.default_for(benchmark))
    blist = (baselines_lib.parse_list(baselines) if isinstance(baselines, str)
             else baselines_lib.parse_list(",".join(baselines) or "off"))
    harness.check_benchmark(benchmark)
    config, task, params, step = load(config, directory)
    out = os.path.abspath(out or directory)
    summary_name, rows_name, chart_name = _files(benchmark, split)
    try:
        harness.generative_policy(task)
    except ValueError:
        if not hasattr(task, "evaluate") or named or benchmark != "medsynth":
            raise
        return _evaluate_embeddings(task, params, split, out, summary_name,
                                    checkpoint=directory, step=step)
    examples = harness.load_examples(benchmark, task, split, data_dir, limit)
    if not examples:
        raise ValueError(f"nothing to evaluate on {benchmark!r} {split!r}: the config has no "
                         f"MedSynth source or sft.eval_studies=0"
                         if benchmark.startswith("medsynth") else
                         f"benchmark {benchmark!r} has no {split!r} examples")
    show, close = _progress(f"{benchmark} {split}")
    try:
        results = harness.evaluate(task, params, examples, plist, baselines=blist,
                                   progress=show, benchmark=benchmark, split=split)
    finally:
        close()
    os.makedirs(out, exist_ok=True)
    files = {"summary": summary_name, "chart": chart_name, "predictions": {}}
    for name, per_cond in results["predictions"].items():
        files["predictions"][name] = {}
        for cond, rows in per_cond.items():
            fname = rows_name.format(protocol=name, condition=cond)
            files["predictions"][name][cond] = fname
            with open(os.path.join(out, fname), "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
    harness.plot(results, os.path.join(out, chart_name))
    summary = {k: v for k, v in results.items() if k != "predictions"}
    summary.update(checkpoint=os.path.abspath(directory), step=step, files=files)
    with open(os.path.join(out, summary_name), "w") as f:
        json.dump(summary, f, indent=1)
    return {**results, "checkpoint": summary["checkpoint"], "step": step, "files": files,
            "out": out}


def _evaluate_embeddings(task, params, split, out, summary_name, *, checkpoint, step) -> dict:
    """A contrastive checkpoint: the task's own evaluation, stamped and written."""
    results = task.evaluate(params, split)
    if not results:
        raise ValueError(f"nothing to evaluate on {split!r}: the config has no MedSynth source "
                         f"or its eval_studies=0")
    results = {**CONTRASTIVE_PROTOCOL, **results, "checkpoint": os.path.abspath(checkpoint),
               "step": step}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, summary_name), "w") as f:
        json.dump(results, f, indent=1)
    return {**results, "files": {"summary": summary_name}, "out": out, "contrastive": True}


def main(argv=None) -> int:
    """Command-line entry point (see the module docstring); returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    overrides, rest = config_lib.parse_overrides(argv)
    p = argparse.ArgumentParser(prog="python -m medvl_jax.evaluate",
                                description="Evaluate a trained or converted checkpoint under "
                                            "named, versioned protocols.")
    p.add_argument("--checkpoint", required=True,
                   help="a training workdir or a converted checkpoint directory")
    p.add_argument("--config", default=None,
                   help="configs/<name>.py[:arg] (default: the config saved in the workdir)")
    p.add_argument("--benchmark", default="medsynth",
                   help=f"benchmark name (built in: {', '.join(harness.BUILTIN_BENCHMARKS)}; "
                        f"others from medvl_jax.data.benchmarks)")
    p.add_argument("--protocol", default=None,
                   help=f"protocol name(s), comma-separated, of "
                        f"{', '.join(protocols_lib.PROTOCOLS)} (default: medsynth on MedSynth "
                        f"benchmarks, exact elsewhere)")
    p.add_argument("--baselines", default=",".join(baselines_lib.DEFAULT),
                   help=f"sanity baselines, comma-separated, of "
                        f"{', '.join(baselines_lib.BASELINES)}, or 'off' (default: %(default)s)")
    p.add_argument("--data_dir", default=None, help="where benchmark data lives")
    p.add_argument("--split", default="test", help="data split (default: test)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
    p.add_argument("--out", default=None, help="output directory (default: --checkpoint)")
    args = p.parse_args(rest)
    try:
        if args.config:
            config = config_lib.load_config(args.config, overrides)
        else:
            config = config_from_checkpoint(args.checkpoint, overrides)
        train_cli.validate(config)
        results = evaluate(config, args.checkpoint, split=args.split, out=args.out,
                           benchmark=args.benchmark, protocols=args.protocol,
                           baselines=args.baselines, data_dir=args.data_dir, limit=args.limit)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = results["out"]
    if results.get("contrastive"):
        print(json.dumps({k: v for k, v in results.items()
                          if k not in ("files", "out", "contrastive")}, indent=1))
        print(f"results written to {os.path.join(out, results['files']['summary'])}")
        return 0
    print(harness.format_tables(results))
    files = results["files"]
    print(f"\nresults written to {os.path.join(out, files['summary'])}, "
          f"{os.path.join(out, files['chart'])} and "
          f"{sum(len(v) for v in files['predictions'].values())} prediction files "
          f"(predictions_{args.benchmark}_{args.split}_<protocol>_<condition>.jsonl)")
    return 0
