"""Hugging Face checkpoint directory -> medvl_jax checkpoint.

    python -m medvl_jax.convert.from_hf --hf_dir DIR --out DIR [--scan_layers]

Reads ``config.json`` + safetensors of a supported causal LM, VLM, text encoder (BERT,
SigLIP text) or SigLIP model (see ``medvl_jax.convert.checkpoint_io`` for the output layout)
and copies tokenizer files.
"""
from __future__ import annotations

import argparse
import os
import sys

from medvl_jax.convert import checkpoint_io, hf_io
from medvl_jax.convert import decoders as dec
from medvl_jax.convert import text as text_conv
from medvl_jax.convert import vlm as vlm_conv


def hf_family(hf_config: dict, where: str) -> str:
    """The supported HF architecture name of a config.json; a clear error otherwise."""
    for arch in hf_config.get("architectures") or []:
        if arch in vlm_conv.ARCHITECTURES or arch in dec.ARCHITECTURES:
            return arch
        if arch in text_conv.ARCHITECTURES:
            return text_conv.ARCHITECTURES[arch]
    known = sorted(dec.ARCHITECTURES) + sorted(vlm_conv.ARCHITECTURES) + sorted(
        text_conv.ARCHITECTURES)
    raise checkpoint_io.CheckpointError(
        f"{where}: unknown architecture {hf_config.get('architectures')}; supported: {known}")


def convert(hf_dir: str, out_dir: str, *, scan_layers: bool = False) -> dict:
    """Converts ``hf_dir`` into a medvl_jax checkpoint at ``out_dir``; returns its meta."""
    if not os.path.isdir(hf_dir):
        raise checkpoint_io.CheckpointError(f"{hf_dir}: no such directory")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise checkpoint_io.CheckpointError(f"{hf_dir}: missing config.json")
    hf_io.shard_files(hf_dir)  # raises naming the missing safetensors
    hf_config = hf_io.read_json(hf_dir)
    family = hf_family(hf_config, hf_dir)
    if family in text_conv.ARCHITECTURES:
        _, config, params = text_conv.load_hf_text(hf_dir, scan_layers=scan_layers)
    elif checkpoint_io.is_vlm_family(family):
        config, params = vlm_conv.load_hf_vlm(hf_dir, scan_layers=scan_layers)
    else:
        config, params = dec.load_hf_decoder(hf_dir, scan_layers=scan_layers)
    meta = {"family": family, "model_config": checkpoint_io.config_to_dict(config),
            "hf_config": hf_config}
    checkpoint_io.save_checkpoint(out_dir, params, meta)
    tok_dir = os.path.join(out_dir, checkpoint_io.TOKENIZER_DIR)
    os.makedirs(tok_dir, exist_ok=True)
    hf_io.copy_side_files(hf_dir, tok_dir)
    text_conv.copy_tokenizer_files(hf_dir, tok_dir)
    return meta


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf_dir", required=True, help="Hugging Face checkpoint directory")
    ap.add_argument("--out", required=True, help="output medvl_jax checkpoint directory")
    ap.add_argument("--scan_layers", action="store_true", help="stack layers for nn.scan")
    args = ap.parse_args(argv)
    try:
        meta = convert(args.hf_dir, args.out, scan_layers=args.scan_layers)
    except (checkpoint_io.CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {meta['family']} checkpoint to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
