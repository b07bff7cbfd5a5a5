"""Image–text pairs for contrastive pretraining: sources, text sampling, grain pipeline.

    sources (MedSynth cxr/ct studies, {"image", "text"} JSONL files, {"image", "labels"} JSONL
    files captioned by templates), each shuffled and repeated with its own seed
      → one pair per record: (image, text), the text sampled with the record's grain rng
      → mixed by weight → this process's shard → decode + preprocess the image, tokenise
      → fixed-shape batches

Batches (static shapes, so the jitted step compiles once)::

    images      float32 [B, H, W, C] (2D) or [B, D, H, W, C] (volumes, ``data.volume_shape``)
    tokens      int32   [B, L]  text token ids, padded with the tokenizer's pad id
    input_mask  bool    [B, L]  True on real tokens

``L`` is ``data.max_length``. Texts are sampled ConVIRT-style: ``sentences = k > 0`` keeps k
random sentences of the report (in report order), ``k = 0`` the whole report. The choice is
made with the rng grain gives each element of the repeated dataset, so it is deterministic in
(seed, epoch, index) and differs from epoch to epoch.

Source entries of ``config.data.sources`` (kind and weight, plus the kind's fields)::

    {"kind": "medsynth", "medsynth_kind": "cxr" | "ct", "num_studies", "render_size",
     "volume_shape", "seed"}                                (see pipeline.medsynth_source)
    {"kind": "pairs", "path": "x.jsonl", "image_root": None}     lines {"image": path, "text"}
    {"kind": "labels", "path": "x.jsonl", "image_root": None}    lines {"image": path,
        "labels": {name: bool}} or {"image": path, "label": name}; captions by templates
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from medvl_jax.data import pipeline, sources
from medvl_jax.data.errors import DataError, SkipCounter, guarded

# --------------------------------------------------------------------------------------------
# Text: sentences of a report, label captions.
# --------------------------------------------------------------------------------------------

_HEADER = re.compile(r"\b(?:FINDINGS|IMPRESSION|COMPARISON|HISTORY|INDICATION|TECHNIQUE):\s*")
_SPLIT = re.compile(r"(?<=[.!?])\s+")
_ENUM = re.compile(r"^\d+[.)]$")


def report_sentences(report: str) -> list[str]:
    """The sentences of a report, section headers (FINDINGS:, IMPRESSION:, ...) and list
    numbers ("1.") removed, in order."""
    out = []
    for part in _HEADER.split(report):
        for s in _SPLIT.split(part.strip()):
            s = s.strip()
            if s and not _ENUM.match(s):
                out.append(s)
    return out


def sample_text(report: str, rng: np.random.Generator, sentences: int) -> str:
    """``sentences`` random sentences of ``report`` (kept in report order, joined by spaces);
    the whole report when ``sentences`` is 0 or the report has no more sentences than that."""
    if sentences < 0:
        raise ValueError(f"sentences must be >= 0, got {sentences}")
    if sentences == 0:
        return report
    parts = report_sentences(report)
    if len(parts) <= sentences:
        return " ".join(parts) if parts else report
    keep = np.sort(rng.choice(len(parts), size=sentences, replace=False))
    return " ".join(parts[i] for i in keep)


# name -> (templates when present, templates when absent); "{name}" is the label itself.
CAPTION_TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "nodule": (("Pulmonary nodule.", "A nodule is seen in the lung."),
               ("No pulmonary nodule.", "The lungs are clear.")),
    "effusion": (("Pleural effusion.", "There is a pleural effusion."),
                 ("No pleural effusion.", "The costophrenic angles are sharp.")),
    "cardiomegaly": (("Cardiomegaly.", "The heart is enlarged."),
                     ("Heart size is normal.", "No cardiomegaly.")),
}
_DEFAULT_TEMPLATES = (("{Name}.", "There is {name}."), ("No {name}.", "No evidence of {name}."))


def caption_from_labels(labels: Mapping[str, bool] | Sequence[str] | str,
                        rng: np.random.Generator | None = None,
                        templates: Mapping[str, tuple[Sequence[str], Sequence[str]]] | None = None
                        ) -> str:
    """A caption for a label-only example: one sentence per label, in label order.

    ``labels``: {name: present} (absent labels get a negative sentence), or the names of the
    labels present (a string is one label). ``templates``: name → (present templates, absent
    templates), default :data:`CAPTION_TEMPLATES`; other names use "{Name}." / "No {name}.".
    ``rng`` picks one template per label (None: the first).
    """
    if isinstance(labels, str):
        labels = {labels: True}
    elif not isinstance(labels, Mapping):
        labels = {str(name): True for name in labels}
    if not labels:
        raise ValueError("caption_from_labels: no labels")
    table = CAPTION_TEMPLATES if templates is None else templates
    out = []
    for name, present in labels.items():
        if not isinstance(present, (bool, np.bool_, int)):
            raise ValueError(f"label {name!r}: value must be a bool, got {present!r}")
        pos, neg = table.get(name, _DEFAULT_TEMPLATES)
        options = pos if present else neg
        tpl = options[0] if rng is None else options[int(rng.integers(len(options)))]
        words = name.replace("_", " ")
        out.append(tpl.format(name=words, Name=words[:1].upper() + words[1:]))
    return " ".join(out)


# --------------------------------------------------------------------------------------------
# Sources: records → pairs {"id", "image" (array or path), "text" | "labels", "modality"}.
# --------------------------------------------------------------------------------------------

class JsonlPairs:
    """Records of a JSONL file of pairs: each line ``{"image": path, "text": str}`` (or, with
    ``labels=True``, ``{"image": path, "labels": {name: bool}}`` / ``{"image": path, "label":
    name}``). Paths are relative to ``image_root`` (default: the file's directory). Every line
    is checked when the source is built; a bad one raises DataError naming file:line."""

    def __init__(self, path: str, image_root: str | None = None, *, labels: bool = False,
                 allow_outside_root: bool = False):
        if not os.path.exists(path):
            raise DataError("file not found", where=path, reason="missing")
        self.path = path
        root = image_root if image_root is not None else os.path.dirname(path)
        self.records = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"invalid JSON ({e.msg})", where=where,
                                    reason="bad_json") from None
                if not isinstance(rec, dict):
                    raise DataError("line is not a JSON object", where=where, reason="bad_record")
                image = rec.get("image")
                if not isinstance(image, str) or not image:
                    raise DataError('no "image" (a path) in the pair', where=where,
                                    reason="bad_record")
                out = {"id": str(rec.get("id", where)), "where": where,
                       "image": sources.image_path(root, image, where,
                                                   allow_outside=allow_outside_root),
                       "modality": rec.get("modality")}
                if labels:
                    lab = rec.get("labels", rec.get("label"))
                    if lab is None or lab == {} or lab == []:
                        raise DataError('no "labels" or "label" in the record', where=where,
                                        reason="bad_record")
                    out["labels"] = lab
                else:
                    text = rec.get("text")
                    if not isinstance(text, str) or not text.strip():
                        raise DataError('no "text" (a non-empty string) in the pair',
                                        where=where, reason="bad_record")
                    out["text"] = text
                self.records.append(out)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return dict(self.records[int(index)])


@dataclasses.dataclass(frozen=True)
class PairSource:
    """A configured source: its records and ``to_pair(record, rng) -> pair``."""
    name: str
    records: Any
    to_pair: Callable[[Any, np.random.Generator], dict]
    weight: float = 1.0


_FIELDS = {
    "medsynth": {"kind", "weight", "medsynth_kind", "num_studies", "render_size",
                 "volume_shape", "seed", "question_types"},
    "pairs": {"kind", "weight", "path", "image_root", "allow_outside_root"},
    "labels": {"kind", "weight", "path", "image_root", "allow_outside_root"},
}


def medsynth_pair(record: dict, rng: np.random.Generator, *, sentences: int) -> dict:
    """A MedSynth study → a pair with ``sentences`` random sentences of its report."""
    if record["kind"] == "longitudinal":
        raise DataError("longitudinal studies (two images) are not image-text pairs; use "
                        "medsynth_kind cxr or ct", where=record["id"], reason="bad_config")
    return {"id": record["id"], "image": record["image"], "modality": record["modality"],
            "text": sample_text(record["report"], rng, sentences)}


def medsynth_label_pair(record: dict, rng: np.random.Generator) -> dict:
    """A MedSynth study → an image–labels pair (:func:`medsynth_labels`, regional too)."""
    del rng
    if record["kind"] == "longitudinal":
        raise DataError("longitudinal studies (two images) are not image-label pairs; use "
                        "medsynth_kind cxr or ct", where=record["id"], reason="bad_config")
    return {"id": record["id"], "image": record["image"], "modality": record["modality"],
            "labels": medsynth_labels(record, regional=True)}


def build_source(name: str, spec: Mapping, split: str, sentences: int, *,
                 labels: bool = False) -> PairSource:
    """One entry of ``data.sources`` for ``split`` as a :class:`PairSource`: image–text pairs,
    or with ``labels`` image–labels pairs (MedSynth findings, label JSONL files)."""
    spec = dict(spec)
    kind = spec.get("kind")
    if kind not in _FIELDS:
        raise ValueError(f"data.sources.{name}.kind must be one of {sorted(_FIELDS)} for "
                         f"contrastive pairs, got {kind!r}")
    unknown = set(spec) - _FIELDS[kind]
    if unknown:
        raise ValueError(f"data.sources.{name}: unknown field(s) {sorted(unknown)} for a {kind} "
                         f"source; allowed: {sorted(_FIELDS[kind])}")
    weight = float(spec.get("weight", 1.0))
    if labels:
        if kind == "pairs":
            raise ValueError(f"data.sources.{name} is an image-text (pairs) source; "
                             f"classification needs labels: a medsynth or labels source")
        if kind == "medsynth":
            return PairSource(name, medsynth_records(spec, split), medsynth_label_pair, weight)
        src = JsonlPairs(spec["path"], spec.get("image_root"), labels=True,
                         allow_outside_root=bool(spec.get("allow_outside_root")))
        return PairSource(name, src, lambda r, rng: r, weight)
    if kind == "medsynth":
        src = medsynth_records(spec, split)
        return PairSource(name, src, lambda r, rng: medsynth_pair(r, rng, sentences=sentences),
                          weight)
    outside = bool(spec.get("allow_outside_root"))
    if kind == "pairs":
        src = JsonlPairs(spec["path"], spec.get("image_root"), allow_outside_root=outside)
        return PairSource(name, src, lambda r, rng: {
            **r, "text": sample_text(r["text"], rng, sentences)}, weight)
    src = JsonlPairs(spec["path"], spec.get("image_root"), labels=True,
                     allow_outside_root=outside)
    return PairSource(name, src, lambda r, rng: {
        **r, "text": caption_from_labels(r["labels"], rng)}, weight)


def medsynth_records(spec: Mapping, split: str, num_studies: int | None = None, *,
                     render: bool = True):
    """The MedSynth source of a ``data.sources`` entry for ``split`` (``num_studies``
    overrides the entry's count)."""
    from medvl_jax.data import medsynth

    return medsynth.MedSynthSource(medsynth.MedSynthConfig(
        kind=spec["medsynth_kind"], split=split,
        num_studies=int(spec["num_studies"] if num_studies is None else num_studies),
        image_size=int(spec["render_size"]), volume_shape=tuple(spec["volume_shape"]),
        seed=int(spec["seed"])), render=render)


# --------------------------------------------------------------------------------------------
# Pair → model inputs.
# --------------------------------------------------------------------------------------------

def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens int32 [N, L], input_mask bool [N, L])``: texts tokenised (special tokens as
    the tokenizer adds them), cut to ``max_length`` on the right, padded with the pad id."""
    pad = tokenizer.pad_token_id
    if pad is None:
        raise ValueError("the tokenizer has no pad token")
    tokens = np.full((len(texts), max_length), pad, np.int32)
    mask = np.zeros((len(texts), max_length), bool)
    for i, text in enumerate(texts):
        ids = tokenizer(text)["input_ids"][:max_length]
        tokens[i, :len(ids)] = ids
        mask[i, :len(ids)] = True
    return tokens, mask


def label_vector(labels: Mapping[str, bool] | Sequence[str] | str, names: Sequence[str],
                 where: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """``(values float32 [K], known bool [K])`` of ``labels`` over ``names``.

    A dict says present/absent for the names it has and nothing about the others (unknown,
    masked out of the loss); a list (or one string) names the labels present, all others are
    absent. Names outside ``names`` are ignored."""
    values = np.zeros(len(names), np.float32)
    if isinstance(labels, Mapping):
        known = np.zeros(len(names), bool)
        for i, name in enumerate(names):
            if name in labels:
                v = labels[name]
                if not isinstance(v, (bool, np.bool_, int)):
                    raise DataError(f"label {name!r}: value must be a bool, got {v!r}",
                                    where=where, reason="bad_record")
                values[i], known[i] = float(bool(v)), True
        return values, known
    present = {labels} if isinstance(labels, str) else {str(x) for x in labels}
    for i, name in enumerate(names):
        values[i] = float(name in present)
    return values, np.ones(len(names), bool)


@dataclasses.dataclass
class PairFeaturizer:
    """One pair → ``{"images", "tokens", "input_mask"}`` of fixed shapes (no batch axis), or
    with ``label_names`` ``{"images", "labels", "label_mask"}``, or without a tokenizer (and
    labels) only ``{"images"}`` (masked-image pretraining)."""
    cfg: Any          # the data section
    tokenizer: Any
    train: bool
    label_names: tuple[str, ...] = ()

    def __post_init__(self):
        self.ops = pipeline.image_ops(self.cfg, train=self.train)
        self.image_shape = pipeline.image_shape(self.cfg)

    def image(self, pair: dict, rng: np.random.Generator | None) -> np.ndarray:
        """The preprocessed image of a pair."""
        example = {"id": pair["id"], "images": [pair["image"]],
                   "meta": {"modality": pair.get("modality")}}
        (arr,) = pipeline.decode_images(example, self.cfg)
        img = self.ops(arr, rng)
        if img.shape != self.image_shape:
            raise DataError(f"preprocessed image has shape {img.shape}, expected "
                            f"{self.image_shape}", where=pair["id"], reason="image_shape")
        return img.astype(np.float32)

    def __call__(self, pair: dict, rng: np.random.Generator) -> dict:
        if self.label_names:
            values, known = label_vector(pair["labels"], self.label_names, pair["id"])
            return {"images": self.image(pair, rng), "labels": values, "label_mask": known}
        if self.tokenizer is None:
            return {"images": self.image(pair, rng)}
        tokens, mask = tokenize(self.tokenizer, [pair["text"]], self.cfg.max_length)
        return {"images": self.image(pair, rng), "tokens": tokens[0], "input_mask": mask[0]}


def pair_dataset(cfg, *, split: str = "train", sentences: int = 1,
                 skips: SkipCounter | None = None, labels: bool = False) -> grain.MapDataset:
    """The infinite, mixed MapDataset of pairs (before sharding and featurising): each source
    shuffled (reshuffled every epoch) and repeated with its own seed, texts sampled with the
    element's rng (``labels``: image–labels pairs instead). Element ``e * len(source) + j`` of
    a single source is epoch ``e``."""
    parts, weights = [], []
    guard = skips if cfg.skip_bad_examples else None
    for i, (name, spec) in enumerate(sorted(dict(cfg.sources).items())):
        src = build_source(name, spec, split, sentences, labels=labels)
        if len(src.records) == 0:
            raise ValueError(f"data.sources.{name} has no records")
        ds = grain.MapDataset.source(src.records)
        if cfg.shuffle:
            ds = ds.shuffle(seed=cfg.seed + 7919 * i)
        ds = ds.repeat().random_map(guarded(src.to_pair, guard, first_stage=True),
                                    seed=cfg.seed + 104729 * i + 1)
        parts.append(ds)
        weights.append(src.weight)
    return parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)


def build_iterator(cfg, tokenizer, *, split: str = "train", sentences: int = 1,
                   process_index: int = 0, process_count: int = 1,
                   skips: SkipCounter | None = None, label_names: Sequence[str] = ()):
    """A grain iterator (``get_state`` / ``set_state``) over this process's batches of pairs
    (``data.batch_size / process_count`` rows each); with ``label_names``, of image–labels
    pairs; with no ``tokenizer``, of images only (see PairFeaturizer)."""
    if cfg.batch_size % process_count:
        raise ValueError(f"data.batch_size={cfg.batch_size} is not divisible by the "
                         f"{process_count} processes")
    if cfg.skip_bad_examples and skips is None:
        skips = SkipCounter(cfg.max_skip_fraction)
    guard = skips if cfg.skip_bad_examples else None
    featurize = PairFeaturizer(cfg, tokenizer, train=split == "train",
                               label_names=tuple(label_names))
    ds = pair_dataset(cfg, split=split, sentences=sentences, skips=skips,
                      labels=bool(label_names))
    ds = ds[process_index::process_count]
    ds = ds.random_map(guarded(featurize, guard), seed=cfg.seed + 2)
    ds = ds.filter(lambda x: x is not None)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads,
                                                 prefetch_buffer_size=cfg.prefetch))
    return iter(it_ds.batch(cfg.batch_size // process_count, drop_remainder=True))


# --------------------------------------------------------------------------------------------
# Evaluation sets: MedSynth images, reports and finding labels.
# --------------------------------------------------------------------------------------------

def in_chunks(fn: Callable, arrays: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    """``fn(*chunk)`` over the rows of ``arrays`` in chunks of ``batch_size``, concatenated;
    the last chunk is padded by repeating its last row (and the padding dropped), so that a
    jitted ``fn`` compiles once."""
    n, out = len(arrays[0]), []
    for s in range(0, n, batch_size):
        chunk = [a[s:s + batch_size] for a in arrays]
        pad = batch_size - len(chunk[0])
        if pad:
            chunk = [np.concatenate([c, np.repeat(c[-1:], pad, 0)]) for c in chunk]
        out.append(np.asarray(fn(*chunk))[:batch_size - pad])
    return np.concatenate(out)


def check_images(cfg, vision) -> None:
    """Raises ValueError naming the fields when the data section's images (2D or volumes,
    size, channels) do not fit the vision tower config ``vision``."""
    if cfg.volume_shape is None:
        if vision.tubelet:
            raise ValueError("model.vision.tubelet > 0 (volumes) but data.volume_shape is "
                             "None (2D images)")
        if cfg.image_size != vision.image_size:
            raise ValueError(f"data.image_size={cfg.image_size} but model.vision.image_size="
                             f"{vision.image_size}")
    elif not vision.tubelet:
        raise ValueError("data.volume_shape is set (volumes) but model.vision.tubelet is 0")
    if cfg.channels != vision.num_channels:
        raise ValueError(f"data.channels={cfg.channels} but model.vision.num_channels="
                         f"{vision.num_channels}")


def medsynth_labels(record: dict, *, regional: bool = False) -> dict[str, bool]:
    """Binary findings of a MedSynth study: cxr → nodule, effusion, cardiomegaly;
    ct → nodule. ``regional`` adds, for cxr, a nodule per lung zone (``nodule_right_upper``
    ... ``nodule_left_lower``) and an effusion per side (``effusion_right``,
    ``effusion_left``)."""
    f = json.loads(record["findings"])
    if f["kind"] == "cxr":
        out = {"nodule": f["nodule_count"] > 0, "effusion": f["effusion"] != "none",
               "cardiomegaly": bool(f["cardiomegaly"])}
        if regional:
            from medvl_jax.data.medsynth import findings

            cells = {(n["side"], n["zone"]) for n in f["nodules"]}
            for side, zone in findings.CELLS:
                out[f"nodule_{side}_{zone}"] = (side, zone) in cells
            for side in findings.SIDES:
                out[f"effusion_{side}"] = f["effusion"] in (side, "both")
        return out
    if f["kind"] == "ct":
        return {"nodule": f["lesion_count"] > 0}
    raise DataError(f"no binary labels for MedSynth kind {f['kind']!r}", where=record["id"],
                    reason="bad_config")


def eval_set(cfg, srcs: Mapping[str, Mapping], split: str, limit: int = 0) -> dict:
    """Images with their texts and labels, for evaluators, from the named sources ``srcs``
    (entries like those of ``data.sources``, in name order; ``limit`` > 0: the first
    ``limit`` records of each):

    * ``medsynth``: each study's report and its findings (:func:`medsynth_labels`, regional
      ones included) — ``split`` picks the studies;
    * ``pairs`` JSONL: each line's text;
    * ``labels`` JSONL: each line's labels (a label a line does not state is unknown).

    Returns ``{"images": float32 [N, ...] (preprocessed as at test time by ``cfg``), "texts":
    [str | None], "labels": {name: int8 [N]}}`` with labels 1 (present), 0 (absent) and -1
    (unknown).
    """
    feat = PairFeaturizer(cfg, None, train=False)
    images, texts, labels = [], [], []
    for name, spec in sorted(dict(srcs).items()):
        spec = dict(spec)
        kind = spec.get("kind")
        if kind == "medsynth":
            records = medsynth_records(spec, split)
        elif kind in ("pairs", "labels"):
            records = JsonlPairs(spec["path"], spec.get("image_root"), labels=kind == "labels")
        else:
            raise ValueError(f"evaluation data {name!r}: kind must be medsynth, pairs or labels "
                             f"for image evaluators, got {kind!r}")
        n = len(records) if not limit else min(int(limit), len(records))
        for i in range(n):
            rec = records[i]
            images.append(feat.image({"id": rec["id"], "image": rec["image"],
                                      "modality": rec.get("modality")}, None))
            if kind == "medsynth":
                texts.append(rec["report"])
                labels.append(medsynth_labels(rec, regional=True))
            elif kind == "pairs":
                texts.append(rec["text"])
                labels.append({})
            else:
                texts.append(None)
                lab = rec["labels"]
                if isinstance(lab, (str, list)):  # The labels named; every other is absent.
                    labels.append({"*": False, **{str(k): True for k in (
                        [lab] if isinstance(lab, str) else lab)}})
                else:
                    labels.append({str(k): bool(v) for k, v in lab.items()})
    names = sorted({k for row in labels for k in row} - {"*"})
    table = {k: np.asarray([int(row[k]) if k in row else 0 if "*" in row else -1
                            for row in labels], np.int8) for k in names}
    return {"images": np.stack(images) if images else np.zeros((0,)), "texts": texts,
            "labels": table}
