"""Readers of the standard medical VQA and report-generation benchmarks, from the files of their
public releases in a directory you provide. Nothing is downloaded.

    from medvl_jax.data.benchmarks import BENCHMARKS, load_benchmark

    examples = load_benchmark("vqa_rad", "/data/vqa_rad", split="test")
    examples = load_benchmark("slake", "/data/Slake1.0", split="test", include_zh=True)

Every example has the repository's example form (see :mod:`medvl_jax.data.sources`)::

    {"id": "17",
     "images": ["/data/vqa_rad/VQA_RAD Image Folder/synpic54610.jpg"],   # absolute paths
     "messages": [{"role": "user", "content": "<image>\\nAre regions of the brain infarcted?"},
                  {"role": "assistant", "content": "Yes"}],
     "meta": {"question_type": "closed", "answer": "Yes", "options": [], "benchmark": "vqa_rad",
              "where": "/data/vqa_rad/VQA_RAD Dataset Public.json[17]", ...}}

``meta["question_type"]`` follows each benchmark's own rule:

* ``closed`` / ``open`` — VQA-RAD and SLAKE by the record's ``answer_type`` (CLOSED / OPEN);
  PathVQA by the answer: "yes" or "no" is closed, anything else open.
* ``multiple_choice`` — OmniMedVQA and Med-R1. ``answer`` is the option letter, ``options`` the
  option texts in letter order, ``answer_text`` the right option's text; the user turn ends with
  :data:`MC_INSTRUCTION` (OmniMedVQA's options are listed as "A. text" lines, the form of
  MedSynth's multiple-choice questions; Med-R1's problem text already lists them and is kept).
* ``report`` — IU-Xray and MIMIC-CXR: the user turn is one ``<image>`` per image of the study
  followed by :data:`REPORT_INSTRUCTION`; the answer is the report.

Order is the release's (files sorted by name, records in file order) and ``limit`` keeps the
first ``limit`` examples of it. Ids are the release's question or study ids; where a release
repeats an id, later occurrences get ``#2``, ``#3``… Bad input is a
:class:`~medvl_jax.data.errors.DataError` naming the file and record (``file[index]``); every
image is checked to exist when loading. Loading never unpickles: PathVQA's original release
(``.pkl`` files) is refused; its Hugging Face parquet release is read instead.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import os
import re
import string
from typing import Any, Callable

from medvl_jax.data import sources
from medvl_jax.data.errors import DataError

IMAGE_PLACEHOLDER = sources.IMAGE_PLACEHOLDER
# The one question of the report benchmarks (after one <image> line per image of the study).
REPORT_INSTRUCTION = "Write the findings of this chest X-ray study."
# Last line of every multiple-choice question (as in MedSynth's multiple-choice questions).
MC_INSTRUCTION = "Answer with the letter."
LETTERS = string.ascii_uppercase

_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "validate": "validation",
                  "dev": "validation"}


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One benchmark: the files it reads, where they come from, its splits and its reader.

    ``read(data_dir, split, limit, **options)`` returns the examples of ``split`` (the first
    ``limit`` of them when ``limit`` is not None); ``options`` are the reader's keyword options
    with their defaults, which :func:`load_benchmark` passes through.
    """
    name: str
    description: str  # One line: the files expected in data_dir and where they come from.
    splits: tuple[str, ...]
    read: Callable[..., list[dict]]
    source: str  # The public release.
    question_types: tuple[str, ...]
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


def load_benchmark(name: str, data_dir: str | None, split: str = "test", *,
                   limit: int | None = None, **options) -> list[dict]:
    """The examples of one split of benchmark ``name``, read from the release files in
    ``data_dir``.

    Args:
      name: a key of :data:`BENCHMARKS`.
      data_dir: the directory holding the benchmark's release files (see its ``description``).
      split: one of the benchmark's ``splits``; "val" / "valid" / "dev" mean "validation".
      limit: keep only the first ``limit`` examples (in the release's order).
      **options: reader options of this benchmark (``BENCHMARKS[name].options`` lists them
        with their defaults), e.g. ``include_zh=True`` for SLAKE.

    Raises:
      ValueError: unknown benchmark, split or option.
      DataError: data_dir or a release file missing (the message names the expected file and
        the public source), a malformed record (named by file and index), a missing image.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    bench = BENCHMARKS[name]
    split = _SPLIT_ALIASES.get(split, split)
    if split not in bench.splits:
        raise ValueError(f"{name} has no split {split!r}; its splits: {', '.join(bench.splits)}")
    unknown = sorted(set(options) - set(bench.options))
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {', '.join(unknown)}; its options (with "
                         f"defaults): {bench.options or 'none'}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or limit < 0):
        raise ValueError(f"limit must be None or a non-negative int, got {limit!r}")
    if not data_dir:
        raise DataError(f"{name}: no data_dir given; it must be a directory holding "
                        f"{bench.description}", reason="missing")
    data_dir = os.path.abspath(os.path.expanduser(str(data_dir)))
    if not os.path.isdir(data_dir):
        raise DataError(f"data_dir is not a directory; {name} expects {bench.description}",
                        where=data_dir, reason="missing")
    return bench.read(data_dir, split, limit, **{**bench.options, **options})


# --------------------------------------------------------------------------------------------
# Shared helpers.
# --------------------------------------------------------------------------------------------

def _expects(name: str) -> str:
    b = BENCHMARKS[name]
    return f"{name} expects {b.description}"


def _require_path(data_dir: str, rel: str, name: str, *, folder: bool = False) -> str:
    """``data_dir/rel``, which must exist; else an error naming it and the public release."""
    path = os.path.join(data_dir, rel)
    if not (os.path.isdir(path) if folder else os.path.isfile(path)):
        raise DataError(f"{'folder' if folder else 'file'} not found; {_expects(name)}",
                        where=path, reason="missing")
    return path


def _empty(value) -> bool:
    return (value is None or (isinstance(value, str) and not value.strip())
            or (isinstance(value, (list, tuple)) and not value))


def _require(rec, where: str, fields: tuple[str, ...]) -> None:
    if not isinstance(rec, dict):
        raise DataError("record is not a JSON object", where=where, reason="bad_record")
    missing = [f for f in fields if _empty(rec.get(f))]
    if missing:
        raise DataError(f"missing or empty field(s) {', '.join(repr(f) for f in missing)} "
                        f"(record has {sorted(rec)})", where=where, reason="bad_record")


def _text(value) -> str:
    """A JSON value as text: releases store some answers and ids as numbers (1.0 → "1")."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _field(rec: dict, *keys: str) -> str:
    """The first of ``keys`` that ``rec`` has a non-empty value for, as text ("" if none)."""
    for key in keys:
        if not _empty(rec.get(key)):
            return _text(rec[key])
    return ""


def _closed_open(value, where: str) -> str:
    v = _text(value).upper()
    if v not in ("CLOSED", "OPEN"):
        raise DataError(f"answer_type {value!r} is neither CLOSED nor OPEN", where=where,
                        reason="bad_record")
    return v.lower()


def _example(benchmark: str, id_: str, images: list, question: str, answer: str,
             question_type: str, where: str, *, options=(), **meta) -> dict:
    prompt = "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in images) + question
    return {"id": id_, "images": list(images),
            "messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": answer}],
            "meta": {"question_type": question_type, "answer": answer, "options": list(options),
                     "benchmark": benchmark, "where": where,
                     **{k: v for k, v in meta.items() if not _empty(v)}}}


def _image_path(root: str, rel, where: str) -> str:
    if not isinstance(rel, str) or not rel.strip():
        raise DataError(f"bad image path {rel!r}", where=where, reason="bad_record")
    return os.path.abspath(os.path.join(root, rel))


def _finish(examples: list[dict], limit: int | None) -> list[dict]:
    """Makes ids unique (in order), keeps the first ``limit`` examples, checks their images."""
    seen = collections.Counter()
    for ex in examples:
        seen[ex["id"]] += 1
        if seen[ex["id"]] > 1:
            ex["id"] = f"{ex['id']}#{seen[ex['id']]}"
    if limit is not None:
        examples = examples[:limit]
    missing = [(ex, p) for ex in examples for p in ex["images"]
               if isinstance(p, str) and not os.path.isfile(p)]
    if missing:
        ex, path = missing[0]
        more = (f" ({len(missing) - 1} more image(s) of this split are missing too)"
                if len(missing) > 1 else "")
        raise DataError(f"image file not found: {path}{more}", where=ex["meta"]["where"],
                        reason="missing_image")
    return examples


def format_multiple_choice(question: str, options: list[str]) -> str:
    """``question``, one "A. option" line per option, then :data:`MC_INSTRUCTION`."""
    lines = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"{question}\n{lines}\n{MC_INSTRUCTION}"


# --------------------------------------------------------------------------------------------
# VQA-RAD (OSF release).
# --------------------------------------------------------------------------------------------

_VQA_RAD_JSON = "VQA_RAD Dataset Public.json"
_VQA_RAD_IMAGES = "VQA_RAD Image Folder"
# phrase_type → split: the test set is the test_freeform + test_para questions (451).
_VQA_RAD_SPLIT = {"freeform": "train", "para": "train", "test_freeform": "test",
                  "test_para": "test"}


def _read_vqa_rad(data_dir: str, split: str, limit: int | None,
                  cache_dir: str | None) -> list[dict]:
    if not os.path.isfile(os.path.join(data_dir, _VQA_RAD_JSON)):
        from medvl_jax.data import hub_benchmarks

        files = hub_benchmarks.parquet_files(data_dir, split)
        if files:  # The Hugging Face release (flaviagiammarino/vqa-rad).
            return hub_benchmarks.read_vqa_rad_parquet(files, split, limit, cache_dir)
    path = _require_path(data_dir, _VQA_RAD_JSON, "vqa_rad")
    image_dir = _require_path(data_dir, _VQA_RAD_IMAGES, "vqa_rad", folder=True)
    out = []
    for where, rec in sources.read_json_records(path):
        _require(rec, where, ("qid", "image_name", "question", "answer", "answer_type",
                              "phrase_type"))
        phrase = _text(rec["phrase_type"]).lower()
        if phrase not in _VQA_RAD_SPLIT:
            raise DataError(f"unknown phrase_type {rec['phrase_type']!r} (expected one of "
                            f"{', '.join(_VQA_RAD_SPLIT)})", where=where, reason="bad_record")
        if _VQA_RAD_SPLIT[phrase] != split:
            continue
        out.append(_example(
            "vqa_rad", _text(rec["qid"]), [_image_path(image_dir, rec["image_name"], where)],
            _text(rec["question"]), _text(rec["answer"]),
            _closed_open(rec["answer_type"], where), where,
            answer_type=_text(rec["answer_type"]).upper(), phrase_type=phrase,
            organ=_field(rec, "image_organ"), category=_field(rec, "question_type")))
    return _finish(out, limit)


# --------------------------------------------------------------------------------------------
# SLAKE 1.0.
# --------------------------------------------------------------------------------------------

_SLAKE_FILES = {"train": "train.json", "validation": "validate.json", "test": "test.json"}


def _read_slake(data_dir: str, split: str, limit: int | None, include_zh: bool) -> list[dict]:
    path = _require_path(data_dir, _SLAKE_FILES[split], "slake")
    image_dir = _require_path(data_dir, "imgs", "slake", folder=True)
    out = []
    for where, rec in sources.read_json_records(path):
        _require(rec, where, ("qid", "img_name", "question", "answer", "answer_type", "q_lang"))
        lang = _text(rec["q_lang"]).lower()
        if lang != "en" and not include_zh:
            continue
        content = _field(rec, "content_type")
        out.append(_example(
            "slake", _text(rec["qid"]), [_image_path(image_dir, rec["img_name"], where)],
            _text(rec["question"]), _text(rec["answer"]),
            _closed_open(rec["answer_type"], where), where,
            answer_type=_text(rec["answer_type"]).upper(), q_lang=lang,
            modality=_field(rec, "modality"), location=_field(rec, "location"),
            content_type=content, category=content, base_type=_field(rec, "base_type"),
            img_id=_field(rec, "img_id")))
    return _finish(out, limit)


# --------------------------------------------------------------------------------------------
# PathVQA (Hugging Face parquet release).
# --------------------------------------------------------------------------------------------

def _pathvqa_files(data_dir: str, split: str) -> list[str]:
    # The dataset's own layout, then the Hub's parquet-converter layouts (current and older).
    patterns = (f"data/{split}-*.parquet", f"{split}-*.parquet", f"default/{split}/*.parquet",
                f"{split}/*.parquet", f"*/parquet-{split}-*.parquet")
    for pattern in patterns:
        files = sorted(glob.glob(os.path.join(glob.escape(data_dir), pattern)))
        if files:
            return files
    pickles = [p for depth in ("*", "*/*", "*/*/*")
               for p in glob.glob(os.path.join(glob.escape(data_dir), depth + ".pkl"))]
    if pickles:
        raise DataError(f"found only pickle files (e.g. {sorted(pickles)[0]}): PathVQA's original "
                        "release is pickled, and loading never unpickles (it can run arbitrary "
                        f"code). {_expects('pathvqa')}", where=data_dir, reason="missing")
    raise DataError(f"no {split} parquet files (looked for {', '.join(patterns)}); "
                    f"{_expects('pathvqa')}", where=data_dir, reason="missing")


def _cache_dir(base: str | None, parquet: str) -> str:
    """Where the images of one parquet file are written: keyed by its path, size and mtime."""
    if base is None:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        base = os.path.join(cache, "medvl_jax", "pathvqa")
    st = os.stat(parquet)
    key = hashlib.sha1(f"{os.path.abspath(parquet)}|{st.st_size}|{st.st_mtime_ns}".encode())
    stem = os.path.basename(parquet).removesuffix(".parquet")
    return os.path.join(os.path.abspath(os.path.expanduser(base)), f"{stem}-{key.hexdigest()[:12]}")


def _image_suffix(data: bytes, name: str | None, where: str) -> str:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png"
    if data.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    ext = os.path.splitext(name or "")[1].lower()
    if ext in (".png", ".jpg", ".jpeg"):
        return ext
    raise DataError("image bytes are neither PNG nor JPEG", where=where, reason="bad_image")


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _extract_images(parquet: str, rows: dict[int, dict], cache_dir: str | None) -> None:
    """Sets ``images`` of the examples in ``rows`` (row index → example) to image files: the
    image bytes of those rows written once under the cache, or the file an image refers to."""
    import pyarrow.parquet as pq

    out_dir = _cache_dir(cache_dir, parquet)
    todo = {}
    for row, ex in rows.items():
        done = [os.path.join(out_dir, f"{row:06d}{s}") for s in (".jpg", ".png", ".jpeg")]
        done = [p for p in done if os.path.isfile(p)]
        if done:
            ex["images"] = [done[0]]
        else:
            todo[row] = ex
    if not todo:
        return
    os.makedirs(out_dir, exist_ok=True)
    last, start = max(todo), 0
    for batch in pq.ParquetFile(parquet).iter_batches(batch_size=64, columns=["image"]):
        values = batch.column(0).to_pylist()
        for offset, value in enumerate(values):
            ex = todo.get(start + offset)
            if ex is None:
                continue
            where = ex["meta"]["where"]
            data, name = (value.get("bytes"), value.get("path")) if isinstance(value, dict) \
                else (value, None)
            if data is None:
                # An image stored as a path (no bytes): resolved beside the parquet file.
                if not name:
                    raise DataError("image has neither bytes nor path", where=where,
                                    reason="bad_record")
                ex["images"] = [os.path.abspath(os.path.join(os.path.dirname(parquet), name))]
                continue
            target = os.path.join(out_dir, f"{start + offset:06d}"
                                  f"{_image_suffix(data, name, where)}")
            _write_atomic(target, data)
            ex["images"] = [target]
        start += len(values)
        if start > last:
            break


def _read_pathvqa(data_dir: str, split: str, limit: int | None,
                  cache_dir: str | None) -> list[dict]:
    files = _pathvqa_files(data_dir, split)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading PathVQA's parquet files needs pyarrow (pip install pyarrow; "
                          "tensorflow-datasets, a dependency of medvl_jax, normally brings "
                          "it)") from None
    out, by_file = [], []
    for path in files:
        schema = pq.read_schema(path)
        missing = [c for c in ("image", "question", "answer") if c not in schema.names]
        if missing:
            raise DataError(f"parquet file lacks column(s) {', '.join(missing)} (has "
                            f"{schema.names}); {_expects('pathvqa')}", where=path,
                            reason="bad_record")
        table = pq.read_table(path, columns=["question", "answer"])
        rows = {}
        for row, (q, a) in enumerate(zip(table.column("question").to_pylist(),
                                         table.column("answer").to_pylist())):
            where = f"{path}[{row}]"
            _require({"question": q, "answer": a}, where, ("question", "answer"))
            answer = _text(a)
            ex = _example("pathvqa", f"{split}/{len(out)}", [None], _text(q), answer,
                          "closed" if answer.lower() in ("yes", "no") else "open", where,
                          modality="pathology")
            out.append(ex)
            rows[row] = ex
        by_file.append((path, rows))
    if limit is not None:
        keep = {id(ex) for ex in out[:limit]}
        out = out[:limit]
        by_file = [(p, {r: ex for r, ex in rows.items() if id(ex) in keep}) for p, rows in by_file]
    for path, rows in by_file:
        if rows:
            _extract_images(path, rows, cache_dir)
    return _finish(out, None)


# --------------------------------------------------------------------------------------------
# OmniMedVQA.
# --------------------------------------------------------------------------------------------

_OMNI_ACCESS = {"open": ("Open-access",), "restricted": ("Restricted-access",),
                "all": ("Open-access", "Restricted-access")}


def _omnimedvqa_root(data_dir: str) -> str:
    # The Hugging Face archive unpacks to OmniMedVQA/; accept its parent too.
    for root in (data_dir, os.path.join(data_dir, "OmniMedVQA")):
        if os.path.isdir(os.path.join(root, "QA_information")):
            return root
    return data_dir


def _option_letter(answer: str, options: list[str], where: str) -> str:
    for same in (lambda o: o == answer, lambda o: o.casefold() == answer.casefold()):
        for i, o in enumerate(options):
            if same(o):
                return LETTERS[i]
    raise DataError(f"gt_answer {answer!r} is none of the options {options}", where=where,
                    reason="bad_record")


def _read_omnimedvqa(data_dir: str, split: str, limit: int | None, access: str) -> list[dict]:
    if access not in _OMNI_ACCESS:
        raise ValueError(f"omnimedvqa: access must be one of {', '.join(_OMNI_ACCESS)}, got "
                         f"{access!r}")
    root = _omnimedvqa_root(data_dir)
    files = []
    for folder in _OMNI_ACCESS[access]:
        qa_dir = _require_path(root, os.path.join("QA_information", folder), "omnimedvqa",
                               folder=True)
        found = sorted(glob.glob(os.path.join(glob.escape(qa_dir), "*.json")))
        if not found:
            raise DataError(f"no .json files; {_expects('omnimedvqa')}", where=qa_dir,
                            reason="missing")
        files += [(folder, p) for p in found]
    if "Open-access" in _OMNI_ACCESS[access]:
        _require_path(root, "Images", "omnimedvqa", folder=True)
    out = []
    for folder, path in files:
        for where, rec in sources.read_json_records(path):
            _require(rec, where, ("question_id", "question", "gt_answer", "image_path",
                                  "option_A", "option_B"))
            options = []
            for letter in LETTERS:
                value = rec.get(f"option_{letter}")
                if _empty(value):
                    break
                options.append(_text(value))
            answer_text = _text(rec["gt_answer"])
            letter = _option_letter(answer_text, options, where)
            out.append(_example(
                "omnimedvqa", _text(rec["question_id"]),
                [_image_path(root, rec["image_path"], where)],
                format_multiple_choice(_text(rec["question"]), options), letter,
                "multiple_choice", where, options=options,
                answer_text=options[LETTERS.index(letter)],
                # One file of the release spells the field "modality".
                modality=_field(rec, "modality_type", "modality"), dataset=_field(rec, "dataset"),
                category=_field(rec, "question_type"), access=folder))
            out[-1]["meta"]["question"] = _text(rec["question"])  # As the release words it,
            out[-1]["meta"]["gt_answer"] = answer_text            # and its answer.
    return _finish(out, limit)


# --------------------------------------------------------------------------------------------
# Med-R1 (its OmniMedVQA problem files).
# --------------------------------------------------------------------------------------------

_MED_R1_GROUPS = ("modality", "question_type")


def inline_options(problem: str) -> list[str]:
    """The options of a Med-R1 problem, "… A)x, B)y, C)z", as ["x", "y", "z"] ([] if none).

    The option list starts at the first "A)" after a space (or at the start) and runs to the
    end of the text; an option may itself contain commas ("No, It's normal").
    """
    m = re.search(r"(?:^|\s)A\)\s*", problem)
    if not m:
        return []
    out, pos = [], m.end()
    for letter in LETTERS[1:]:
        nxt = re.compile(rf",\s*{letter}\)\s*|\s+{letter}\)\s*").search(problem, pos)
        if not nxt:
            break
        out.append(problem[pos:nxt.start()].strip())
        pos = nxt.end()
    out.append(problem[pos:].strip())
    return out


def _read_med_r1(data_dir: str, split: str, limit: int | None, group: str,
                 image_root: str | None) -> list[dict]:
    if group not in _MED_R1_GROUPS:
        raise ValueError(f"med_r1: group must be one of {', '.join(_MED_R1_GROUPS)}, got "
                         f"{group!r}")
    dirs = [os.path.join(data_dir, "Splits", group, split), os.path.join(data_dir, group, split)]
    split_dir = next((d for d in dirs if os.path.isdir(d)), None)
    if split_dir is None:
        raise DataError(f"no Med-R1 split folder ({' or '.join(dirs)}); {_expects('med_r1')}",
                        where=data_dir, reason="missing")
    files = sorted(glob.glob(os.path.join(glob.escape(split_dir), "*.json")))
    if not files:
        raise DataError(f"no .json files; {_expects('med_r1')}", where=split_dir,
                        reason="missing")
    root = os.path.abspath(os.path.expanduser(image_root)) if image_root else data_dir
    out = []
    for path in files:
        name = os.path.basename(path).removesuffix(".json").removesuffix(f"_{split}")
        for index, (where, rec) in enumerate(sources.read_json_records(path)):
            _require(rec, where, ("image", "problem", "solution"))
            images = [_image_path(root, p, where) for p in sources._as_list(rec["image"])]
            ex = sources.med_r1_example(rec, where, images)
            letter = ex["meta"]["answer"].upper()
            options = inline_options(rec["problem"])
            if len(letter) != 1 or letter not in LETTERS or (
                    options and LETTERS.index(letter) >= len(options)):
                raise DataError(f"solution {rec['solution']!r} is not the letter of one of the "
                                f"options {options}", where=where, reason="bad_record")
            # med_r1_example put one <image> line per image before the problem.
            prompt = f"{ex['messages'][0]['content']}\n{MC_INSTRUCTION}"
            out.append({
                "id": f"{group}/{name}/{index}", "images": images,
                "messages": [{"role": "user", "content": prompt},
                             {"role": "assistant", "content": letter}],
                "meta": {"question_type": "multiple_choice", "answer": letter,
                         "options": options, "benchmark": "med_r1", "where": where,
                         **({"answer_text": options[LETTERS.index(letter)]} if options else {}),
                         ("modality" if group == "modality" else "category"): name}})
    return _finish(out, limit)


# --------------------------------------------------------------------------------------------
# IU-Xray and MIMIC-CXR (R2Gen's annotation.json).
# --------------------------------------------------------------------------------------------

_R2GEN_KEYS = {"train": "train", "validation": "val", "test": "test"}


def _read_r2gen(name: str, image_dirs: tuple[str, ...], data_dir: str, split: str,
                limit: int | None) -> list[dict]:
    path = _require_path(data_dir, "annotation.json", name)
    data = sources.load_json(path)
    key = _R2GEN_KEYS[split]
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DataError(f"expected a JSON object whose {key!r} is a list of records (R2Gen's "
                        f"annotation.json: train / val / test); found {found}", where=path,
                        reason="bad_json")
    image_dir = next((os.path.join(data_dir, d) for d in image_dirs
                      if os.path.isdir(os.path.join(data_dir, d))), None)
    if image_dir is None:
        raise DataError(f"no image folder ({' or '.join(image_dirs)}); {_expects(name)}",
                        where=data_dir, reason="missing")
    out = []
    for i, rec in enumerate(data[key]):
        where = f"{path}[{key}][{i}]"
        _require(rec, where, ("id", "report", "image_path"))
        images = [_image_path(image_dir, p, where) for p in sources._as_list(rec["image_path"])]
        out.append(_example(name, _text(rec["id"]), images, REPORT_INSTRUCTION,
                            _text(rec["report"]), "report", where, modality="xray",
                            study_id=_field(rec, "study_id")))
    return _finish(out, limit)


def _read_iu_xray(data_dir: str, split: str, limit: int | None) -> list[dict]:
    return _read_r2gen("iu_xray", ("images",), data_dir, split, limit)


def _read_mimic_cxr(data_dir: str, split: str, limit: int | None) -> list[dict]:
    # R2Gen puts the images under images/; MIMIC-CXR-JPG itself ships them under files/.
    return _read_r2gen("mimic_cxr", ("images", "files"), data_dir, split, limit)


def _read_pmc_vqa(data_dir: str, split: str, limit: int | None, file: str | None):
    from medvl_jax.data import hub_benchmarks

    return hub_benchmarks.read_pmc_vqa(data_dir, split, limit, file)


def _read_mmmu_med(data_dir: str, split: str, limit: int | None, subjects,
                   cache_dir: str | None):
    from medvl_jax.data import hub_benchmarks

    return hub_benchmarks.read_mmmu_med(data_dir, split, limit, subjects, cache_dir)


# --------------------------------------------------------------------------------------------
# The benchmarks.
# --------------------------------------------------------------------------------------------

BENCHMARKS: dict[str, Benchmark] = {
    "vqa_rad": Benchmark(
        name="vqa_rad",
        description=f"'{_VQA_RAD_JSON}' and the folder '{_VQA_RAD_IMAGES}' of the VQA-RAD "
                    "release (https://osf.io/89kps/), or the parquet files "
                    "data/<split>-*.parquet of huggingface.co/datasets/flaviagiammarino/vqa-rad",
        splits=("train", "test"), read=_read_vqa_rad, source="https://osf.io/89kps/",
        question_types=("closed", "open"), options={"cache_dir": None}),
    "pmc_vqa": Benchmark(
        name="pmc_vqa",
        description="PMC-VQA's CSV file (test_2.csv, test2.csv or test.csv; test_clean.csv; "
                    "train_2.csv, train2.csv or train.csv) and its images under figures/, "
                    "images/ or images_2/ (huggingface.co/datasets/xmcmic/PMC-VQA)",
        splits=("train", "test", "test_clean"), read=_read_pmc_vqa,
        source="https://huggingface.co/datasets/xmcmic/PMC-VQA",
        question_types=("multiple_choice",), options={"file": None}),
    "mmmu_med": Benchmark(
        name="mmmu_med",
        description="MMMU's medical subjects as parquet files <Subject>/validation-*.parquet "
                    "(Basic_Medical_Science, Clinical_Medicine, "
                    "Diagnostics_and_Laboratory_Medicine, Pharmacy, Public_Health) of "
                    "huggingface.co/datasets/MMMU/MMMU",
        splits=("validation",), read=_read_mmmu_med,
        source="https://huggingface.co/datasets/MMMU/MMMU",
        question_types=("multiple_choice", "open"),
        options={"subjects": None, "cache_dir": None}),
    "slake": Benchmark(
        name="slake",
        description="train.json, validate.json, test.json and imgs/ of SLAKE 1.0 "
                    "(https://www.med-vqa.com/slake/; also huggingface.co/datasets/BoKelvin/SLAKE)",
        splits=("train", "validation", "test"), read=_read_slake,
        source="https://www.med-vqa.com/slake/", question_types=("closed", "open"),
        options={"include_zh": False}),
    "pathvqa": Benchmark(
        name="pathvqa",
        description="the parquet files data/<split>-*.parquet (columns image, question, answer) "
                    "of huggingface.co/datasets/flaviagiammarino/path-vqa",
        splits=("train", "validation", "test"), read=_read_pathvqa,
        source="https://huggingface.co/datasets/flaviagiammarino/path-vqa",
        question_types=("closed", "open"), options={"cache_dir": None}),
    "omnimedvqa": Benchmark(
        name="omnimedvqa",
        description="QA_information/Open-access/*.json and Images/ of OmniMedVQA "
                    "(huggingface.co/datasets/foreverbeliever/OmniMedVQA)",
        splits=("test",), read=_read_omnimedvqa,
        source="https://huggingface.co/datasets/foreverbeliever/OmniMedVQA",
        question_types=("multiple_choice",), options={"access": "open"}),
    "med_r1": Benchmark(
        name="med_r1",
        description="Med-R1's problem files Splits/<group>/<split>/*.json "
                    "(github.com/Yuxiang-Lai117/Med-R1) and OmniMedVQA's Images/ under "
                    "image_root (default: data_dir)",
        splits=("train", "test"), read=_read_med_r1,
        source="https://github.com/Yuxiang-Lai117/Med-R1",
        question_types=("multiple_choice",), options={"group": "modality", "image_root": None}),
    "iu_xray": Benchmark(
        name="iu_xray",
        description="annotation.json and images/ of R2Gen's iu_xray release "
                    "(download link in github.com/cuhksz-nlp/R2Gen)",
        splits=("train", "validation", "test"), read=_read_iu_xray,
        source="https://github.com/cuhksz-nlp/R2Gen", question_types=("report",)),
    "mimic_cxr": Benchmark(
        name="mimic_cxr",
        description="annotation.json of R2Gen's mimic_cxr release (github.com/cuhksz-nlp/R2Gen) "
                    "and the MIMIC-CXR-JPG images (physionet.org/content/mimic-cxr-jpg, "
                    "credentialed access) under images/ or files/",
        splits=("train", "validation", "test"), read=_read_mimic_cxr,
        source="https://physionet.org/content/mimic-cxr-jpg/2.0.0/",
        question_types=("report",)),
}
