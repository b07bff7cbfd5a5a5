"""Reading and writing Hugging Face checkpoint directories (safetensors + JSON side files).

Tensors are streamed: reading memory-maps each shard and yields one tensor at a time; writing
fills one shard at a time. The safetensors format (an 8-byte little-endian header length, a
JSON header of ``name -> {dtype, shape, data_offsets}``, then raw little-endian bytes) is
handled here directly so bfloat16 works through ``ml_dtypes`` without torch.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from typing import Any, Iterable, Iterator

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}

SIDE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "processor_config.json",
)


def _read_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header, 8 + n


def shard_files(model_dir: str) -> list[str]:
    """The safetensors files of a checkpoint dir (from its index json when sharded)."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        return [os.path.join(model_dir, f) for f in files]
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def iter_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(name, array)`` for each tensor of one file; arrays are memory-mapped views."""
    header, start = _read_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        a, b = info["data_offsets"]
        arr = data[start + a: start + b].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
        yield name, arr


def iter_checkpoint(model_dir: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yields every tensor of a (possibly sharded) checkpoint directory."""
    for path in shard_files(model_dir):
        yield from iter_safetensors(path)


def write_safetensors(path: str, tensors: list[tuple[str, np.ndarray]],
                      metadata: dict[str, str] | None = None) -> None:
    """Writes ``tensors`` to one safetensors file."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, arr in tensors:
        if arr.dtype not in _NAMES:
            raise ValueError(f"tensor {name}: dtype {arr.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, arr in tensors:
            f.write(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes())


def save_checkpoint(out_dir: str, tensors: Iterable[tuple[str, np.ndarray]], *,
                    max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Writes streamed tensors as ``model.safetensors`` or numbered shards plus index json.

    At most one shard's tensors are held at a time. Returns the written file names.
    """
    os.makedirs(out_dir, exist_ok=True)
    shards: list[list[str]] = []
    pending: list[tuple[str, np.ndarray]] = []
    size = total = 0
    seen: set[str] = set()

    def flush():
        nonlocal pending, size
        if pending:
            write_safetensors(os.path.join(out_dir, f"_shard{len(shards):05d}.tmp"), pending)
            shards.append([n for n, _ in pending])
            pending, size = [], 0

    for name, arr in tensors:
        if name in seen:
            raise ValueError(f"tensor {name} written twice")
        seen.add(name)
        arr = np.ascontiguousarray(arr)
        if pending and size + arr.nbytes > max_shard_bytes:
            flush()
        pending.append((name, arr))
        size += arr.nbytes
        total += arr.nbytes
    flush()
    n = len(shards)
    names = (["model.safetensors"] if n == 1
             else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)])
    for k, fname in enumerate(names):
        os.replace(os.path.join(out_dir, f"_shard{k:05d}.tmp"), os.path.join(out_dir, fname))
    if n > 1:
        weight_map = {t: fname for fname, names_k in zip(names, shards) for t in names_k}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


def read_json(model_dir: str, name: str = "config.json") -> dict:
    """Reads a JSON side file of a checkpoint dir."""
    with open(os.path.join(model_dir, name)) as f:
        return json.load(f)


def write_json(model_dir: str, obj: dict, name: str = "config.json") -> None:
    """Writes a JSON side file into a checkpoint dir."""
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, name), "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def copy_side_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copies generation config and tokenizer files that exist in ``src_dir``; returns them."""
    copied = []
    for name in SIDE_FILES:
        src = os.path.join(src_dir, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(dst_dir, name))
            copied.append(name)
    return copied
