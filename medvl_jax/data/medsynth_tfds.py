"""MedSynth as a TFDS dataset builder (array_record files; TensorFlow is not needed).

Build once, read many times (e.g. by many hosts of a pod, or with a large ``num_studies``)::

    python -m medvl_jax.data.medsynth_tfds --data_dir ~/tensorflow_datasets --config cxr

then use the source ``{"kind": "tfds", "name": "medsynth/cxr", "data_dir": ...}`` in a config.
Records hold exactly what :class:`~medvl_jax.data.medsynth.MedSynthSource` returns, with the
question list stored as JSON text (TFDS features have fixed structure).
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import tensorflow_datasets as tfds

from medvl_jax.data import medsynth


@dataclasses.dataclass
class MedSynthBuilderConfig(tfds.core.BuilderConfig):
    """Which MedSynth kind, at what size. Splits come from disjoint seeds."""
    kind: str = "cxr"
    num_train: int = 2000
    num_val: int = 200
    num_test: int = 500
    image_size: int = 128
    volume_shape: tuple[int, int, int] = (32, 64, 64)
    seed: int = 0


class Medsynth(tfds.core.GeneratorBasedBuilder):
    """MedSynth: synthetic chest radiographs, CT volumes and longitudinal pairs with reports
    and question–answer pairs. Generated locally, deterministic by seed."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        MedSynthBuilderConfig(name="cxr", kind="cxr", description="2D chest radiographs."),
        MedSynthBuilderConfig(name="ct", kind="ct", description="3D CT volumes (HU)."),
        MedSynthBuilderConfig(name="longitudinal", kind="longitudinal",
                              description="Prior + current radiograph pairs."),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        if c.kind == "ct":
            image = tfds.features.Tensor(shape=tuple(c.volume_shape), dtype=np.int16)
            spacing = tfds.features.Tensor(shape=(3,), dtype=np.float32)
        else:
            shape = (c.image_size,) * 2
            image = tfds.features.Tensor(shape=((2,) + shape) if c.kind == "longitudinal"
                                         else shape, dtype=np.uint8)
            spacing = tfds.features.Tensor(shape=(2,), dtype=np.float32)
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(), "kind": tfds.features.Text(),
                "modality": tfds.features.Text(), "image": image, "spacing": spacing,
                "report": tfds.features.Text(), "findings": tfds.features.Text(),
                "qa": tfds.features.Text(),
            }),
            homepage="https://github.com/medvl-jax/medvl_jax",
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        sizes = {"train": c.num_train, "val": c.num_val, "test": c.num_test}
        return {split: self._generate_examples(split, n) for split, n in sizes.items()}

    def _generate_examples(self, split: str, num_studies: int):
        c = self.builder_config
        src = medsynth.MedSynthSource(medsynth.MedSynthConfig(
            kind=c.kind, split=split, num_studies=num_studies, image_size=c.image_size,
            volume_shape=tuple(c.volume_shape), seed=c.seed))
        for i in range(len(src)):
            rec = src[i]
            yield rec["id"], {
                "id": rec["id"], "kind": rec["kind"], "modality": rec["modality"],
                "image": rec["image"], "spacing": np.asarray(rec["spacing"], np.float32),
                "report": rec["report"], "findings": rec["findings"],
                "qa": json.dumps(rec["qa"]),
            }


def build(data_dir: str, config: str | MedSynthBuilderConfig = "cxr") -> Medsynth:
    """Generates MedSynth array_record files under ``data_dir`` (no-op if already built)."""
    builder = Medsynth(config=config, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--config", default="cxr", choices=["cxr", "ct", "longitudinal"])
    args = p.parse_args(argv)
    b = build(args.data_dir, args.config)
    print(f"built {b.info.full_name} in {b.data_dir}: "
          + ", ".join(f"{k}={v.num_examples}" for k, v in b.info.splits.items()))


if __name__ == "__main__":
    main()
