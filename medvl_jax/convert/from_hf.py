"""Hugging Face checkpoint directory -> medvl_jax checkpoint.

    python -m medvl_jax.convert.from_hf --hf_dir DIR --out DIR [--scan_layers]

Reads ``config.json`` + safetensors of a supported causal LM, VLM, text encoder (BERT,
SigLIP text) or SigLIP model (see ``medvl_jax.convert.checkpoint_io`` for the output layout)
and copies tokenizer files. A missing, corrupt or truncated file, an unsupported architecture
or ``model_type`` and tensors that do not fit the config are reported as one ``error:`` line
naming the file, with exit code 2 (``--verbose`` adds the traceback).
"""
from __future__ import annotations

import argparse
import os
import sys

from medvl_jax import cli_errors
from medvl_jax.convert import checkpoint_io, hf_io
from medvl_jax.convert import decoders as dec
from medvl_jax.convert import text as text_conv
from medvl_jax.convert import vlm as vlm_conv


# The model_type of a supported config.json -> the architecture it is converted as.
MODEL_TYPES = {**{mt: arch for arch, (_, mt) in dec.ARCHITECTURES.items()},
               **{mt: arch for arch, mt in vlm_conv.ARCHITECTURES.items()},
               "siglip": "SiglipModel", "siglip_text_model": "SiglipTextModel",
               "bert": "BertModel"}


def hf_family(hf_config: dict, where: str) -> str:
    """The supported HF architecture name of a config.json; an error naming the supported
    architectures and model types otherwise."""
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in vlm_conv.ARCHITECTURES or arch in dec.ARCHITECTURES:
            return arch
        if arch in text_conv.ARCHITECTURES:
            return text_conv.ARCHITECTURES[arch]
    model_type = hf_config.get("model_type")
    path = os.path.join(where, "config.json")
    if not archs and model_type in MODEL_TYPES:
        raise checkpoint_io.CheckpointError(
            f"{path}: no \"architectures\" entry; for model_type {model_type!r} add "
            f"\"architectures\": [\"{MODEL_TYPES[model_type]}\"]")
    known = sorted(dec.ARCHITECTURES) + sorted(vlm_conv.ARCHITECTURES) + sorted(
        text_conv.ARCHITECTURES)
    raise checkpoint_io.CheckpointError(
        f"{path}: unknown architecture {hf_config.get('architectures')} (model_type "
        f"{model_type!r}); supported architectures: {', '.join(known)}; supported model "
        f"types: {', '.join(sorted(MODEL_TYPES))}")


def convert(hf_dir: str, out_dir: str, *, scan_layers: bool = False) -> dict:
    """Converts ``hf_dir`` into a medvl_jax checkpoint at ``out_dir``; returns its meta."""
    if not os.path.isdir(hf_dir):
        raise checkpoint_io.CheckpointError(f"{hf_dir}: no such directory")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise checkpoint_io.CheckpointError(f"{hf_dir}: missing config.json")
    target = os.path.join(out_dir, checkpoint_io.PARAMS_DIR)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise checkpoint_io.CheckpointError(f"--out {out_dir} exists and is not a directory")
    if os.path.exists(target):
        raise checkpoint_io.CheckpointError(f"{target} already exists; choose an empty output "
                                            f"directory")
    shards = hf_io.shard_files(hf_dir)  # Names a missing file.
    hf_config = hf_io.read_json(hf_dir)
    family = hf_family(hf_config, hf_dir)
    for path in shards:  # Names a corrupt or truncated file before anything is converted.
        hf_io.read_header(path)
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


@cli_errors.handle_errors
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2: a user error, on one line)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf_dir", required=True, help="Hugging Face checkpoint directory")
    ap.add_argument("--out", required=True, help="output medvl_jax checkpoint directory")
    ap.add_argument("--scan_layers", action="store_true", help="stack layers for nn.scan")
    cli_errors.add_verbose_flag(ap)
    args = ap.parse_args(argv)
    meta = convert(args.hf_dir, args.out, scan_layers=args.scan_layers)
    print(f"wrote {meta['family']} checkpoint to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
