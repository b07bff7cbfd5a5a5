"""Command line of evaluation: named, versioned protocols on a benchmark, with sanity baselines.

    python -m medvl_jax.evaluate --checkpoint DIR [--config configs/X.py[:arg]] \
        [--benchmark medsynth] [--protocol NAME[,NAME...]] [--baselines no_image,blur,noise]
        [--data_dir DIR] [--benchmark_option KEY=VALUE ...] [--split test] [--limit N]
        [--studies N] [--batch_size N] [--fresh] [--shard K/N]
        [--max_new_tokens N] [--evals] [--out DIR] [--config.k=v ...]

``DIR`` is either

* a training workdir: the parameters of its newest checkpoint under ``DIR/checkpoints`` are
  restored with the training shardings (:func:`medvl_jax.train.restore.restore_params`).
  Without ``--config`` the config saved with that checkpoint is used; a config whose
  ``model`` section is empty (the fine-tune configs) takes the model, tokenizer and image
  fields from the saved one; or
* a converted checkpoint directory (``python -m medvl_jax.convert.from_hf``): used as the
  config's ``init_from`` (:func:`medvl_jax.train.restore.load`), its params evaluated as they
  are (``--config`` is then required).

Generative tasks (sft, dpo, grpo) are evaluated by :mod:`medvl_jax.evaluate.harness`:
``--benchmark`` is ``medsynth`` (every question of ``--studies`` studies of each of the
config's MedSynth sources),
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
    generations_<benchmark>_<split>_<id>.jsonl                every generated answer: a run
                                                              again after a kill generates only
                                                              what is missing (--fresh: all)

A model that does not generate text (contrastive, classify, MAE), or any model with
``--evals``, is evaluated by the config's declared evaluators (``config.evals``, see
:mod:`medvl_jax.evaluate.evaluators`: zero-shot, retrieval, classification, linear probe)
on ``--split``; their tables are printed and written to ``<out>/evals_<split>.json``.

A wrong flag, config, checkpoint or benchmark name is reported as one ``error:`` line with exit
code 2 (``--verbose`` adds the traceback; :mod:`medvl_jax.cli_errors`).
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import sys

import ml_collections

from medvl_jax import cli_errors
from medvl_jax import config as config_lib
from medvl_jax.evaluate import baselines as baselines_lib
from medvl_jax.evaluate import evaluators as evaluators_lib
from medvl_jax.evaluate import generation_store
from medvl_jax.evaluate import harness
from medvl_jax.evaluate import protocols as protocols_lib
from medvl_jax.train import restore, run


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
    converted checkpoint, opened by :func:`medvl_jax.train.restore.load`) with ``config``;
    ``params`` are the task's params (LoRA factors unmerged), ``step`` is None for a
    converted checkpoint."""
    directory = os.path.abspath(directory)
    ckpt = restore.load(directory)
    if not ckpt.is_workdir:  # A converted checkpoint is the config's starting model.
        config, task, _ = run.build(_with(config, init_from=directory))
        return config, task, task.pretrained_params(), None
    saved = ckpt.config.to_dict()
    if "model" in config and not config.model and saved.get("model"):
        data = saved.get("data", {})
        config = _with(config, model=saved.get("model"), tokenizer=saved.get("tokenizer"),
                       data__image_size=data.get("image_size"),
                       data__num_image_tokens=data.get("num_image_tokens"))
    if saved.get("model") is not None and config.get("model"):
        diff = _first_difference(config.model.to_dict(), saved["model"], "model.")
        if diff:
            raise cli_errors.UserError(f"--checkpoint {directory} (step {ckpt.step}) was "
                                       f"trained with another model: {diff}")
    from medvl_jax.parallel import mesh as mesh_lib

    mesh = mesh_lib.make_mesh(dict(config.train.mesh))
    config, task, params, step = restore.restore_params(directory, ckpt.step, config=config,
                                                        mesh=mesh)
    return config, task, params, step


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


def config_from_checkpoint(directory: str, overrides=()) -> ml_collections.ConfigDict:
    """The config saved with the newest checkpoint of training workdir ``directory``, with
    ``overrides`` (``(dotted key, value)`` pairs) applied; locked."""
    directory = os.path.abspath(directory)
    if not restore.is_workdir(directory) or restore.latest_step(directory) is None:
        raise FileNotFoundError(
            f"--checkpoint {directory}: no training checkpoint under "
            f"{os.path.join(directory, restore.CHECKPOINTS)} to take the config from; pass "
            f"--config (required for a converted checkpoint)")
    config, _ = restore.saved_config(directory)
    for key, value in overrides:
        config_lib.apply_override(config, key, value)
    config.lock()
    return config


def _store(out: str, benchmark: str, split: str, checkpoint: str, step, fresh: bool,
           shard: tuple[int, int] | None,
           config: dict | None = None) -> generation_store.GenerationStore:
    """The generations store of this evaluation in ``out``:
    ``generations_<benchmark>_<split>_<id>.jsonl`` (reading every shard's
    ``….shard<k>of<n>.jsonl`` too), or the shard's own file. ``<id>`` is a hash of what the
    answers depend on (checkpoint, step, the config), so another checkpoint or config never
    reuses them. ``fresh`` deletes this evaluation's files first."""
    identity = {"checkpoint": os.path.abspath(checkpoint), "step": step,
                "benchmark": benchmark, "split": split,
                "config": hashlib.sha1(json.dumps(config or {}, sort_keys=True, default=str)
                                       .encode()).hexdigest()}
    tag = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    stem = os.path.join(out, f"generations_{benchmark}_{split}_{tag}")
    shards = sorted(glob.glob(glob.escape(stem) + ".shard*of*.jsonl"))
    if fresh:
        for path in [stem + ".jsonl", *shards]:
            if os.path.isfile(path):
                os.remove(path)
        shards = []
    if shard is None:
        return generation_store.GenerationStore(stem + ".jsonl", identity, shards)
    path = f"{stem}.shard{shard[0]}of{shard[1]}.jsonl"
    return generation_store.GenerationStore(path, identity, [stem + ".jsonl"])


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"1/4"`` as ``(1, 4)`` (shard 1 of 4, counted from 0); None for None."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise cli_errors.UserError(f"--shard {text!r}: expected K/N with 0 <= K < N, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


def parse_options(items) -> dict:
    """``["include_zh=true", "limit=3"]`` as ``{"include_zh": True, "limit": 3}`` (true/false
    become booleans, integers ints, anything else stays text)."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise cli_errors.UserError(f"--benchmark_option {item!r}: expected KEY=VALUE")
        v = value.strip()
        out[key.strip()] = (v.lower() == "true" if v.lower() in ("true", "false")
                            else int(v) if re.fullmatch(r"-?\d+", v) else v)
    return out


def _files(benchmark: str, split: str) -> tuple[str, str, str]:
    stem = f"{benchmark}_{split}"
    return f"eval_{stem}.json", f"predictions_{stem}_{{protocol}}_{{condition}}.jsonl", \
        f"scores_{stem}.png"


def evaluate(config: ml_collections.ConfigDict, directory: str, *, split: str = "test",
             out: str | None = None, benchmark: str = "medsynth",
             protocols: str | list | None = None,
             baselines: str | list = ",".join(baselines_lib.DEFAULT),
             data_dir: str | None = None, limit: int | None = None, studies: int = 100,
             batch_size: int = 64, max_new_tokens: int = 16,
             declared: bool = False, benchmark_options: dict | None = None,
             fresh: bool = False, shard: tuple[int, int] | None = None) -> dict:
    """Evaluates ``directory`` (see :func:`load`) on ``benchmark`` under ``protocols``
    (names, comma-separated or a list; default by benchmark) and ``baselines``, writes the
    summary, prediction and chart files into ``out`` (default: ``directory``) and returns
    the results (predictions included, ``"files"`` naming what was written). ``declared``
    (always for a model that does not generate text): run the config's ``evals`` instead.

    Generated answers are kept in ``<out>/generations_<benchmark>_<split>_<id>.jsonl`` as they are
    made (:func:`_store`): run again after a kill, the evaluation generates only what is
    missing (``fresh`` starts over). ``shard=(k, n)`` generates shard k of n into its own file
    and returns without scoring; the run without ``shard`` then reads every shard's file."""
    # Names are checked before the checkpoint is loaded.
    named = protocols is not None
    plist = protocols_lib.parse_list(protocols if named else
                                     protocols_lib.default_for(benchmark))
    blist = (baselines_lib.parse_list(baselines) if isinstance(baselines, str)
             else baselines_lib.parse_list(",".join(baselines) or "off"))
    harness.check_benchmark(benchmark)
    config, task, params, step = load(config, directory)
    out = os.path.abspath(out or directory)
    if declared or "text" not in task.outputs:
        if named or benchmark != "medsynth":
            raise cli_errors.UserError(
                f"task {task.name!r} does not generate text: --benchmark and --protocol apply "
                f"to tasks whose model answers (sft, dpo, grpo); its evaluators are the "
                f"config's evals")
        return _evaluate_declared(config, task, params, split, out, checkpoint=directory,
                                  step=step)
    summary_name, rows_name, chart_name = _files(benchmark, split)
    examples = harness.load_examples(benchmark, config, split, data_dir, limit, studies,
                                     options=benchmark_options)
    if not examples:
        raise cli_errors.UserError(
            f"nothing to evaluate on {benchmark!r} {split!r}: the config has no MedSynth "
            f"source" if benchmark.startswith("medsynth") else
            f"benchmark {benchmark!r} has no {split!r} examples")
    store = _store(out, benchmark, split, directory, step, fresh, shard,
                   config.to_dict())
    show, close = _progress(f"{benchmark} {split}" + (f" shard {shard[0]}/{shard[1]}"
                                                      if shard else ""))
    try:
        results = harness.evaluate(task, task.model_params(params), examples, plist,
                                   baselines=blist, progress=show, benchmark=benchmark,
                                   split=split, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, data_config=config.data,
                                   store=store, shard=shard)
    finally:
        close()
    if shard is not None:
        return {**results, "out": out, "files": {"generations": store.path}}
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


def _evaluate_declared(config, task, params, split, out, *, checkpoint, step) -> dict:
    """The config's declared evaluators (``config.evals``) on ``split``; their results
    written to ``<out>/evals_<split>.json``."""
    entries = {}
    for name, e in dict(config.get("evals") or {}).items():
        e = e.to_dict() if hasattr(e, "to_dict") else dict(e)
        entries[name] = {**e, "split": split}
    if not entries:
        raise cli_errors.UserError(f"the config declares no evaluators (config.evals) to run on "
                         f"{checkpoint}")
    evals = evaluators_lib.build(_with(config, evals=entries), task)
    results = {name: ev(params) for name, ev in evals.items()}
    os.makedirs(out, exist_ok=True)
    summary_name = f"evals_{split}.json"
    with open(os.path.join(out, summary_name), "w") as f:
        json.dump({"checkpoint": os.path.abspath(checkpoint), "step": step,
                   **{n: {k: v for k, v in r.items() if k != "predictions"}
                      for n, r in results.items()}}, f, indent=1)
    return {"evals": results, "tables": {n: evals[n].format(r) for n, r in results.items()},
            "files": {"summary": summary_name}, "out": out, "checkpoint": checkpoint,
            "step": step}


def _check_flags(args) -> None:
    """Names and numbers of the command line, checked before anything is loaded."""
    protocols_lib.parse_list(args.protocol if args.protocol is not None else
                             protocols_lib.default_for(args.benchmark))
    baselines_lib.parse_list(args.baselines)
    harness.check_benchmark(args.benchmark)
    parse_shard(args.shard)
    for flag in ("limit", "studies", "batch_size", "max_new_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise cli_errors.UserError(f"--{flag}={value}: must be at least 1")


@cli_errors.handle_errors
def main(argv=None) -> int:
    """Command-line entry point (see the module docstring); returns the exit code (2: a user
    error, reported on one line)."""
    with cli_errors.user_input():
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
    p.add_argument("--benchmark_option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the benchmark's reader, e.g. include_zh=true for "
                        "SLAKE's Chinese questions (repeatable; true/false, integers, text)")
    p.add_argument("--split", default="test", help="data split (default: test)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
    p.add_argument("--out", default=None, help="output directory (default: --checkpoint)")
    p.add_argument("--studies", type=int, default=100,
                   help="MedSynth benchmarks: studies per MedSynth source (default: 100)")
    p.add_argument("--batch_size", type=int, default=64, help="prompts per generated batch")
    p.add_argument("--max_new_tokens", type=int, default=16,
                   help="token budget of an answer (a protocol may set its own)")
    p.add_argument("--fresh", action="store_true",
                   help="generate every answer again (default: answers kept in "
                        "<out>/generations_<benchmark>_<split>.jsonl from an earlier or killed "
                        "run of this checkpoint are reused)")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="generate only shard K of N (from 0) into its own generations file "
                        "and stop; run N such processes, then once without --shard to score")
    p.add_argument("--evals", action="store_true",
                   help="run the config's declared evaluators (config.evals) instead of a "
                        "benchmark (always, for a model that does not generate text)")
    cli_errors.add_verbose_flag(p)
    args = p.parse_args(rest)
    with cli_errors.user_input():
        _check_flags(args)
        if args.config:
            config = run.load(args.config, overrides)
        else:
            config = config_from_checkpoint(args.checkpoint, overrides)
            run.validate(config)
    results = evaluate(config, args.checkpoint, split=args.split, out=args.out,
                       benchmark=args.benchmark, protocols=args.protocol,
                       baselines=args.baselines, data_dir=args.data_dir, limit=args.limit,
                       benchmark_options=parse_options(args.benchmark_option),
                       fresh=args.fresh, shard=parse_shard(args.shard),
                       studies=args.studies, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, declared=args.evals)
    out = results["out"]
    if "shard" in results:
        k, n = results["shard"]
        print(f"shard {k}/{n}: generated {results['generated']} answers ({results['cached']} of "
              f"{results['total']} were already there) into {results['files']['generations']}; "
              f"run without --shard to score")
        return 0
    if "evals" in results:
        for table in results["tables"].values():
            print(table)
        print(f"results written to {os.path.join(out, results['files']['summary'])}")
        return 0
    print(harness.format_tables(results))
    files = results["files"]
    print(f"\nresults written to {os.path.join(out, files['summary'])}, "
          f"{os.path.join(out, files['chart'])} and "
          f"{sum(len(v) for v in files['predictions'].values())} prediction files "
          f"(predictions_{args.benchmark}_{args.split}_<protocol>_<condition>.jsonl)")
    return 0
