"""The MedSynth random-access source: study seeds, one study's record, the tokenizer corpus."""
from __future__ import annotations

import dataclasses
import json
import operator
from typing import Iterator

import numpy as np

from medvl_jax.data.errors import DataError
from medvl_jax.data.medsynth import findings as fnd
from medvl_jax.data.medsynth import render as _render
from medvl_jax.data.medsynth import text

KINDS = ("cxr", "ct", "longitudinal")
SPLITS = ("train", "val", "test")
# Entropy words mixed into every study seed: splits (and kinds) never share a study.
_SPLIT_WORD = {"train": 0x7A41_1E01, "val": 0x5A11_DA7E, "test": 0x7E57_0C0D}
_KIND_WORD = {"cxr": 0xC0A2, "ct": 0xC7C7, "longitudinal": 0x10C6}


@dataclasses.dataclass(frozen=True)
class MedSynthConfig:
    """Which MedSynth studies: kind, split, how many, at what size, from which seed."""
    kind: str = "cxr"            # "cxr" | "ct" | "longitudinal"
    split: str = "train"         # "train" | "val" | "test"
    num_studies: int = 1000
    image_size: int = 128        # 2D H = W
    volume_shape: tuple[int, int, int] = (32, 64, 64)
    seed: int = 0

    def __post_init__(self):
        where = "MedSynthConfig"
        if self.kind not in KINDS:
            raise DataError(f"kind must be one of {KINDS}, got {self.kind!r}", where=where,
                            reason="bad_config")
        if self.split not in SPLITS:
            raise DataError(f"split must be one of {SPLITS}, got {self.split!r}", where=where,
                            reason="bad_config")
        if self.num_studies < 0:
            raise DataError(f"num_studies must be >= 0, got {self.num_studies}", where=where,
                            reason="bad_config")
        _check_sizes(self.image_size, self.volume_shape, where)


def _check_sizes(image_size, volume_shape, where: str) -> None:
    if int(image_size) < 8:
        raise DataError(f"image_size must be >= 8, got {image_size}", where=where,
                        reason="bad_config")
    if len(tuple(volume_shape)) != 3 or min(volume_shape) < 4:
        raise DataError(f"volume_shape must be 3 sizes >= 4, got {volume_shape}", where=where,
                        reason="bad_config")


def study_seed(seed: int, split: str, kind: str, index: int) -> np.random.SeedSequence:
    """The seed of study ``index`` of (seed, split, kind)."""
    return np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF,
                                   _SPLIT_WORD[split], _KIND_WORD[kind], int(index)])


def _public(x):
    """JSON-able copy without private keys ('_...'), floats rounded."""
    if isinstance(x, dict):
        return {k: _public(v) for k, v in x.items() if not k.startswith("_")}
    if isinstance(x, (list, tuple)):
        return [_public(v) for v in x]
    if isinstance(x, float):
        return round(x, 4)
    return x


def generate_study(kind: str, study_seed: np.random.SeedSequence | int, *, image_size=128,
                   volume_shape=(32, 64, 64), render=True, study_id="") -> dict:
    """One study record (see the package docstring for its fields).

    Findings and text come from one child stream of ``study_seed``, pixels from another, so
    ``render=False`` gives exactly the same text and findings, only without the image.
    """
    where = study_id or "medsynth"
    if kind not in KINDS:
        raise DataError(f"kind must be one of {KINDS}, got {kind!r}", where=where,
                        reason="bad_config")
    _check_sizes(image_size, volume_shape, where)
    ss = (study_seed if isinstance(study_seed, np.random.SeedSequence)
          else np.random.SeedSequence(int(study_seed)))
    s_text, s_pix = ss.spawn(2)
    rng = np.random.Generator(np.random.PCG64(s_text))
    size = int(image_size)
    shape = tuple(int(s) for s in volume_shape)
    if kind == "cxr":
        f = fnd.sample_cxr(rng)
        report, qa = text.cxr_report(rng, f), text.cxr_questions(rng, f)
        spacing = np.full(2, fnd.CXR_FOV_MM / size, np.float32)
    elif kind == "longitudinal":
        f = fnd.sample_longitudinal(rng)
        report, qa = text.longitudinal_report(rng, f), text.longitudinal_questions(rng, f)
        spacing = np.full(2, fnd.CXR_FOV_MM / size, np.float32)
    else:
        f = fnd.sample_ct(rng, shape)
        report, qa = text.ct_report(rng, f), text.ct_questions(rng, f)
        spacing = np.array([fov / n for fov, n in zip(fnd.CT_FOV_MM, shape)], np.float32)
    image = None
    if render:
        prng = np.random.Generator(np.random.PCG64(s_pix))
        if kind == "cxr":
            image = _render.render_cxr(f, size, prng)
        elif kind == "longitudinal":
            image = np.stack([
                _render.render_cxr(f["prior"], size, prng, f["prior_jitter"]),
                _render.render_cxr(f["current"], size, prng)])
        else:
            image = _render.render_ct(f, shape, prng)
    return {"id": study_id, "kind": kind, "modality": "ct" if kind == "ct" else "xray",
            "image": image, "spacing": spacing, "report": report,
            "findings": json.dumps({"kind": kind, **_public(f)}), "qa": qa}


class MedSynthSource:
    """Random access to the studies of one MedSynth config (grain ``RandomAccessDataSource``).

    Record ``i`` is generated on demand from ``study_seed(seed, split, kind, i)``; nothing is
    stored, so any index is cheap and every process sees the same study for the same index.
    """

    def __init__(self, config: MedSynthConfig, *, render: bool = True):
        self.config = config
        self.render = bool(render)

    def __len__(self) -> int:
        return self.config.num_studies

    def __getitem__(self, index: int) -> dict:
        c = self.config
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(f"MedSynth index must be an integer, got {type(index).__name__}")
        if i < 0:
            i += c.num_studies
        if not 0 <= i < c.num_studies:
            raise IndexError(f"MedSynth index {index} out of range for {c.num_studies} studies")
        return generate_study(c.kind, study_seed(c.seed, c.split, c.kind, i),
                              image_size=c.image_size, volume_shape=c.volume_shape,
                              render=self.render, study_id=f"{c.kind}-{c.split}-{i:06d}")

    def __repr__(self) -> str:
        c = self.config
        return (f"MedSynthSource(kind={c.kind!r}, split={c.split!r}, num_studies={c.num_studies}, "
                f"image_size={c.image_size}, volume_shape={tuple(c.volume_shape)}, seed={c.seed}, "
                f"render={self.render})")


def corpus(num_studies: int = 2000, seed: int = 0) -> Iterator[str]:
    """All report and QA text of ``num_studies`` train studies of every kind (no pixels).

    Used to train the MedSynth tokenizer: questions, answers and reports, one string each.
    """
    for kind in KINDS:
        src = MedSynthSource(MedSynthConfig(kind=kind, split="train", num_studies=num_studies,
                                            seed=seed), render=False)
        for i in range(num_studies):
            rec = src[i]
            yield rec["report"]
            for q in rec["qa"]:
                yield q["question"]
                yield q["answer"]
