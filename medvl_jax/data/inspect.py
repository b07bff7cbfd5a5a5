"""Look at what a config feeds the model: decoded examples, token counts and an image grid.

    python -m medvl_jax.data.inspect --config configs/medsynth_sft.py [--split train]
        [--num 8] [--out /tmp/medvl_inspect.png] [--config.data.image_size=96]

Prints, per example: id, images (shapes), the conversation, the answer, the question type and
the token counts (total / image / trained-on), then writes a PNG grid of the preprocessed
images (middle slice for volumes) to look at.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
from PIL import Image as PILImage

from medvl_jax import config as config_lib
from medvl_jax.data import pipeline


def _to_uint8(img: np.ndarray, mean: float, std: float) -> np.ndarray:
    """A preprocessed image [..., C] back to a displayable 2D uint8 (middle slice of volumes)."""
    x = img * std + mean
    if x.ndim == 4:
        x = x[x.shape[0] // 2]
    x = x[..., 0] if x.shape[-1] != 3 else x
    return (np.clip(x, 0, 1) * 255).astype(np.uint8)


def image_grid(images: list[np.ndarray], cols: int = 4) -> PILImage.Image:
    """Tiles equally sized uint8 images (gray or RGB) into one picture."""
    h, w = images[0].shape[:2]
    rows = (len(images) + cols - 1) // cols
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im[..., None] if im.ndim == 2 else im
    return PILImage.fromarray(grid)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Print decoded examples of a config's data.")
    p.add_argument("--config", required=True, help="configs/<name>.py[:arg]")
    p.add_argument("--split", default="train")
    p.add_argument("--num", type=int, default=8)
    p.add_argument("--out", default="medvl_inspect.png", help="PNG grid of the images")
    overrides, rest = config_lib.parse_overrides(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(rest)
    cfg = config_lib.load_config(args.config, overrides)
    dcfg = cfg.data
    tokenizer = pipeline.make_tokenizer(cfg.tokenizer)
    featurize = pipeline.Featurizer(dcfg, tokenizer, train=args.split == "train")
    shown, rng = [], np.random.default_rng(dcfg.seed)
    for name, spec in sorted(dict(dcfg.sources).items()):
        src = pipeline.build_source(name, dict(spec), args.split, dcfg.qa_per_example)
        print(f"== source {name}: {src.records!r} (weight {src.weight})")
        for i in range(min(args.num, len(src.records))):
            ex = src.to_example(src.records[i], rng)
            feats = featurize(ex, rng)
            n_tok = int(feats["input_mask"].sum())
            n_img = int((feats["tokens"] == tokenizer.convert_tokens_to_ids("<image>")).sum())
            print(f"-- {ex['id']}  images: {[tuple(np.shape(x)) for x in ex['images']]} -> "
                  f"{feats['images'].shape[1:]}  tokens: {n_tok}/{dcfg.max_length} "
                  f"(image {n_img}, trained-on {int(feats['loss_mask'].sum())})  "
                  f"type: {ex['meta'].get('question_type', '')}")
            for m in ex["messages"]:
                print(f"   {m['role']:>9}: {m['content']!r}")
            mean, std = dcfg.normalise
            shown += [_to_uint8(img, mean, std) for img, ok in
                      zip(feats["images"], feats["image_mask"]) if ok]
    if shown:
        image_grid(shown).save(args.out)
        print(f"wrote {len(shown)} images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
