"""Reading and writing Hugging Face checkpoint directories (safetensors + JSON side files).

Tensors are streamed: reading memory-maps each shard and yields one tensor at a time; writing
fills one shard at a time. The safetensors format (an 8-byte little-endian header length, a
JSON header of ``name -> {dtype, shape, data_offsets}``, then raw little-endian bytes) is
handled here directly so bfloat16 works through ``ml_dtypes`` without torch. A header is
checked against the file's size before any tensor is touched (:func:`read_header`), so a
corrupt or truncated file fails with one message naming it instead of a huge allocation or a
reshape error.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
from typing import Any, Iterable, Iterator

import ml_dtypes
import numpy as np

from medvl_jax.cli_errors import UserError


class CheckpointFileError(UserError):
    """A file of a checkpoint directory (safetensors, index or config JSON) is corrupt,
    truncated or describes something unsupported. ``path`` is the file; the message starts
    with it."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}")

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


# The safetensors format's own limit on the JSON header.
MAX_HEADER_BYTES = 100 * 2**20


def read_header(path: str) -> tuple[dict, int]:
    """The header of a safetensors file, every entry checked against the file's size, and the
    offset of its data; :class:`CheckpointFileError` naming the file and tensor otherwise.
    Nothing larger than the header is read."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointFileError(path, f"{size} bytes, too short for a safetensors file "
                                            f"(not one, or truncated)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointFileError(
                path, f"header length {n} exceeds the file's {size} bytes or the format's "
                      f"{MAX_HEADER_BYTES} byte limit (not a safetensors file, or truncated)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFileError(path, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointFileError(path, "header is not a JSON object")
    for name, info in header.items():
        if name != "__metadata__":
            _check_entry(path, name, info, size - 8 - n)
    return header, 8 + n


def _check_entry(path: str, name: str, info, data_bytes: int) -> None:
    """Raises naming the file and tensor unless ``info`` is a dtype, a shape and offsets that
    fit it and lie within the ``data_bytes`` after the header."""
    def fail(what: str):
        raise CheckpointFileError(path, f"tensor {name!r}: {what}")

    if not isinstance(info, dict):
        fail(f"header entry is {type(info).__name__}, not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        fail(f"unsupported dtype {dtype!r}; supported: {', '.join(_DTYPES)}")
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        fail(f"shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(
            isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        fail(f"data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    need = math.prod(shape) * _DTYPES[dtype].itemsize
    if end - begin != need:
        fail(f"data_offsets [{begin}, {end}] hold {end - begin} bytes but {dtype} {shape} "
             f"needs {need}")
    if end > data_bytes:
        fail(f"its data ends at byte {end} but the file holds only {data_bytes} bytes after "
             f"its header (truncated)")


def read_json_file(path: str) -> dict:
    """A JSON object from ``path``; :class:`CheckpointFileError` if it is not one."""
    with open(path, encoding="utf-8") as f:
        try:
            obj = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointFileError(path, f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointFileError(path, f"expected a JSON object, got {type(obj).__name__}")
    return obj


@contextlib.contextmanager
def config_errors(model_dir: str, name: str = "config.json"):
    """Reading the JSON config ``name`` of ``model_dir``: a missing field (KeyError) or a
    ValueError / TypeError of the parsing becomes a :class:`CheckpointFileError` naming the
    file."""
    path = os.path.join(model_dir, name)
    try:
        yield
    except UserError:
        raise
    except KeyError as e:
        raise CheckpointFileError(path, f"missing field {e.args[0]!r}") from e
    except (ValueError, TypeError) as e:
        raise CheckpointFileError(path, str(e)) from e


def shard_files(model_dir: str) -> list[str]:
    """The safetensors files of a checkpoint dir (from its index json when sharded)."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json_file(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()):
            raise CheckpointFileError(index, "no weight_map of tensor name -> file name")
        files = [os.path.join(model_dir, f) for f in sorted(set(weight_map.values()))]
        for path in files:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: listed in {index} but missing")
        return files
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def iter_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(name, array)`` for each tensor of one file; arrays are memory-mapped views.
    The whole header is checked first (:func:`read_header`)."""
    header, start = read_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for name, info in header.items():
        if name == "__metadata__":
            continue
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
    """Reads a JSON side file of a checkpoint dir (a JSON object; errors name the file)."""
    return read_json_file(os.path.join(model_dir, name))


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
