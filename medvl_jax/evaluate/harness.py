"""Running evaluation protocols over a benchmark with a generative task (SFT, DPO, GRPO).

    examples = harness.load_examples("medsynth", config, "test")
    results = harness.evaluate(task, model_params, examples,
                               protocols.parse_list("exact,llava_med"), batch_size=64,
                               max_new_tokens=16, data_config=config.data,
                               baselines=("no_image", "blur", "noise"))
    print(harness.format_tables(results))

For each condition (``real``, then each sanity baseline of :mod:`baselines`) and each
protocol, every example is prompted as the protocol says, answered by batched greedy
generation with the task's KV-cache sampler, parsed and scored. Generations are shared: the
answer to one prompt under one condition and token budget is generated once, so protocols
that add no instruction (exact, medsynth, llava_med, llava_med_strict, token_f1) cost one
generation between them. Batches have ``batch_size`` rows (the last one
padded), so each token budget compiles the decode once. Everything is deterministic.

With a :class:`~medvl_jax.evaluate.generation_store.GenerationStore`, generations are kept on
disk batch by batch: a killed evaluation run again generates only what is missing, and
``shard=(k, n)`` splits the generations over processes whose stores a last run reads.

Results: per protocol (stamped with its name and version) and condition, a per-question-type
table, the overall mean, corpus report metrics for report questions, and one prediction row
per example.
"""
from __future__ import annotations

import json
from typing import Callable, Sequence

import numpy as np

from medvl_jax.evaluate import baselines as baselines_lib
from medvl_jax.evaluate import generation_store
from medvl_jax.evaluate import protocols as protocols_lib

# Benchmarks built from the config's MedSynth sources (the other names come from
# medvl_jax.data.benchmarks).
BUILTIN_BENCHMARKS = {
    "medsynth": "every MedSynth question of the config's MedSynth sources "
                "(--studies studies per source)",
    "medsynth_report": "report generation on the same studies ('Write the radiology report.')",
}
REPORT_PROMPT = "Write the radiology report."  # As medvl_jax.data.pipeline.REPORT_PROMPT.


def medsynth_sources(config, studies: int) -> dict:
    """The MedSynth entries of ``config.data.sources`` with ``studies`` studies each."""
    from medvl_jax.evaluate import evaluators

    return evaluators.with_studies({n: s for n, s in dict(config.data.sources).items()
                                    if s["kind"] == "medsynth"}, studies)


def _external_benchmarks():
    """medvl_jax.data.benchmarks, or None where it is not installed."""
    try:
        from medvl_jax.data import benchmarks
    except ModuleNotFoundError as e:
        if e.name != "medvl_jax.data.benchmarks":
            raise
        return None
    return benchmarks


def known_benchmarks() -> list[str]:
    """Names accepted by :func:`load_examples`."""
    ext = _external_benchmarks()
    return list(BUILTIN_BENCHMARKS) + sorted(set(ext.BENCHMARKS if ext else ())
                                             - set(BUILTIN_BENCHMARKS))


def check_benchmark(name: str) -> None:
    """Raises a ValueError listing the known benchmarks if ``name`` is not one."""
    if name not in known_benchmarks():
        raise ValueError(f"unknown benchmark {name!r}; known benchmarks: "
                         f"{', '.join(known_benchmarks())}")


def load_examples(benchmark: str, config, split: str = "test", data_dir: str | None = None,
                  limit: int | None = None, studies: int = 100,
                  options: dict | None = None) -> list[dict]:
    """The examples of ``benchmark`` (first ``limit`` of them if given), each with
    ``meta["benchmark"]`` set. MedSynth benchmarks come from the config's MedSynth sources
    (``studies`` studies each); other names from
    :func:`medvl_jax.data.benchmarks.load_benchmark` (``data_dir``, reader ``options`` such
    as SLAKE's ``include_zh``)."""
    from medvl_jax.data import pipeline

    check_benchmark(benchmark)
    if benchmark == "medsynth":
        examples = pipeline.question_examples(medsynth_sources(config, studies), split)
    elif benchmark == "medsynth_report":
        examples = pipeline.report_examples(medsynth_sources(config, studies), split)
    else:
        from medvl_jax.data import benchmarks

        examples = benchmarks.load_benchmark(benchmark, data_dir, split, **(options or {}))
    if limit is not None:
        examples = examples[:int(limit)]
    out = []
    for ex in examples:
        out.append({**ex, "meta": {**ex["meta"], "benchmark": benchmark}})
    return out


def _prompt_key(example: dict) -> str:
    return json.dumps([(m.get("role"), m.get("content")) for m in example["messages"]])


def _text_view(example: dict, condition: str) -> dict:
    """``example`` under ``condition`` as far as its text goes (images untouched)."""
    return baselines_lib.apply(example, condition, None) if condition == "no_image" else example


def evaluate(task, model_params, examples: Sequence[dict],
             protocols: Sequence[protocols_lib.Protocol], *, batch_size: int,
             max_new_tokens: int, data_config, baselines: Sequence[str] = (),
             progress: Callable[[int, int], None] | None = None,
             benchmark: str = "", split: str = "",
             store: generation_store.GenerationStore | None = None,
             shard: tuple[int, int] | None = None) -> dict:
    """Scores ``examples`` under each protocol, with the real images and under each
    baseline; see the module docstring. ``task`` generates the answers
    (``task.generate_texts``) from plain ``model_params``, ``batch_size`` rows at a time, up to
    ``max_new_tokens`` tokens unless a protocol sets its own budget; ``data_config`` (the
    config's data section) says how baselines read images. ``progress(done, total)`` is
    called after each generated batch.

    With ``data_config.skip_bad_examples`` examples whose images cannot be read are left out
    and counted in ``skipped_examples`` (see :func:`_readable`).

    ``store`` (:class:`~generation_store.GenerationStore`): generations found there are not
    generated again, and every new batch is added to it as soon as it is generated, so a
    killed evaluation run again continues where it stopped. ``shard=(k, n)``: generate only
    every n-th of the generations still missing, starting at the k-th, into ``store`` and
    return ``{"shard", "generated", "cached", "total"}`` without scoring; a later run without
    ``shard`` (reading all shards' stores) scores everything and generates nothing.

    Returns ``{"benchmark", "split", "num_examples", "skipped_examples", "conditions",
    "protocols": {name: {"protocol", "version", "description", "conditions": {condition:
    {"per_type", "overall", "num_questions"[, "report_metrics"]}}}}, "predictions": {name:
    {condition: [row, ...]}}}``; a row is ``{"id", "type", "prediction" (generated), "parsed",
    "answer", "score", "protocol", "version", "condition"}``.
    """
    examples, skipped = _readable(list(examples), data_config)
    if not examples:
        raise ValueError(f"no examples to evaluate (benchmark {benchmark!r}, split {split!r})")
    protocols = list(protocols)
    if len({p.name for p in protocols}) != len(protocols):
        raise ValueError(f"protocol names repeat: {[p.tag for p in protocols]}")
    conditions = [baselines_lib.REAL] + [b for b in baselines if b != baselines_lib.REAL]
    for c in conditions:
        if c not in baselines_lib.CONDITIONS:
            raise ValueError(f"unknown condition {c!r}; known: "
                             f"{', '.join(baselines_lib.CONDITIONS)}")
    if "text" not in task.outputs:
        raise ValueError(f"task {task.name!r} does not generate text: protocols apply to "
                         f"tasks whose model answers (sft, dpo, grpo)")
    bs, default_budget = int(batch_size), int(max_new_tokens)

    # Plan: the distinct generations, in a fixed order, grouped per (condition, protocol)
    # and token budget so that every batch shares one shape.
    def budget(p, ex):
        n = p.decoding.for_type(ex["meta"]["question_type"])
        return default_budget if n is None else int(n)

    keys: dict[tuple[str, str], list[tuple]] = {}  # (condition, protocol) -> one per example
    jobs: list[tuple[str, int, list[tuple]]] = []  # (condition, budget, [(key, index, p)])
    seen = set()
    texts: dict[tuple, str] = {}
    stored: dict[tuple, str] = {}  # key -> its store key
    total = 0
    for cond in conditions:
        for p in protocols:
            groups: dict[int, list[tuple]] = {}
            for i, ex in enumerate(examples):
                prompted = p.prompt(_text_view(ex, cond))
                key = (i, _prompt_key(prompted), cond, budget(p, ex))
                keys.setdefault((cond, p.name), []).append(key)
                if key in seen:
                    continue
                seen.add(key)
                total += 1
                if store is not None:
                    stored[key] = generation_store.key_of(str(ex["id"]), key[1], cond, key[3])
                    if stored[key] in store:
                        texts[key] = store.get(stored[key])
                        continue
                groups.setdefault(key[3], []).append((key, i, p))
            jobs.extend((cond, n_new, items) for n_new, items in groups.items())
    cached = len(texts)
    if shard is not None:
        k_shard, n_shards = int(shard[0]), int(shard[1])
        if store is None or not 0 <= k_shard < n_shards:
            raise ValueError(f"shard {shard!r}: needs a store and 0 <= k < n")
        flat = [(cond, n_new, item) for cond, n_new, items in jobs for item in items]
        mine = flat[k_shard::n_shards]
        jobs = []
        for cond, n_new, item in mine:
            if jobs and jobs[-1][0] == cond and jobs[-1][1] == n_new:
                jobs[-1][2].append(item)
            else:
                jobs.append((cond, n_new, [item]))
    batches = []
    for cond, n_new, items in jobs:
        for start in range(0, len(items), bs):
            batches.append((cond, n_new, items[start:start + bs]))

    for k, (cond, n_new, items) in enumerate(batches):
        chunk = [p.prompt(baselines_lib.apply(examples[i], cond, data_config))
                 for _, i, p in items]
        answers = task.generate_texts(model_params, chunk, batch_size=bs, max_new_tokens=n_new)
        for (key, _, _), text in zip(items, answers):
            texts[key] = text
        if store is not None:
            store.add((stored[key], str(examples[i]["id"]), text)
                      for (key, i, _), text in zip(items, answers))
        if progress is not None:
            progress(k + 1, len(batches))
    if shard is not None:
        return {"benchmark": benchmark, "split": split, "shard": [k_shard, n_shards],
                "generated": sum(len(items) for _, _, items in batches), "cached": cached,
                "total": total}

    out = {"benchmark": benchmark, "split": split, "num_examples": len(examples),
           "skipped_examples": skipped, "conditions": conditions, "protocols": {},
           "predictions": {},
           "generations": {"total": total, "cached": cached, "generated": total - cached}}
    for p in protocols:
        entry = {**p.stamp(), "description": p.description, "conditions": {}}
        out["predictions"][p.name] = {}
        for cond in conditions:
            rows = []
            for ex, key in zip(examples, keys[(cond, p.name)]):
                parsed, score = p.evaluate(texts[key], ex)
                rows.append({"id": ex["id"], "type": p.category(ex),
                             "prediction": texts[key], "parsed": parsed,
                             "answer": ex["meta"]["answer"], "score": float(score),
                             **p.stamp(), "condition": cond})
            entry["conditions"][cond] = summarise(rows, examples, p)
            out["predictions"][p.name][cond] = rows
        out["protocols"][p.name] = entry
    return out


def _readable(examples: list[dict], data_config) -> tuple[list[dict], int]:
    """With ``data.skip_bad_examples``: the examples whose images read, through the training
    pipeline's guard (each bad one printed with its record, counted, the ceiling
    ``data.max_skip_fraction`` applied), and how many were dropped. Without it: all of them (a
    bad image is then an error naming its record when its batch is built)."""
    if data_config is None or not data_config.get("skip_bad_examples"):
        return examples, 0
    from medvl_jax.data import pipeline
    from medvl_jax.data.errors import SkipCounter, guarded

    skips = SkipCounter(float(data_config.get("max_skip_fraction", 1.0)))

    def check(ex, rng):
        pipeline.decode_images(ex, data_config)
        return ex

    check = guarded(check, skips, first_stage=True)
    kept = [ex for ex in examples if check(ex, None) is not None]
    if skips.total:
        print(f"evaluation: {skips.summary()}")
    return kept, len(examples) - len(kept)


def summarise(rows: Sequence[dict], examples: Sequence[dict],
              protocol: protocols_lib.Protocol | None = None) -> dict:
    """Per-question-type means, the overall mean and (for report questions) the corpus report
    metrics of ``protocol`` (its :class:`~protocols.ReportScoring`; the default one when
    None) of one protocol under one condition."""
    per_type: dict[str, list[float]] = {}
    for r in rows:
        per_type.setdefault(r["type"], []).append(r["score"])
    table = {"per_type": {t: {"score": float(np.mean(v)), "n": len(v)}
                          for t, v in sorted(per_type.items())},
             "overall": float(np.mean([r["score"] for r in rows])),
             "num_questions": len(rows)}
    reports = [(r, ex) for r, ex in zip(rows, examples)
               if ex["meta"]["question_type"] == protocols_lib.REPORT]
    if reports:
        scoring = (protocol.report if protocol is not None else protocols_lib.DEFAULT_REPORT)
        table["report_metrics"] = scoring.corpus(
            [r["prediction"] for r, _ in reports],
            [str(ex["meta"]["answer"]) for _, ex in reports], [ex for _, ex in reports])
    return table


def format_tables(results: dict) -> str:
    """One table per protocol: question types down, the real score and each baseline across
    (percentages), then report metrics if any."""
    conds = results["conditions"]
    lines = []
    for name, entry in results["protocols"].items():
        first = entry["conditions"][conds[0]]
        lines.append(f"\n{results['benchmark']} {results['split']}, "
                     f"{first['num_questions']} questions; protocol {name} "
                     f"(version {entry['version']})")
        lines.append(f"{'question type':<18}{'n':>6}" + "".join(f"{c:>10}" for c in conds))
        for qtype, row in first["per_type"].items():
            cells = "".join(f"{100 * entry['conditions'][c]['per_type'][qtype]['score']:>9.1f}%"
                            for c in conds)
            lines.append(f"{qtype:<18}{row['n']:>6}{cells}")
        cells = "".join(f"{100 * entry['conditions'][c]['overall']:>9.1f}%" for c in conds)
        lines.append(f"{'overall':<18}{first['num_questions']:>6}{cells}")
        if "report_metrics" in first:
            for metric in first["report_metrics"]:
                cells = "".join(f"{entry['conditions'][c]['report_metrics'][metric]:>10.3f}"
                                for c in conds)
                lines.append(f"  {metric:<22}{cells}")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    """A PNG bar chart: per protocol, the score of each question type and overall, one bar
    per condition (real first, then the baselines)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    conds = results["conditions"]
    names = list(results["protocols"])
    fig = Figure(figsize=(max(6.0, 1.2 * (len(next(iter(
        results["protocols"].values()))["conditions"][conds[0]]["per_type"]) + 1)),
        3.2 * len(names)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(names), 1, squeeze=False)[:, 0]
    width = 0.8 / len(conds)
    for ax, name in zip(axes, names):
        entry = results["protocols"][name]
        groups = list(entry["conditions"][conds[0]]["per_type"]) + ["overall"]
        x = np.arange(len(groups))
        for j, c in enumerate(conds):
            table = entry["conditions"][c]
            values = [100 * table["per_type"][g]["score"] for g in groups[:-1]]
            values.append(100 * table["overall"])
            ax.bar(x + (j - (len(conds) - 1) / 2) * width, values, width, label=c)
        ax.set_xticks(x)
        ax.set_xticklabels(groups, rotation=20)
        ax.set_ylim(0, 100)
        ax.set_ylabel("score (%)")
        ax.set_title(f"{results['benchmark']} {results['split']}: {name} "
                     f"(version {entry['version']})")
        ax.legend(fontsize="small", ncol=len(conds))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
