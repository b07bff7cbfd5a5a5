"""Record sources and their conversion to the common example form.

Every source is a random-access sequence (``__len__`` / ``__getitem__``), which is what
``grain.MapDataset.source`` takes. Each source comes with a converter that turns one of its
records into an *example*, the one form the rest of the pipeline understands::

    {"id": str,
     "images": [np.ndarray | str, ...],   # decoded arrays, or paths decoded later by readers
     "messages": [{"role": "user" | "assistant" | "system", "content": str}, ...],
     "meta": {"question_type": str, "answer": str, "modality": str, "source": str, ...}}

User turns mark where each image goes with the placeholder ``<image>``.

Sources here:

* :class:`ConversationFile` — JSON / JSONL files in the LLaVA-Med conversation format or the
  Med-R1 problem format, images resolved relative to a root directory;
* :func:`tfds_source` — any TFDS dataset prepared on disk, read through
  ``builder.as_data_source`` (array_record; no TensorFlow);
* MedSynth, through :func:`medsynth_to_example` on the records of
  :class:`medvl_jax.data.medsynth.MedSynthSource` (or of its TFDS build).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
from typing import Any, Callable, Sequence

import numpy as np

from medvl_jax.data.errors import DataError

IMAGE_PLACEHOLDER = "<image>"

_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system"}
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


# --------------------------------------------------------------------------------------------
# JSON / JSONL conversation files.
# --------------------------------------------------------------------------------------------

def load_json(path: str):
    """The parsed content of a JSON file; a missing file or invalid JSON is a DataError."""
    if not os.path.isfile(path):
        raise DataError("file not found", where=path, reason="missing")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON at line {e.lineno} ({e.msg})", where=path,
                        reason="bad_json") from None


def read_json_records(path: str) -> list[tuple[str, dict]]:
    """Reads a .json list or a .jsonl file; returns (where, record) pairs.

    ``where`` is ``file[index]`` for a JSON list and ``file:line`` for JSONL, the form every
    error about that record uses.
    """
    if not path.endswith(".jsonl"):
        data = load_json(path)
        if not isinstance(data, list):
            raise DataError("expected a JSON list of records", where=path, reason="bad_json")
        return [(f"{path}[{i}]", rec) for i, rec in enumerate(data)]
    if not os.path.isfile(path):
        raise DataError("file not found", where=path, reason="missing")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON ({e.msg})", where=f"{path}:{lineno}",
                            reason="bad_json") from None
        out.append((f"{path}:{lineno}", rec))
    return out


def image_path(root: str, rel, where: str, *, allow_outside: bool = False) -> str:
    """``rel`` (a record's image path) joined to ``root``.

    A path that leaves ``root`` (absolute, or climbing out with ``..``) is a DataError unless
    ``allow_outside`` (the source's ``allow_outside_root``): a dataset file should not be able
    to make the trainer read anywhere on the machine. The check is on the path's text; links
    inside ``root`` are followed as the file system says.
    """
    if not isinstance(rel, str) or not rel:
        raise DataError(f"image path must be a non-empty string, got {rel!r}", where=where,
                        reason="bad_record")
    path = os.path.join(root, rel)
    if not allow_outside:
        top = os.path.abspath(root)
        if os.path.isabs(rel) or os.path.commonpath([top, os.path.abspath(path)]) != top:
            raise DataError(f"image path {rel!r} leaves image_root {root!r}; set "
                            f"allow_outside_root=True on the source to allow it", where=where,
                            reason="image_path")
    return path


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def detect_format(record: dict) -> str:
    """Returns "llava" for LLaVA-Med conversations and "med_r1" for Med-R1 problems."""
    if "conversations" in record:
        return "llava"
    if "problem" in record and "solution" in record:
        return "med_r1"
    raise ValueError("record has neither 'conversations' (LLaVA-Med) nor 'problem'/'solution' "
                     f"(Med-R1); keys: {sorted(record)}")


def strip_answer_tags(text: str) -> str:
    """The answer inside ``<answer>…</answer>`` if present, else the stripped text."""
    m = _ANSWER_TAG.search(text)
    return (m.group(1) if m else text).strip()


def _llava_example(rec: dict, where: str, images: list[str]) -> dict:
    turns = rec["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataError("'conversations' must be a non-empty list", where=where,
                        reason="bad_record")
    messages = []
    for t in turns:
        role = _LLAVA_ROLES.get(str(t.get("from", "")).lower()) if isinstance(t, dict) else None
        if role is None or not isinstance(t.get("value"), str):
            raise DataError(f"bad turn {t!r}: expected {{'from': human|gpt|system, "
                            "'value': str}", where=where, reason="bad_record")
        messages.append({"role": role, "content": t["value"]})
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    return {"messages": messages,
            "meta": {"answer": answers[-1].strip() if answers else "",
                     "question_type": str(rec.get("answer_type", rec.get("question_type", ""))),
                     "modality": str(rec.get("modality", ""))}}


def med_r1_example(rec: dict, where: str, images: list[str]) -> dict:
    """A Med-R1 record (``problem`` / ``solution``) → messages and meta (no id, images)."""
    problem, solution = rec["problem"], rec["solution"]
    if not isinstance(problem, str) or not isinstance(solution, str):
        raise DataError("'problem' and 'solution' must be strings", where=where,
                        reason="bad_record")
    if not strip_answer_tags(solution):
        raise DataError(f"empty answer in 'solution' {solution!r}", where=where,
                        reason="empty_answer")
    # Med-R1 problems carry no placeholder: the images go first, one placeholder each.
    if IMAGE_PLACEHOLDER not in problem:
        problem = "".join(IMAGE_PLACEHOLDER + "\n" for _ in images) + problem
    return {"messages": [{"role": "user", "content": problem},
                         {"role": "assistant", "content": solution}],
            "meta": {"answer": strip_answer_tags(solution),
                     "question_type": str(rec.get("question_type", rec.get("answer_type", ""))),
                     "modality": str(rec.get("modality", rec.get("modality_type", "")))}}


class ConversationFile:
    """Examples from a LLaVA-Med (``conversations``) or Med-R1 (``problem``/``solution``) file.

    Args:
      path: a ``.json`` file holding a list of records, or a ``.jsonl`` file, one per line.
      image_root: directory that relative image paths are resolved against (default: the
        file's directory); paths may not leave it (see :func:`image_path`) unless
        ``allow_outside_root``.
      format: "llava", "med_r1" or "auto" (decided per record).

    The file is parsed and every record checked when the source is built, so a malformed record
    fails at start-up with its file and line, not mid-epoch. Images are decoded later, by the
    pipeline, so a missing or corrupt image is reported when its example is read.
    """

    def __init__(self, path: str, image_root: str | None = None, format: str = "auto", *,
                 allow_outside_root: bool = False):
        if format not in ("auto", "llava", "med_r1"):
            raise ValueError(f"format must be auto, llava or med_r1, got {format!r}")
        self.path = path
        self.image_root = image_root if image_root is not None else os.path.dirname(path)
        self.examples = []
        for where, rec in read_json_records(path):
            if not isinstance(rec, dict):
                raise DataError("record is not a JSON object", where=where, reason="bad_record")
            try:
                fmt = detect_format(rec) if format == "auto" else format
            except ValueError as e:
                raise DataError(str(e), where=where, reason="bad_record") from None
            images = [image_path(self.image_root, p, where, allow_outside=allow_outside_root)
                      for p in _as_list(rec.get("image")) + _as_list(rec.get("images"))]
            build = _llava_example if fmt == "llava" else med_r1_example
            try:
                ex = build(rec, where, images)
            except KeyError as e:
                raise DataError(f"missing key {e}", where=where, reason="bad_record") from None
            ex["id"] = str(rec.get("id", rec.get("qid", where)))
            ex["images"] = images
            ex["meta"]["source"] = os.path.basename(path)
            ex["meta"]["where"] = where
            self.examples.append(ex)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        ex = self.examples[int(index)]
        return {**ex, "images": list(ex["images"]), "meta": dict(ex["meta"])}

    def __repr__(self) -> str:
        return f"ConversationFile({self.path!r}, {len(self)} records)"


# --------------------------------------------------------------------------------------------
# TFDS.
# --------------------------------------------------------------------------------------------

def tfds_source(name: str, split: str, data_dir: str | None = None):
    """A prepared TFDS dataset as a random-access source (array_record files, no TensorFlow).

    ``name`` may include a config and version (``"medsynth/cxr:1.0.0"``). The dataset must
    already be prepared under ``data_dir``: nothing is downloaded here.
    """
    import tensorflow_datasets as tfds  # Imported lazily: only TFDS users pay for it.

    if name.split("/")[0] == "medsynth":
        from medvl_jax.data import medsynth_tfds  # noqa: F401  (defines the builder class)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # TFDS raises several types for unknown names/configs.
        raise DataError(f"cannot open TFDS dataset: {e}", where=name, reason="missing") from None
    if not builder.is_prepared():
        raise DataError(f"dataset is not prepared in data_dir={builder.data_dir!r}; build it "
                        "first (see docs/data.md)", where=name, reason="missing")
    return builder.as_data_source(split=split)


def resolve_callable(spec: str | Callable) -> Callable:
    """``"package.module:function"`` → the function (configs name converters this way)."""
    if callable(spec):
        return spec
    module, _, attr = str(spec).partition(":")
    if not attr:
        raise ValueError(f"expected 'module:function', got {spec!r}")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot resolve {spec!r}: {e}") from None


# --------------------------------------------------------------------------------------------
# MedSynth.
# --------------------------------------------------------------------------------------------

def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


REPORT_PROMPTS = {"cxr": "Write the report of this chest radiograph.",
                  "longitudinal": "Write the report of the current study, compared with the prior.",
                  "ct": "Write the report of this chest CT."}


def medsynth_to_example(record: dict, rng: np.random.Generator, *, qa_per_example: int = 1,
                        question_types: Sequence[str] | None = None) -> dict:
    """One MedSynth study → an example with ``qa_per_example`` question/answer turns.

    The QA items are drawn without replacement with ``rng`` (so every epoch sees other questions
    of the same study); ``question_types`` restricts them to those types. The type "report"
    (never drawn unless named) is the study's report as the answer to :data:`REPORT_PROMPTS`
    (report generation). Works on records from
    :class:`~medvl_jax.data.medsynth.MedSynthSource` and from the TFDS build (bytes, JSON).
    """
    qa = record["qa"]
    if isinstance(qa, (str, bytes)):
        qa = json.loads(_text(qa))
    if question_types:
        qa = [q for q in qa if q["type"] in question_types]
        if "report" in question_types:
            kind = _text(record["kind"])
            qa.append({"question": REPORT_PROMPTS[kind], "answer": _text(record["report"]),
                       "type": "report", "template": f"{kind}.report"})
    sid = _text(record["id"])
    if not qa:
        raise DataError(f"no questions of types {list(question_types or [])}", where=sid,
                        reason="no_questions")
    k = min(qa_per_example, len(qa))
    chosen = [qa[i] for i in rng.choice(len(qa), size=k, replace=False)]
    image = np.asarray(record["image"])
    images = list(image) if _text(record["kind"]) == "longitudinal" else [image]
    prefix = "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in images)
    if len(images) == 2:
        prefix = f"Prior study: {IMAGE_PLACEHOLDER}\nCurrent study: {IMAGE_PLACEHOLDER}\n"
    messages = []
    for i, q in enumerate(chosen):
        messages.append({"role": "user", "content": (prefix if i == 0 else "") + q["question"]})
        messages.append({"role": "assistant", "content": q["answer"]})
    return {"id": sid, "images": images, "messages": messages,
            "meta": {"question_type": chosen[-1]["type"], "answer": chosen[-1]["answer"],
                     "template": chosen[-1].get("template", ""),
                     "modality": _text(record["modality"]), "source": "medsynth",
                     "spacing": np.asarray(record["spacing"], np.float32)}}


def medsynth_questions(record: dict) -> list[dict]:
    """All QA items of one MedSynth study as single-question examples (for evaluation)."""
    qa = record["qa"]
    if isinstance(qa, (str, bytes)):
        qa = json.loads(_text(qa))
    out = []
    for i, q in enumerate(qa):
        ex = medsynth_to_example({**record, "qa": [q]}, np.random.default_rng(0))
        ex["id"] = f"{ex['id']}/q{i}"
        ex["meta"]["options"] = list(q.get("options", []))
        out.append(ex)
    return out


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """A source built from config: the records and the function making examples of them."""
    name: str
    records: Any  # random-access: __len__ / __getitem__
    to_example: Callable[[Any, np.random.Generator], dict]
    weight: float = 1.0
