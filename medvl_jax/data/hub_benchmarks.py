"""Readers of benchmark releases in their Hugging Face hub layouts and of PMC-VQA's CSV files,
used by :mod:`medvl_jax.data.benchmarks` (``vqa_rad`` from parquet, ``pmc_vqa``, ``mmmu_med``).

Nothing is downloaded: the files are the ones a ``huggingface-cli download`` (or ``git clone``)
of the dataset repository leaves in a directory. Parquet files are read with pyarrow; images
stored inside them (``{"bytes", "path"}`` structs) are written once to a cache directory
(``cache_dir``, default ``$XDG_CACHE_HOME/medvl_jax``) keyed by the parquet file's path, size
and modification time, so an example always refers to an image file.

* VQA-RAD (huggingface.co/datasets/flaviagiammarino/vqa-rad): ``data/<split>-*.parquet`` with
  columns ``image``, ``question``, ``answer``. That release has no answer_type: a question is
  closed when its answer is yes/no, as MedEvalKit splits it.
* PMC-VQA (huggingface.co/datasets/xmcmic/PMC-VQA and its RadGenome/PMC-VQA copy): CSV files
  ``test_2.csv`` (MedEvalKit's), ``test2.csv``, ``test.csv``, ``test_clean.csv`` (and the train
  ones) with ``Figure_path``, ``Question``, ``Choice A``..``Choice D`` and the answer as a letter
  (``Answer`` or ``Answer_label``) or as the option's text; the options carry their letter
  ("A:Diffuse uptake pattern"). Images under ``figures/``, ``images/`` or ``images_2/``.
* MMMU's medical subjects (huggingface.co/datasets/MMMU/MMMU, "Health and Medicine"):
  ``<Subject>/validation-*.parquet`` with ``id``, ``question``, ``options`` (a Python list
  written as text, read with :func:`ast.literal_eval`), ``image_1``..``image_7``, ``answer``,
  ``question_type`` ("multiple-choice" or "open"), ``subfield``.
"""
from __future__ import annotations

import ast
import csv
import glob
import hashlib
import os
import re

from medvl_jax.data import benchmarks as B
from medvl_jax.data.errors import DataError

MMMU_MEDICAL = ("Basic_Medical_Science", "Clinical_Medicine",
                "Diagnostics_and_Laboratory_Medicine", "Pharmacy", "Public_Health")
MMMU_IMAGES = tuple(f"image_{k}" for k in range(1, 8))
PMC_VQA_FILES = {"test": ("test_2.csv", "test2.csv", "test.csv"),
                 "test_clean": ("test_clean.csv",),
                 "train": ("train_2.csv", "train2.csv", "train.csv")}
PMC_VQA_IMAGE_DIRS = ("figures", "images", "images_2", "images2")
_LETTER_PREFIX = re.compile(r"^\s*([A-D])\s*:\s*")


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading the hub's parquet files needs pyarrow (pip install "
                          "pyarrow)") from None
    return pq


def parquet_files(data_dir: str, split: str, subdir: str = "") -> list[str]:
    """The parquet files of ``split`` in the hub's layouts (``data/<split>-*.parquet``,
    ``<split>-*.parquet``, ``<split>/*.parquet``), under ``data_dir/subdir``; [] if none."""
    root = os.path.join(data_dir, subdir) if subdir else data_dir
    for pattern in (f"data/{split}-*.parquet", f"{split}-*.parquet", f"{split}/*.parquet"):
        files = sorted(glob.glob(os.path.join(glob.escape(root), pattern)))
        if files:
            return files
    return []


def _check_columns(path: str, schema_names, needed, name: str) -> None:
    missing = [c for c in needed if c not in schema_names]
    if missing:
        raise DataError(f"parquet file lacks column(s) {', '.join(missing)} (has "
                        f"{list(schema_names)}); {B._expects(name)}", where=path,
                        reason="bad_record")


def _example(*args, question_text: str, **meta) -> dict:
    """:func:`benchmarks._example` with ``meta["question"]``: the question as the release
    words it (the protocols that reproduce a script rebuild their prompt from it)."""
    ex = B._example(*args, **meta)
    ex["meta"]["question"] = question_text
    return ex


def _image_file(value, out_dir: str, stem: str, parquet: str, where: str) -> str | None:
    """The file of one image cell: its bytes written under ``out_dir`` (once), or the file its
    path names beside the parquet file; None for an empty cell."""
    if value is None:
        return None
    data, name = (value.get("bytes"), value.get("path")) if isinstance(value, dict) \
        else (value, None)
    if data is None:
        if not name:
            return None
        return os.path.abspath(os.path.join(os.path.dirname(parquet), name))
    target = os.path.join(out_dir, stem + B._image_suffix(data, name, where))
    if not os.path.isfile(target):
        os.makedirs(out_dir, exist_ok=True)
        B._write_atomic(target, data)
    return target


# --------------------------------------------------------------------------------------------
# VQA-RAD (flaviagiammarino/vqa-rad).
# --------------------------------------------------------------------------------------------

def read_vqa_rad_parquet(files: list[str], split: str, limit: int | None,
                         cache_dir: str | None) -> list[dict]:
    """VQA-RAD examples from the hub's parquet files (columns image, question, answer);
    closed when the answer is yes/no."""
    pq = _pyarrow()
    out, by_file = [], []
    for path in files:
        _check_columns(path, pq.read_schema(path).names, ("image", "question", "answer"),
                       "vqa_rad")
        table = pq.read_table(path, columns=["question", "answer"])
        rows = {}
        for row, (q, a) in enumerate(zip(table.column("question").to_pylist(),
                                         table.column("answer").to_pylist())):
            where = f"{path}[{row}]"
            B._require({"question": q, "answer": a}, where, ("question", "answer"))
            answer = B._text(a)
            ex = _example("vqa_rad", f"{split}/{len(out)}", [None], B._text(q), answer,
                          "closed" if answer.lower() in ("yes", "no") else "open", where,
                          question_text=B._text(q))
            out.append(ex)
            rows[row] = ex
        by_file.append((path, rows))
    if limit is not None:
        keep = {id(ex) for ex in out[:limit]}
        out = out[:limit]
        by_file = [(p, {r: e for r, e in rows.items() if id(e) in keep}) for p, rows in by_file]
    for path, rows in by_file:
        if rows:
            B._extract_images(path, rows, cache_dir)
    return B._finish(out, None)


# --------------------------------------------------------------------------------------------
# PMC-VQA (CSV).
# --------------------------------------------------------------------------------------------

def _pmc_answer(rec: dict, choices: list[str], options: list[str], where: str) -> str:
    for key in ("Answer_label", "Anwser_label", "Answer", "Anwser"):
        value = (rec.get(key) or "").strip()
        if len(value) == 1 and value.upper() in "ABCD":
            return value.upper()
    for key in ("Answer", "Anwser"):
        value = (rec.get(key) or "").strip()
        if not value:
            continue
        text = _LETTER_PREFIX.sub("", value).strip().casefold()
        for i, (c, o) in enumerate(zip(choices, options)):
            if value.casefold() == c.strip().casefold() or text == o.casefold():
                return "ABCD"[i]
        raise DataError(f"answer {value!r} is none of the options {options}", where=where,
                        reason="bad_record")
    raise DataError("no answer (columns Answer_label / Answer)", where=where,
                    reason="bad_record")


def read_pmc_vqa(data_dir: str, split: str, limit: int | None, file: str | None) -> list[dict]:
    """PMC-VQA multiple-choice examples from its CSV file (see the module docstring).
    ``meta``: ``options`` (texts without their letter), ``choices`` (as the CSV writes them),
    ``answer`` (the letter), ``answer_text``, ``question``, ``caption`` when given."""
    names = (file,) if file else PMC_VQA_FILES[split]
    path = next((os.path.join(data_dir, n) for n in names
                 if os.path.isfile(os.path.join(data_dir, n))), None)
    if path is None:
        raise DataError(f"none of {', '.join(names)} found; {B._expects('pmc_vqa')}",
                        where=data_dir, reason="missing")
    image_dir = next((os.path.join(data_dir, d) for d in PMC_VQA_IMAGE_DIRS
                      if os.path.isdir(os.path.join(data_dir, d))), None)
    if image_dir is None:
        raise DataError(f"no image folder ({' or '.join(PMC_VQA_IMAGE_DIRS)}); "
                        f"{B._expects('pmc_vqa')}", where=data_dir, reason="missing")
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        needed = ("Figure_path", "Question", "Choice A", "Choice B")
        missing = [c for c in needed if c not in columns]
        if missing:
            raise DataError(f"CSV lacks column(s) {', '.join(missing)} (has {columns}); "
                            f"{B._expects('pmc_vqa')}", where=path, reason="bad_record")
        for row, rec in enumerate(reader):
            where = f"{path}:{row + 2}"  # The header is line 1.
            B._require(rec, where, needed)
            choices = [rec[f"Choice {k}"] for k in "ABCD" if (rec.get(f"Choice {k}") or "")
                       .strip()]
            options = [_LETTER_PREFIX.sub("", c).strip() for c in choices]
            letter = _pmc_answer(rec, choices, options, where)
            if "ABCD".index(letter) >= len(options):
                raise DataError(f"answer {letter} but only {len(options)} options", where=where,
                                reason="bad_record")
            question = rec["Question"].strip()
            id_ = (rec.get("index") or rec.get("") or str(row)).strip()
            out.append(_example(
                "pmc_vqa", id_, [B._image_path(image_dir, rec["Figure_path"].strip(), where)],
                B.format_multiple_choice(question, options), letter, "multiple_choice", where,
                options=options, choices=choices, answer_text=options["ABCD".index(letter)],
                question_text=question, caption=(rec.get("Caption") or "").strip()))
    return B._finish(out, limit)


# --------------------------------------------------------------------------------------------
# MMMU's medical subjects.
# --------------------------------------------------------------------------------------------

def _mmmu_options(text, where: str) -> list[str]:
    if text is None or (isinstance(text, str) and not text.strip()):
        return []
    try:
        value = ast.literal_eval(text) if isinstance(text, str) else list(text)
    except (ValueError, SyntaxError):
        raise DataError(f"options {text!r} is not a list", where=where,
                        reason="bad_record") from None
    if not isinstance(value, (list, tuple)):
        raise DataError(f"options {text!r} is not a list", where=where, reason="bad_record")
    return [str(v) for v in value]


def read_mmmu_med(data_dir: str, split: str, limit: int | None, subjects,
                  cache_dir: str | None) -> list[dict]:
    """MMMU's questions of ``subjects`` (default: the five "Health and Medicine" ones), in
    subject order then file order; images ``image_1``.. written to the cache. Multiple choice
    (``answer`` the letter, ``options`` the texts) or open (``answer`` the text)."""
    pq = _pyarrow()
    subjects = tuple(subjects or MMMU_MEDICAL)
    unknown = [s for s in subjects if s not in MMMU_MEDICAL]
    if unknown:
        raise ValueError(f"mmmu_med: unknown subject(s) {unknown}; MMMU's medical subjects: "
                         f"{', '.join(MMMU_MEDICAL)}")
    if cache_dir is None:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        cache_dir = os.path.join(cache, "medvl_jax", "mmmu")
    out = []
    for subject in subjects:
        files = parquet_files(data_dir, split, subject)
        if not files:
            raise DataError(f"no {split} parquet files under {subject}/; "
                            f"{B._expects('mmmu_med')}", where=data_dir, reason="missing")
        for path in files:
            names = pq.read_schema(path).names
            _check_columns(path, names, ("id", "question", "options", "answer",
                                         "question_type", "image_1"), "mmmu_med")
            table = pq.read_table(path).to_pylist()
            st = os.stat(path)
            key = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
                               .encode()).hexdigest()[:12]
            out_dir = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)),
                                   f"{subject}-{split}-{key}")
            for row, rec in enumerate(table):
                where = f"{path}[{row}]"
                B._require(rec, where, ("id", "question", "answer", "question_type"))
                if limit is not None and len(out) >= limit:
                    break
                images = [f for k, col in enumerate(MMMU_IMAGES) if col in names
                          for f in [_image_file(rec.get(col), out_dir, f"{row:05d}_{k + 1}",
                                                path, where)] if f]
                options = _mmmu_options(rec.get("options"), where)
                question = B._text(rec["question"])
                answer = B._text(rec["answer"])
                kind = B._text(rec["question_type"])
                if kind == "multiple-choice":
                    if (len(answer) != 1 or answer.upper() not in B.LETTERS
                            or B.LETTERS.index(answer.upper()) >= len(options)):
                        raise DataError(f"answer {answer!r} is not the letter of one of the "
                                        f"options {options}", where=where, reason="bad_record")
                    text, qtype = B.format_multiple_choice(question, options), "multiple_choice"
                    extra = {"answer_text": options[B.LETTERS.index(answer.upper())]}
                else:
                    text, qtype, extra = question, "open", {}
                out.append(_example("mmmu_med", B._text(rec["id"]), images, text, answer,
                                    qtype, where, options=options if kind ==
                                    "multiple-choice" else (), question_text=question,
                                    category=subject, subfield=B._field(rec, "subfield"),
                                    **extra))
    return B._finish(out, limit)
