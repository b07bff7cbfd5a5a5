"""Preference pairs (chosen / rejected) made from MedSynth studies, for DPO.

Three kinds of pair, all for one image and one question:

* ``text`` — a text hallucination. Same image and prompt; chosen = the right answer, rejected =
  a different *valid* answer of the same question type (yes <-> no, another option letter,
  another count, a size 5-10 mm off, a box moved by its own width, another progression or
  side/zone word). The model learns to prefer what the image shows over a plausible
  alternative.
* ``visual`` — a visual hallucination (conditional preference). Same prompt and the same right
  answer; chosen is conditioned on the clean image, rejected on the image whose findings were
  noised away (every nodule box replaced by noise with the statistics of its surroundings).
  The answer is only supported by the finding, so the pair rewards answers whose likelihood
  rests on the image evidence rather than on language priors. The other orientation (right
  answer on the corrupted image as chosen) would teach the model to report findings that are
  not visible. Only questions whose answer depends on a nodule are used (nodule location,
  size, box, multiple choice, open side/zone, a non-zero count, and closed questions answered
  "yes"), on chest radiographs (``cxr``) with at least one nodule; otherwise a text pair is
  made.
* ``mistake`` — the starting model's own error (on-policy rejected answers). Same image and
  prompt; chosen = the right answer, rejected = an answer the model gave (sampled or greedy)
  that was scored wrong (:func:`mistake_pairs`; the DPO task mines them before training).
  Synthetic wrong answers are mostly ones the model already rules out; its own mistakes are
  the ones its likelihood prefers, which is where DPO has something to move.

Or from your files: a ``preferences`` source (``{"kind": "preferences", "path": ...,
"image_root": ...}``, see :class:`PreferenceFile`) holds ready pairs, one JSON object per line.

A pair example::

    {"id", "messages" (the user turn), "chosen", "rejected" (answer texts),
     "images_chosen", "images_rejected" (lists of arrays), "meta": {"pair_kind",
     "question_type", "template", "answer", "modality", "weight"}}

:func:`build_dataset` turns pairs into fixed-shape batches (both sides featurized with the same
augmentation draw)::

    chosen_tokens / rejected_tokens          int32 [B, L]
    chosen_input_mask / rejected_input_mask  bool  [B, L]
    chosen_mask_ar / rejected_mask_ar        int32 [B, L]
    chosen_loss_mask / rejected_loss_mask    int32 [B, L]  (the answer tokens)
    chosen_images / rejected_images          float32 [B, N, H, W, C]
    image_mask                               bool  [B, N]
    weight                                   float32 [B]   (per-pair weight)
"""
from __future__ import annotations

import json
import os
import re

import grain
import numpy as np

from medvl_jax.data import pipeline, sources
from medvl_jax.data.errors import DataError, SkipCounter, guarded

PAIR_KINDS = ("text", "visual", "mistake")
_FILE_FIELDS = {"kind", "weight", "path", "image_root", "allow_outside_root"}
SIDES, ZONES = ("left", "right"), ("upper", "middle", "lower")
_WORD_SETS = (("left", "right", "both"), SIDES, ZONES, ("new", "grown", "resolved", "stable"))
_RANGE = re.compile(r"\s*(\d+)\s*-\s*(\d+)\s*")
_NUMBER = re.compile(r"\d+")


# --------------------------------------------------------------------------------------------
# Wrong answers (text hallucinations).
# --------------------------------------------------------------------------------------------

def wrong_answer(qa: dict, rng: np.random.Generator) -> str | None:
    """A valid answer of ``qa``'s question type that differs from its answer, or None."""
    answer, qtype = str(qa["answer"]).strip(), qa["type"]
    if qtype == "closed":
        return {"yes": "no", "no": "yes"}.get(answer.lower())
    if qtype == "multiple_choice":
        n = len(qa.get("options") or ()) or 4
        others = [c for c in "ABCD"[:n] if c != answer.upper()]
        return others[int(rng.integers(len(others)))] if others else None
    if qtype == "counting":
        k = int(answer)
        others = [c for c in range(4) if c != k]
        return str(others[int(rng.integers(len(others)))])
    if qtype == "size":
        mm = int(_NUMBER.search(answer).group())
        delta = int(rng.integers(5, 11)) * (1 if mm < 20 or rng.random() < 0.5 else -1)
        return f"{max(mm + delta, 1)} mm"
    if qtype == "box":
        x0, y0, x1, y1 = (int(v) for v in _NUMBER.findall(answer)[:4])
        w, h = x1 - x0, y1 - y0
        dx = w + 1 if x1 + w + 1 <= 100 else -(w + 1)  # Moved by its width: IoU 0.
        return "[{}, {}, {}, {}]".format(x0 + dx, y0, x1 + dx, y1)
    low = answer.lower()
    for words in _WORD_SETS:
        if low in words:
            others = [w for w in words if w != low]
            return others[int(rng.integers(len(others)))]
    m = _RANGE.fullmatch(answer)
    if m:  # CT slice ranges: shift by the range's length.
        a, b = int(m.group(1)), int(m.group(2))
        return f"{a + (b - a + 1)}-{b + (b - a + 1)}"
    return None


# --------------------------------------------------------------------------------------------
# Corrupted images (visual hallucinations).
# --------------------------------------------------------------------------------------------

def noise_boxes(image: np.ndarray, boxes, rng: np.random.Generator, *,
                margin: float = 0.02) -> np.ndarray:
    """``image`` ([H, W], any dtype) with every box (``[x0, y0, x1, y1]`` in percent of width
    and height) replaced by Gaussian noise with the mean and std of a ring around it."""
    img = np.asarray(image)
    out = img.astype(np.float32).copy()
    h, w = img.shape[:2]
    for box in boxes:
        x0, y0, x1, y1 = (float(v) / 100.0 for v in box)
        r0, r1 = int(np.floor((y0 - margin) * h)), int(np.ceil((y1 + margin) * h))
        c0, c1 = int(np.floor((x0 - margin) * w)), int(np.ceil((x1 + margin) * w))
        r0, c0, r1, c1 = max(r0, 0), max(c0, 0), min(r1, h), min(c1, w)
        if r1 <= r0 or c1 <= c0:
            continue
        pr, pc = max((r1 - r0) // 2, 1), max((c1 - c0) // 2, 1)
        ring = img[max(r0 - pr, 0):min(r1 + pr, h), max(c0 - pc, 0):min(c1 + pc, w)]
        ring = ring.astype(np.float32)
        ro, co = max(r0 - pr, 0), max(c0 - pc, 0)  # The ring's origin.
        inner = np.ones(ring.shape, bool)
        inner[r0 - ro:r1 - ro, c0 - co:c1 - co] = False
        vals = ring[inner] if inner.any() else ring.ravel()
        out[r0:r1, c0:c1] = rng.normal(vals.mean(), vals.std() + 1e-6, (r1 - r0, c1 - c0))
    if np.issubdtype(img.dtype, np.integer):
        info = np.iinfo(img.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(img.dtype)


def depends_on_nodules(qa: dict) -> bool:
    """Whether removing every nodule takes away the evidence for ``qa``'s answer."""
    tpl, ans = qa.get("template", ""), str(qa["answer"]).strip().lower()
    if "nodule" not in tpl:
        return False
    if qa["type"] == "closed":
        return ans == "yes"
    if qa["type"] == "counting":
        return ans not in ("0", "none")
    return True


# --------------------------------------------------------------------------------------------
# Pairs.
# --------------------------------------------------------------------------------------------

def _qa_list(record: dict) -> list[dict]:
    qa = record["qa"]
    return json.loads(sources._text(qa)) if isinstance(qa, (str, bytes)) else list(qa)


def make_pair(record: dict, rng: np.random.Generator, *, visual_fraction: float = 0.5,
              question_types=(), weights: dict | None = None) -> dict | None:
    """One preference pair of a MedSynth study (see the module docstring), or None when the
    study has no question of ``question_types`` with a wrong answer.

    A visual pair is drawn with probability ``visual_fraction`` when the study allows one.
    ``weights``: per-pair weight by pair kind (default 1.0).
    """
    if not 0.0 <= visual_fraction <= 1.0:
        raise ValueError(f"visual_fraction must be in [0, 1], got {visual_fraction}")
    qas = [q for q in _qa_list(record) if not question_types or q["type"] in question_types]
    findings = json.loads(sources._text(record["findings"]))
    kind = sources._text(record["kind"])
    boxes = [n["box"] for n in findings.get("nodules", [])] if kind == "cxr" else []
    visual = [q for q in qas if boxes and depends_on_nodules(q)]
    pair_kind = "visual" if visual and rng.random() < visual_fraction else "text"
    if pair_kind == "visual":
        qa = visual[int(rng.integers(len(visual)))]
        chosen = rejected = str(qa["answer"])
    else:
        order = rng.permutation(len(qas))
        qa, rejected = None, None
        for i in order:
            rejected = wrong_answer(qas[int(i)], rng)
            if rejected is not None:
                qa = qas[int(i)]
                break
        if qa is None:
            return None
        chosen = str(qa["answer"])
    ex = sources.medsynth_to_example({**record, "qa": [qa]}, rng)
    images = ex["images"]
    bad = [noise_boxes(images[0], boxes, rng)] if pair_kind == "visual" else images
    weight = float((weights or {}).get(pair_kind, 1.0))
    return {"id": ex["id"], "messages": ex["messages"][:1], "chosen": chosen,
            "rejected": rejected, "images_chosen": images, "images_rejected": bad,
            "meta": {**ex["meta"], "pair_kind": pair_kind, "weight": weight}}


def mistake_pairs(examples: list[dict], predictions: list[dict], *,
                  weight: float = 1.0) -> list[dict]:
    """Pairs of the questions a model got wrong: ``examples`` (single-question examples, as
    :func:`medvl_jax.data.sources.medsynth_questions` makes) and the model's ``predictions``
    of them in the same order (dicts with ``id``, ``prediction`` and ``score``, as
    ``SFTTask.evaluate_model`` returns). A prediction with a score below 1 becomes the
    rejected answer, the example's reference answer the chosen one; empty predictions and
    ones equal to the answer are skipped."""
    if len(examples) != len(predictions):
        raise ValueError(f"{len(examples)} examples but {len(predictions)} predictions")
    out = []
    for ex, pred in zip(examples, predictions):
        if pred["id"] != ex["id"]:
            raise ValueError(f"prediction {pred['id']!r} does not match example {ex['id']!r}")
        answer, wrong = str(ex["meta"]["answer"]).strip(), str(pred["prediction"]).strip()
        if pred["score"] >= 1.0 or not wrong or wrong == answer:
            continue
        out.append({"id": ex["id"], "messages": ex["messages"][:1], "chosen": answer,
                    "rejected": wrong, "images_chosen": ex["images"],
                    "images_rejected": ex["images"],
                    "meta": {**ex["meta"], "pair_kind": "mistake", "weight": float(weight)}})
    return out


class PreferenceFile:
    """Preference pairs from a ``.jsonl`` file (one object per line) or a ``.json`` list::

        {"image": "a.png" (or "images": [...]), "prompt": "Is there a nodule?",
         "chosen": "Yes, in the right upper zone.", "rejected": "No.",
         "rejected_images": [...] (optional: a visual pair, the rejected side's images),
         "weight": 2.0 (optional), "id": "..." (optional)}

    Relative image paths are resolved against ``image_root`` (default: the file's directory)
    and may not leave it unless ``allow_outside_root`` (sources.image_path);
    a prompt without ``<image>`` placeholders gets one per image in front. A pair without
    ``rejected_images`` is a ``text`` pair and needs two different answers; with them, a
    ``visual`` pair (same count of images on both sides). Records without ``weight`` take
    their kind's weight from ``dpo.pair_weights``. Every record is checked when the source is
    built (errors name file:line); images are read when a pair is featurized.
    """

    def __init__(self, path: str, image_root: str | None = None, *,
                 allow_outside_root: bool = False):
        self.path = path
        root = image_root if image_root is not None else os.path.dirname(path)
        self.pairs = []
        for where, rec in sources.read_json_records(path):
            if not isinstance(rec, dict):
                raise DataError("record is not a JSON object", where=where, reason="bad_record")
            texts = {k: rec.get(k) for k in ("prompt", "chosen", "rejected")}
            bad = [k for k, v in texts.items() if not isinstance(v, str) or not v.strip()]
            if bad:
                raise DataError(f"{' and '.join(repr(k) for k in bad)} must be non-empty "
                                "strings", where=where, reason="bad_record")
            refs = {k: sources._as_list(rec.get(k)) for k in
                    ("image", "images", "rejected_image", "rejected_images")}
            bad = [k for k, v in refs.items() if not all(isinstance(x, str) and x for x in v)]
            if bad:
                raise DataError(f"{' and '.join(repr(k) for k in bad)} must be image paths "
                                "(strings)", where=where, reason="bad_record")
            images, other = ([sources.image_path(root, x, where, allow_outside=allow_outside_root)
                              for x in refs[a] + refs[b]]
                             for a, b in (("image", "images"),
                                          ("rejected_image", "rejected_images")))
            if other and len(other) != len(images):
                raise DataError(f"{len(other)} rejected images for {len(images)} images",
                                where=where, reason="bad_record")
            if not other and texts["chosen"].strip() == texts["rejected"].strip():
                raise DataError("chosen and rejected are the same answer on the same images",
                                where=where, reason="bad_record")
            weight = rec.get("weight")
            if weight is not None and (not isinstance(weight, (int, float)) or weight < 0):
                raise DataError(f"weight must be a number >= 0, got {weight!r}", where=where,
                                reason="bad_record")
            prompt = texts["prompt"]
            if sources.IMAGE_PLACEHOLDER not in prompt:
                prompt = "".join(sources.IMAGE_PLACEHOLDER + "\n" for _ in images) + prompt
            self.pairs.append({
                "id": str(rec.get("id", where)), "messages": [{"role": "user", "content": prompt}],
                "chosen": texts["chosen"], "rejected": texts["rejected"],
                "images_chosen": images, "images_rejected": other or images,
                "meta": {"pair_kind": "visual" if other else "text", "weight": weight,
                         "answer": texts["chosen"], "question_type": "",
                         "modality": str(rec.get("modality", "")), "where": where}})
        if not self.pairs:
            raise DataError("no preference pairs in the file", where=path, reason="empty")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        p = self.pairs[int(index)]
        return {**p, "images_chosen": list(p["images_chosen"]),
                "images_rejected": list(p["images_rejected"]), "meta": dict(p["meta"])}


def _file_pair(pair: dict, weights: dict | None) -> dict:
    """A :class:`PreferenceFile` pair with its weight filled in from ``weights`` by kind."""
    meta = pair["meta"]
    if meta["weight"] is None:
        meta = {**meta, "weight": float((weights or {}).get(meta["pair_kind"], 1.0))}
    return {**pair, "meta": {**meta, "weight": float(meta["weight"])}}


def featurize_pair(featurizer: pipeline.Featurizer, pair: dict,
                   rng: np.random.Generator) -> dict:
    """Model inputs of both sides of a pair (same augmentation draw for both)."""
    seed = int(rng.integers(2 ** 63))
    out = {}
    for side in ("chosen", "rejected"):
        ex = {"id": f"{pair['id']}/{side}", "images": pair[f"images_{side}"],
              "messages": pair["messages"] + [{"role": "assistant", "content": pair[side]}],
              "meta": pair["meta"]}
        feats = featurizer(ex, np.random.default_rng(seed))
        for k, v in feats.items():
            if k != "image_mask":
                out[f"{side}_{k}"] = v
        out["image_mask"] = feats["image_mask"]
    out["weight"] = np.float32(pair["meta"]["weight"])
    return out


def preference_source(path: str, weight: float = 1.0, image_root: str | None = None) -> dict:
    """Config dict for a ``preferences`` source (a :class:`PreferenceFile`)."""
    return dict(kind="preferences", weight=weight, path=path, image_root=image_root)


def build_dataset(data_cfg, tokenizer, *, visual_fraction: float = 0.5, weights=None,
                  mistakes: list[dict] | None = None, mistake_fraction: float = 0.0,
                  split: str = "train", process_index: int = 0,
                  process_count: int = 1, skips: SkipCounter | None = None) -> grain.IterDataset:
    """Batched preference pairs of the sources of ``data_cfg`` (the ``data`` config section:
    ``medsynth`` sources, pairs made on the fly, and ``preferences`` files), this process's
    shard.

    ``mistakes``: ready pairs (:func:`mistake_pairs`, already this process's share), repeated
    in a shuffled order and mixed in as ``mistake_fraction`` of the pairs (1: only these).
    Bad records are counted in ``skips`` when ``data.skip_bad_examples`` (errors.guarded)."""
    if not 0.0 <= mistake_fraction <= 1.0:
        raise ValueError(f"mistake_fraction must be in [0, 1], got {mistake_fraction}")
    if mistake_fraction > 0 and not mistakes:
        raise ValueError("mistake_fraction > 0 but there are no mistake pairs: the starting "
                         "model answered every mined question right (mine more studies or "
                         "other question types)")
    if data_cfg.batch_size % process_count:
        raise ValueError(f"data.batch_size={data_cfg.batch_size} is not divisible by the "
                         f"{process_count} processes")
    featurizer = pipeline.Featurizer(data_cfg, tokenizer, train=split == "train")
    if data_cfg.skip_bad_examples and skips is None:
        skips = SkipCounter(data_cfg.max_skip_fraction)
    guard = skips if data_cfg.skip_bad_examples else None
    parts, mix = [], []
    for i, (name, spec) in enumerate(sorted(dict(data_cfg.sources).items())):
        spec = dict(spec)
        kind = spec.get("kind")
        if kind == "preferences":
            unknown = set(spec) - _FILE_FIELDS
            if unknown:
                raise ValueError(f"data.sources.{name}: unknown field(s) {sorted(unknown)} for "
                                 f"a preferences source; allowed: {sorted(_FILE_FIELDS)}")
            ds = grain.MapDataset.source(PreferenceFile(
                spec["path"], spec.get("image_root"),
                allow_outside_root=bool(spec.get("allow_outside_root"))))
            if data_cfg.shuffle:
                ds = ds.shuffle(seed=data_cfg.seed + 7919 * i)
            parts.append(ds.repeat().random_map(
                guarded(lambda p, rng: _file_pair(p, weights), guard, first_stage=True),
                seed=data_cfg.seed + 104729 * i + 1))
            mix.append(float(spec.get("weight", 1.0)))
            continue
        if kind != "medsynth":
            raise ValueError(f"data.sources.{name}: preference pairs come from medsynth or "
                             f"preferences (JSONL file) sources, got kind={kind!r}")
        src = pipeline.build_source(name, spec, split, 1)
        types = tuple(spec.get("question_types") or ())
        ds = grain.MapDataset.source(src.records)
        if data_cfg.shuffle:
            ds = ds.shuffle(seed=data_cfg.seed + 7919 * i)

        def to_pair(record, rng, types=types):
            return make_pair(record, rng, visual_fraction=visual_fraction,
                             question_types=types, weights=weights)

        ds = ds.repeat().random_map(guarded(to_pair, guard, first_stage=True),
                                    seed=data_cfg.seed + 104729 * i + 1)
        parts.append(ds.filter(lambda x: x is not None))
        mix.append(src.weight)
    if not parts:
        raise ValueError("data.sources is empty")
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, mix)
    ds = ds[process_index::process_count]
    if mistake_fraction > 0:
        own = grain.MapDataset.source(mistakes)
        if data_cfg.shuffle:
            own = own.shuffle(seed=data_cfg.seed + 3)
        own = own.repeat()
        ds = own if mistake_fraction == 1.0 else grain.MapDataset.mix(
            [ds, own], [1.0 - mistake_fraction, mistake_fraction])
    ds = ds.random_map(guarded(lambda p, rng: featurize_pair(featurizer, p, rng), guard),
                       seed=data_cfg.seed + 2)
    ds = ds.filter(lambda x: x is not None)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.num_threads,
                                              prefetch_buffer_size=data_cfg.prefetch))
    return it.batch(data_cfg.batch_size // process_count, drop_remainder=True)


__all__ = ["PAIR_KINDS", "PreferenceFile", "build_dataset", "depends_on_nodules",
           "featurize_pair", "make_pair", "mistake_pairs", "noise_boxes", "preference_source",
           "wrong_answer"]
