"""Evaluators declared in the config, as data: they run during and after training.

    config.evals = {
        "test": {"type": "vqa", "data": {"cxr": <source entry>, ...}, "every": 0, ...},
        "zs":   {"type": "zero_shot", "data": {...}, "classes": {...}},
    }

``data`` holds named source entries of the same form as ``data.sources`` (MedSynth, JSON/JSONL
conversation files, TFDS, pair and label files); an evaluator never reads a dataset a task
names. ``every`` > 0 runs it every that many steps (and at the end); 0 only at the end.
``split`` picks MedSynth studies (and TFDS splits); ``limit`` > 0 keeps the first records of
each source. Types, what each needs from the task's model (``task.outputs``), and their own
fields (defaults in :data:`FIELDS`):

    vqa          text              protocol (names, comma-separated; default "medsynth"),
                                   baselines (sanity conditions: no_image, blur, noise),
                                   compare_start (also answer with the starting model),
                                   batch_size, max_new_tokens
    report       text              as vqa; one report-writing example per study / record, and
                                   corpus report metrics (BLEU, ROUGE-L, CIDEr-D, clinical F1)
    zero_shot    image and text    classes: {label: [absent prompts, present prompts]}:
                 embeddings        ROC-AUC and accuracy per label (prompt ensembles)
    retrieval    image and text    ks: image->text and text->image Recall@K
                 embeddings
    classify     label logits      ROC-AUC and accuracy per label of the task's labels
    linear_probe image features    labels (default: every label of the data), train_split,
                                   train_limit: logistic regression on frozen features

A field a type does not have is an error naming it, and so is a type whose needs the task's
model does not meet. Results are dicts of plain numbers; :meth:`Evaluator.format` prints them.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping

import ml_collections
import numpy as np

COMMON = {"type": "", "data": {}, "split": "test", "limit": 0, "every": 0}
FIELDS = {
    "vqa": {"protocol": "medsynth", "baselines": (), "compare_start": False,
            "batch_size": 64, "max_new_tokens": 16},
    "report": {"protocol": "medsynth", "baselines": (), "compare_start": False,
               "batch_size": 16, "max_new_tokens": 128},
    "zero_shot": {"classes": {}},
    "retrieval": {"ks": (1, 5, 10)},
    "classify": {},
    "linear_probe": {"labels": (), "train_split": "train", "train_limit": 1000},
}
NEEDS = {"vqa": {"text"}, "report": {"text"},
         "zero_shot": {"image_embeddings", "text_embeddings"},
         "retrieval": {"image_embeddings", "text_embeddings"},
         "classify": {"label_logits"}, "linear_probe": {"image_features"}}
TYPES = tuple(FIELDS)


def entry(type: str, data: Mapping, **fields) -> dict:
    """An evaluator entry for ``config.evals`` with the type's defaults (checked)."""
    out = {**COMMON, **FIELDS.get(type, {}), "type": type, "data": dict(data), **fields}
    check_entry("evals.?", out)
    return out


def vqa(sources: Mapping, *, studies: int, **fields) -> dict:
    """A ``vqa`` entry on the questions of ``sources`` (``data.sources``-style entries), with
    ``studies`` MedSynth studies per MedSynth source (conversation sources kept whole)."""
    return entry("vqa", with_studies(sources, studies), **fields)


def image_text(sources: Mapping, *, studies: int, probe_studies: int, classes: Mapping,
               **fields) -> dict:
    """The evaluators of an image-text model on ``sources`` (``studies`` MedSynth studies
    each): ``zero_shot`` on ``classes`` ({label: [absent prompts, present prompts]}),
    ``retrieval``, and a ``linear_probe`` on the same labels fitted on ``probe_studies``
    training studies (none when 0)."""
    data = with_studies(sources, studies)
    out = {"zero_shot": entry("zero_shot", data, classes=dict(classes), **fields),
           "retrieval": entry("retrieval", data, **fields)}
    if probe_studies:
        out["linear_probe"] = entry("linear_probe", data, labels=tuple(sorted(classes)),
                                    train_limit=int(probe_studies), **fields)
    return out


def with_studies(sources: Mapping, studies: int) -> dict:
    """``sources`` with each MedSynth entry's ``num_studies`` set to ``studies``."""
    return {name: {**dict(spec), "num_studies": int(studies)} if spec["kind"] == "medsynth"
            else dict(spec) for name, spec in dict(sources).items()}


def check_entry(name: str, e: Mapping) -> None:
    """Raises ValueError/KeyError naming the field of an evaluator entry that is wrong."""
    kind = e.get("type")
    if kind not in FIELDS:
        raise ValueError(f"config.{name}.type must be one of {list(TYPES)}, got {kind!r}")
    allowed = {**COMMON, **FIELDS[kind]}
    for key in e:
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=2)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"unknown config key 'config.{name}.{key}' for a {kind} "
                           f"evaluator{hint}")
    if not e.get("data"):
        raise ValueError(f"config.{name}.data is empty: name the sources to evaluate on")
    if int(e.get("every", 0)) < 0:
        raise ValueError(f"config.{name}.every must be >= 0")


@dataclasses.dataclass
class Evaluator:
    """One declared evaluator bound to a task: ``evaluator(params) -> results``."""
    name: str
    spec: dict
    task: Any

    @property
    def every(self) -> int:
        return int(self.spec["every"])

    @property
    def type(self) -> str:
        return self.spec["type"]

    def __call__(self, params, *, progress=None) -> dict:
        """Results of the task's raw ``params`` (LoRA factors merged here)."""
        model_params = self.task.model_params(params)
        run = {"vqa": _run_generative, "report": _run_generative, "zero_shot": _run_zero_shot,
               "retrieval": _run_retrieval, "classify": _run_classify,
               "linear_probe": _run_linear_probe}[self.type]
        out = run(self, model_params, params, progress)
        return {"type": self.type, "split": self.spec["split"], **out}

    def format(self, results: Mapping) -> str:
        """The results as a printed table."""
        return {"vqa": _format_generative, "report": _format_generative,
                "zero_shot": _format_per_label, "retrieval": _format_retrieval,
                "classify": _format_per_label,
                "linear_probe": _format_per_label}[self.type](self.name, results)


def build(config: ml_collections.ConfigDict, task) -> dict[str, Evaluator]:
    """The evaluators of ``config.evals`` for ``task``, checked: unknown types and fields,
    and types whose needs the task's model does not meet, are errors naming the entry."""
    out = {}
    for name, e in sorted(dict(config.get("evals") or {}).items()):
        e = e.to_dict() if hasattr(e, "to_dict") else dict(e)
        check_entry(f"evals.{name}", e)
        spec = {**COMMON, **FIELDS[e["type"]], **e}
        missing = NEEDS[spec["type"]] - set(task.outputs)
        if missing:
            raise ValueError(f"config.evals.{name} is a {spec['type']} evaluator, which needs "
                             f"{sorted(missing)} from the model; task {task.name!r} gives "
                             f"{sorted(task.outputs) or 'nothing'}")
        out[name] = Evaluator(name, spec, task)
    return out


# --------------------------------------------------------------------------------------------
# Generated answers: vqa and report.
# --------------------------------------------------------------------------------------------

def examples(ev: Evaluator) -> list[dict]:
    """The evaluator's examples (questions, or report prompts)."""
    from medvl_jax.data import pipeline

    s = ev.spec
    make = pipeline.report_examples if ev.type == "report" else pipeline.question_examples
    return make(s["data"], s["split"], limit=int(s["limit"]))


def _protocols(spec) -> list:
    from medvl_jax.evaluate import protocols

    p = spec["protocol"]
    return protocols.parse_list(p if isinstance(p, str) else ",".join(p))


def _run_generative(ev: Evaluator, model_params, params, progress) -> dict:
    from medvl_jax.evaluate import harness

    s = ev.spec
    exs = examples(ev)
    if not exs:
        raise ValueError(f"evals.{ev.name}: no examples in its data ({sorted(s['data'])})")
    kw = dict(batch_size=int(s["batch_size"]), max_new_tokens=int(s["max_new_tokens"]),
              data_config=ev.task.config.data)
    protocols = _protocols(s)
    res = harness.evaluate(ev.task, model_params, exs, protocols,
                           baselines=tuple(s["baselines"]), progress=progress,
                           benchmark=ev.name, split=s["split"], **kw)
    first = protocols[0].name
    real = res["protocols"][first]["conditions"]["real"]
    out = {"protocol": first, "per_type": real["per_type"], "overall": real["overall"],
           "num_questions": real["num_questions"], "protocols": res["protocols"],
           "conditions": res["conditions"],
           "predictions": res["predictions"][first]["real"]}
    if "report_metrics" in real:
        out["report_metrics"] = real["report_metrics"]
    if s["compare_start"]:
        ref = ev.task.reference_params(params)
        if ref is None:
            raise ValueError(f"evals.{ev.name}.compare_start: task {ev.task.name!r} has no "
                             f"starting model to compare with")
        before = harness.evaluate(ev.task, ref, exs, protocols[:1], benchmark=ev.name,
                                  split=s["split"], **kw)
        b = before["protocols"][first]["conditions"]["real"]
        out["before"] = {"per_type": b["per_type"], "overall": b["overall"]}
    return out


def _format_generative(name: str, r: Mapping) -> str:
    conds = [c for c in r["conditions"] if c != "real"]
    entry = r["protocols"][r["protocol"]]["conditions"]
    cols = ["before"] * ("before" in r) + ["score"] + ["change"] * ("before" in r) + conds
    lines = [f"\n{name}: {r['split']}, {r['num_questions']} questions, protocol "
             f"{r['protocol']} (scores in %)",
             f"{'question type':<18}{'n':>6}" + "".join(f"{c:>10}" for c in cols)]

    def row(label, n, get):
        cells = []
        for c in cols:
            if c == "change":
                cells.append(f"{100 * (get('real') - get('before')):>+10.1f}")
            else:
                cells.append(f"{100 * get('real' if c == 'score' else c):>10.1f}")
        return f"{label:<18}{n:>6}" + "".join(cells)

    for t, v in r["per_type"].items():
        lines.append(row(t, v["n"], lambda c, t=t: (
            r["before"]["per_type"][t]["score"] if c == "before"
            else entry[c]["per_type"][t]["score"])))
    lines.append(row("overall", r["num_questions"], lambda c: (
        r["before"]["overall"] if c == "before" else entry[c]["overall"])))
    for metric, value in r.get("report_metrics", {}).items():
        lines.append(f"  {metric:<22}{value:>10.3f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Images: zero-shot, retrieval, classification, linear probe.
# --------------------------------------------------------------------------------------------

def _image_set(ev: Evaluator, split: str | None = None, studies: int | None = None) -> dict:
    """The evaluator's images (``studies``: that many records per source instead, MedSynth
    studies included)."""
    from medvl_jax.data import pairs

    s = ev.spec
    data = s["data"] if studies is None else with_studies(s["data"], studies)
    data = pairs.eval_set(ev.task.eval_image_config(), data, split or s["split"],
                          int(s["limit"] if studies is None else studies))
    if not len(data["texts"]):
        raise ValueError(f"evals.{ev.name}: no images in its data ({sorted(s['data'])})")
    return data


def _auc_row(scores: np.ndarray, y: np.ndarray, predicted: np.ndarray) -> dict:
    """AUC (NaN without both classes) and accuracy over the known (y >= 0) entries."""
    from medvl_jax.evaluate import retrieval

    known = y >= 0
    y, scores, predicted = y[known].astype(bool), scores[known], predicted[known]
    both = 0 < y.sum() < len(y)
    return {"auc": float(retrieval.roc_auc(scores, y)) if both else float("nan"),
            "accuracy": float(np.mean(predicted == y)) if len(y) else float("nan"),
            "positives": int(y.sum()), "n": int(len(y))}


def _means(per_label: dict) -> dict:
    aucs = [r["auc"] for r in per_label.values() if not np.isnan(r["auc"])]
    accs = [r["accuracy"] for r in per_label.values() if not np.isnan(r["accuracy"])]
    return {"mean_auc": float(np.mean(aucs)) if aucs else float("nan"),
            "mean_accuracy": float(np.mean(accs)) if accs else float("nan")}


def _run_zero_shot(ev: Evaluator, model_params, params, progress) -> dict:
    from medvl_jax.evaluate import retrieval

    classes = dict(ev.spec["classes"])
    if not classes:
        raise ValueError(f"evals.{ev.name}.classes is empty: give {{label: [absent prompts, "
                         f"present prompts]}} (MedSynth's: medvl_jax.data.medsynth.prompts)")
    data = _image_set(ev)
    img = ev.task.image_embeddings(model_params, data["images"])
    per_label = {}
    for label, (absent, present) in sorted(classes.items()):
        if label not in data["labels"]:
            raise ValueError(f"evals.{ev.name}.classes.{label}: the data has no label "
                             f"{label!r} (it has {sorted(data['labels'])})")
        embs = [ev.task.text_embeddings(model_params, list(p)) for p in (absent, present)]
        scores, pred = retrieval.zero_shot_classify(img, embs)
        per_label[label] = _auc_row(scores[:, 1] - scores[:, 0], data["labels"][label],
                                    pred.astype(bool))
    return {"n": len(img), "per_label": per_label, **_means(per_label)}


def _run_retrieval(ev: Evaluator, model_params, params, progress) -> dict:
    from medvl_jax.evaluate import retrieval

    data = _image_set(ev)
    keep = [i for i, t in enumerate(data["texts"]) if t]
    if len(keep) < 2:
        raise ValueError(f"evals.{ev.name}: retrieval needs image-text pairs; its data has "
                         f"{len(keep)}")
    img = ev.task.image_embeddings(model_params, data["images"][keep])
    txt = ev.task.text_embeddings(model_params, [data["texts"][i] for i in keep])
    return {"n": len(keep), **retrieval.recall_at_k(img @ txt.T, tuple(ev.spec["ks"]))}


def _format_retrieval(name: str, r: Mapping) -> str:
    ks = sorted(int(k.split("@")[1]) for k in r if k.startswith("i2t@"))
    lines = [f"\n{name}: {r['split']}, {r['n']} image-text pairs"]
    for direction in ("i2t", "t2i"):
        lines.append(f"{direction} recall  " + "  ".join(
            f"R@{k} {100 * r[f'{direction}@{k}']:.1f}%" for k in ks))
    return "\n".join(lines)


def _run_classify(ev: Evaluator, model_params, params, progress) -> dict:
    data = _image_set(ev)
    logits = ev.task.label_logits(model_params, data["images"])
    per_label = {}
    for i, label in enumerate(ev.task.labels):
        if label in data["labels"]:
            per_label[label] = _auc_row(logits[:, i], data["labels"][label], logits[:, i] > 0)
    if not per_label:
        raise ValueError(f"evals.{ev.name}: its data states none of the task's labels "
                         f"{list(ev.task.labels)}")
    return {"n": len(logits), "per_label": per_label, **_means(per_label)}


def _run_linear_probe(ev: Evaluator, model_params, params, progress) -> dict:
    from medvl_jax.evaluate import retrieval

    s = ev.spec
    test = _image_set(ev)
    train = _image_set(ev, split=s["train_split"], studies=int(s["train_limit"]))
    fx = ev.task.image_features(model_params, train["images"])
    vx = ev.task.image_features(model_params, test["images"])
    labels = list(s["labels"]) or sorted(set(test["labels"]) & set(train["labels"]))
    per_label = {}
    for label in labels:
        if label not in test["labels"] or label not in train["labels"]:
            raise ValueError(f"evals.{ev.name}.labels: {label!r} is not a label of its data")
        ty, vy = train["labels"][label], test["labels"][label]
        tk, vk = ty >= 0, vy >= 0
        if not (0 < ty[tk].sum() < tk.sum() and 0 < vy[vk].sum() < vk.sum()):
            continue  # The probe needs both classes in train and in test.
        res = retrieval.linear_probe(fx[tk], ty[tk].astype(np.int32), vx[vk],
                                     vy[vk].astype(np.int32), num_classes=2)
        per_label[label] = {"auc": float(res["auc"]), "accuracy": float(res["accuracy"]),
                            "train_accuracy": float(res["train_accuracy"]),
                            "positives": int(vy[vk].sum()), "n": int(vk.sum())}
    return {"n": len(vx), "train_n": len(fx), "per_label": per_label, **_means(per_label)}


def _format_per_label(name: str, r: Mapping) -> str:
    lines = [f"\n{name}: {r['type']} on {r['split']}, {r['n']} images",
             f"{'label':<22}{'pos':>6}{'AUC':>8}{'acc':>8}"]
    for label, row in r["per_label"].items():
        lines.append(f"{label:<22}{row['positives']:>6}{row['auc']:>8.3f}"
                     f"{100 * row['accuracy']:>7.1f}%")
    lines.append(f"{'mean':<22}{'':>6}{r['mean_auc']:>8.3f}{100 * r['mean_accuracy']:>7.1f}%")
    return "\n".join(lines)
