"""Command line of evaluation: a config's task evaluated on a trained or converted checkpoint.

    python -m medvl_jax.evaluate --config configs/X.py[:arg] --checkpoint DIR \
        [--split test] [--out DIR] [--config.k=v ...]

``DIR`` is either

* a training workdir: its newest checkpoint under ``DIR/checkpoints`` is restored onto the
  task's abstract train state (the sharded layout the training loop uses). A config whose
  ``model`` section is empty (the fine-tune configs) takes the model, tokenizer and image
  fields from the config saved with that checkpoint; or
* a converted checkpoint directory (``python -m medvl_jax.convert.from_hf``): used as the
  config's ``init_from`` (see medvl_jax.tasks.pretrained), its params evaluated as they are.

The task's ``evaluate(params, split)`` runs (greedy, deterministic), the per-question-type
table is printed, and ``<out>/eval_<split>.json`` (the summary) and
``<out>/predictions_<split>.jsonl`` (one answer per line) are written; ``out`` defaults to DIR.
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
    from medvl_jax.train import checkpoint as ckpt_lib
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
    step = None
    if os.path.isdir(ckpt_dir):
        manager = ckpt_lib.CheckpointManager(ckpt_dir, async_save=False)
        step = manager.latest_step()
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


def evaluate(config: ml_collections.ConfigDict, directory: str, *, split: str = "test",
             out: str | None = None) -> dict:
    """Evaluates ``directory`` (see :func:`load`), writes the summary and predictions files
    into ``out`` (default: ``directory``) and returns the results (predictions included)."""
    config, task, params, step = load(config, directory)
    if not hasattr(task, "evaluate"):
        raise ValueError(f"task {config.task!r} has no evaluate()")
    show, close = _progress(split)
    try:
        import inspect

        kwargs = ({"progress": show} if "progress" in inspect.signature(task.evaluate).parameters
                  else {})
        results = task.evaluate(params, split=split, **kwargs)
    finally:
        close()
    if not results:
        raise ValueError(f"nothing to evaluate on {split!r}: the config has no MedSynth source "
                         f"or sft.eval_studies=0")
    out = os.path.abspath(out or directory)
    os.makedirs(out, exist_ok=True)
    summary = {k: v for k, v in results.items() if k != "predictions"}
    summary.update(checkpoint=os.path.abspath(directory), step=step)
    with open(os.path.join(out, f"eval_{split}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, f"predictions_{split}.jsonl"), "w") as f:
        for row in results["predictions"]:
            f.write(json.dumps(row) + "\n")
    return results


def main(argv=None) -> int:
    """Command-line entry point (see the module docstring); returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    overrides, rest = config_lib.parse_overrides(argv)
    p = argparse.ArgumentParser(prog="python -m medvl_jax.evaluate",
                                description="Evaluate a trained or converted checkpoint.")
    p.add_argument("--config", required=True, help="configs/<name>.py[:arg]")
    p.add_argument("--checkpoint", required=True,
                   help="a training workdir or a converted checkpoint directory")
    p.add_argument("--split", default="test", help="data split (default: test)")
    p.add_argument("--out", default=None, help="output directory (default: --checkpoint)")
    args = p.parse_args(rest)
    config = config_lib.load_config(args.config, overrides)
    train_cli.validate(config)
    try:
        results = evaluate(config, args.checkpoint, split=args.split, out=args.out)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    train_cli.print_table(results)
    out = os.path.abspath(args.out or args.checkpoint)
    print(f"results written to {os.path.join(out, f'eval_{args.split}.json')} and "
          f"predictions_{args.split}.jsonl")
    return 0
