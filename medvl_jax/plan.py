"""Compile a config's train step for a TPU topology on this machine, before a pod is paid for.

    python -m medvl_jax.plan --config configs/pod/medgemma_4b_sft.py --topology v5p:2x2x4 \
        [--config.k=v ...] [--suggest] [--json plan.json]

With ``libtpu`` installed (``pip install -e ".[tpu]"``) XLA compiles TPU programs on a machine
without TPUs. The task is built shape-first (no weights, no data) and the exact jitted step the
loop runs (:func:`medvl_jax.train.loop.build_step`: same shardings, donation, remat, gradient
accumulation) is lowered and compiled for the topology's devices on the config's mesh. The
report:

* memory per device: parameters and optimizer state (from their shardings), the batch, XLA's
  temporaries (``memory_analysis``: exact for the compiled program), the total against the
  chip's HBM, and whether it fits with ``--headroom`` to spare;
* train FLOPs per step, counted from the step's jaxpr (:mod:`medvl_jax.train.flops`; XLA's
  ``cost_analysis`` counts a scanned layer stack once), and an *estimate* of the step time and
  MFU from XLA's TPU cost model (optimistic: it models one chip, not the network);
* the collectives of the compiled program (count and bytes per kind, the largest all-gather),
  so a weight left unsharded shows up;
* GRPO: the rollout (prefill + decode with the KV cache for the whole rollout batch) planned
  as its own program;
* ``--suggest``: when the step does not fit, what would (all devices on fsdp, full remat,
  gradient accumulation), each compiled in turn until one fits.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any, Sequence

from medvl_jax import cli_errors
from medvl_jax import config as config_lib

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: HBM and bf16 peak per chip, TensorCores per chip."""
    name: str
    hbm_bytes: int
    peak_flops: float
    cores: int
    hbm_bandwidth: float  # Bytes/s per chip.


# device_kind -> chip (public Cloud TPU specifications; bf16 peak).
CHIPS = {
    "TPU v3": Chip("v3", 32 * GiB, 123e12, 2, 900e9),
    "TPU v4": Chip("v4", 32 * GiB, 275e12, 2, 1228e9),
    "TPU v5 lite": Chip("v5e", 16 * GiB, 197e12, 1, 819e9),
    "TPU v5": Chip("v5p", 95 * GiB, 459e12, 2, 2765e9),
    "TPU v6 lite": Chip("v6e", 32 * GiB, 918e12, 1, 1640e9),
}

_COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}


class PlanError(cli_errors.UserError):
    """A topology or config the planner cannot compile (named in the message)."""


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------

def _quiet_libtpu() -> None:
    """libtpu looks for TPU workers when loaded; on a machine without TPUs tell it there is
    this one host, so it neither queries a metadata server nor logs about it."""
    if not os.path.exists("/dev/accel0") and not os.path.exists("/dev/vfio/0"):
        for k, v in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                     ("TPU_WORKER_ID", "0"), ("TPU_ACCELERATOR_TYPE", "v5litepod-4"),
                     ("TPU_STDERR_LOG_LEVEL", "3"), ("TPU_MIN_LOG_LEVEL", "3"),
                     ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
            os.environ.setdefault(k, v)


def topology_devices(topology: str) -> list:
    """The abstract devices of a TPU topology such as ``v5p:2x2x4`` or ``v5e:4x4``."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise PlanError('planning for TPUs needs libtpu: pip install -e ".[tpu]"')
    _quiet_libtpu()
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # noqa: BLE001 - libtpu's message says what is wrong.
        raise PlanError(f"--topology {topology!r}: {str(e).splitlines()[0]} (examples: "
                        f"v5e:2x2, v5e:16x16, v5p:2x2x4, v4:2x2x2, v6e:8x8)") from None
    return list(desc.devices)


def chip_of(devices: Sequence) -> tuple[Chip, float, float]:
    """``(chip, HBM bytes per device, peak FLOP/s per device)``: a device is a whole chip
    (megacore) or one of its TensorCores."""
    kind = devices[0].device_kind
    if kind not in CHIPS:
        raise PlanError(f"no HBM/peak figures for device kind {kind!r}; known: "
                        f"{sorted(CHIPS)}")
    chip = CHIPS[kind]
    share = min(1.0, getattr(devices[0], "num_cores", chip.cores) / chip.cores)
    return chip, chip.hbm_bytes * share, chip.peak_flops * share


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------

def per_device_bytes(tree: Any) -> int:
    """Bytes of the largest local shard set of a pytree of ``jax.ShapeDtypeStruct`` with
    shardings (every device holds the same shard shapes under a NamedSharding)."""
    import jax
    import numpy as np

    total = 0
    for a in jax.tree.leaves(tree):
        shape = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
        total += math.prod(shape) * np.dtype(a.dtype).itemsize
    return total


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]", text):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def collectives(hlo: str) -> dict:
    """``{kind: {"count", "bytes"}}`` of the collectives in an optimized HLO module's text
    (asynchronous start/done pairs counted once, by their result), plus ``"largest
    all-gather"``: ``(bytes, shape)`` and ``"all-gathers"``: the ten largest results' shapes.
    A loop body's collectives are counted once."""
    out = {k: {"count": 0, "bytes": 0} for k in _COLLECTIVES}
    largest, gathers = (0, ""), []
    pattern = re.compile(r"=\s*(.+?)\s+(" + "|".join(_COLLECTIVES) + r")(-start)?\(")
    for line in hlo.splitlines():
        m = pattern.search(line)
        if not m:
            continue
        result, kind, start = m.groups()
        if start and result.startswith("("):
            # (operands..., results...): an async all-gather's tuple ends with its result.
            parts = re.findall(r"[a-z]+\d*\[[\d,]*\]", result)
            result = parts[-1] if kind == "all-gather" and parts else \
                " ".join(parts[len(parts) // 2:])
        nbytes = _shape_bytes(result)
        out[kind]["count"] += 1
        out[kind]["bytes"] += nbytes
        if kind == "all-gather":
            gathers.append((nbytes, result.strip()))
            if nbytes > largest[0]:
                largest = (nbytes, result.strip())
    out["largest all-gather"] = largest
    out["all-gathers"] = [r for _, r in sorted(gathers, reverse=True)[:10]]
    return out


_UNITS = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def _compile(lowered):
    """``(compiled, None)``, or ``(None, {"message", "memory"})`` when the TPU compiler
    refuses the program for want of HBM (it does so itself, before any pod exists)."""
    import jax

    try:
        return lowered.compile(), None
    except jax.errors.JaxRuntimeError as e:
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
            raise
    first = msg.strip().splitlines()[0]
    # "... memory required for HLO temporaries (24.00G) exceeds available HBM (15.75G)"
    m = re.search(r"temporaries \(([\d.]+)([KMGT])\)", first)
    temp = int(float(m.group(1)) * _UNITS[m.group(2)]) if m else 0
    memory = {"arguments": 0, "outputs": 0, "aliased": 0, "temporaries": temp, "code": 0}
    return None, {"message": first, "memory": memory}


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    return {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
            "aliased": int(m.alias_size_in_bytes), "temporaries": int(m.temp_size_in_bytes),
            "code": int(m.generated_code_size_in_bytes)}


def _cost(compiled) -> dict:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - backend-dependent and best-effort.
        return {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return {k: float(v) for k, v in (cost or {}).items()
            if k in ("flops", "optimal_seconds", "bytes accessed")}


# ---------------------------------------------------------------------------------------------
# Building and compiling
# ---------------------------------------------------------------------------------------------

class ShapeTokenizer:
    """Stands in for a tokenizer when only shapes matter: ``vocab_size`` tokens, the last of
    them ``<image>``. Used when the config gives ``model.text.vocab_size`` (real-size configs
    plan without tokenizer files)."""

    unk_token_id = 0
    pad_token_id = 0

    def __init__(self, vocab_size: int):
        self.vocab_size = int(vocab_size)

    def __len__(self) -> int:
        return self.vocab_size

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.vocab_size - 1 if token == "<image>" else self.unk_token_id


def _build_task(config):
    """The task of a validated config, shape-only: without tokenizer files when the model
    section names its vocabulary size."""
    from medvl_jax import tasks
    from medvl_jax.data import pipeline
    from medvl_jax.train import restore

    start = restore.load(config.init_from) if config.get("init_from") else None
    task_cls = tasks.get(config.task)
    config = task_cls.resolve_config(config, start)
    vocab = ((config.get("model") or {}).get("text") or {}).get("vocab_size")
    if vocab:
        tokenizer = ShapeTokenizer(vocab)
    elif config.get("tokenizer"):
        tokenizer = pipeline.make_tokenizer(config.tokenizer)
    else:
        tokenizer = None
    return config, task_cls(config, tokenizer, start=start)


def _abstract(tree, sharding, rows: int):
    """Shapes of ``tree`` (arrays of one row) with ``rows`` rows, placed with ``sharding``."""
    import jax
    import numpy as np

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((rows,) + np.shape(x)[1:],
                                                       np.asarray(x).dtype, sharding=sharding),
                        tree)


def _no_remat(config):
    """The config with rematerialisation off (FLOPs count useful work, not recomputation)."""
    import ml_collections

    c = ml_collections.ConfigDict(config.to_dict())
    for tower in ("text", "vision"):
        section = (c.get("model") or {}).get(tower)
        if section is not None and "remat_policy" in section:
            section.remat_policy = "none"
    return c


def compile_step(config, devices, task=None) -> dict:
    """Lowers and compiles the loop's step for ``devices``; returns the plan's record.
    ``task``: a built task (default: the config's, built shape-only)."""
    import jax

    from medvl_jax.parallel import mesh as mesh_lib
    from medvl_jax.parallel import rules as rules_lib
    from medvl_jax.tasks.base import run_keys
    from medvl_jax.train import flops as flops_lib
    from medvl_jax.train import loop

    given = task is not None
    if not given:
        config, task = _build_task(config)
    mesh = mesh_lib.make_mesh(dict(config.train.mesh), devices)
    bs, accum = int(config.data.batch_size), int(config.optim.grad_accum)
    try:
        loop._check_batch(bs, mesh_lib.data_parallel_size(mesh), accum, mesh)
    except ValueError as e:
        raise PlanError(str(e)) from None
    spike = float(config.train.skip_loss_spikes) > 0
    parts = loop.build_step(config, task, mesh, spike_guard=spike)
    replicated = rules_lib.replicated(mesh)
    batch = parts.batch_shape
    rng = jax.eval_shape(lambda: run_keys(0)[1])
    rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=replicated)
    args = (parts.target, batch, rng) + (
        (jax.ShapeDtypeStruct((), "float32", sharding=replicated),) if spike else ())
    t0 = time.perf_counter()
    with rules_lib.activation_rules(mesh):
        compiled, oom = _compile(parts.step.lower(*args))
    compile_s = time.perf_counter() - t0

    # Useful work: value_and_grad of the loss without remat, over the whole global batch.
    counted = task if given else _build_task(_no_remat(config))[1]
    train_flops = flops_lib.train_flops(
        lambda p, b, r: counted.loss(p, {**b, **counted.global_stats(b)}, r),
        parts.params_shape, batch, rng)
    record = {
        "task": task.name,
        "mesh": dict(mesh.shape),
        "global_batch": bs, "grad_accum": accum,
        "parameters": int(sum(math.prod(a.shape) for a in jax.tree.leaves(parts.params_shape))),
        "bytes_per_device": {
            "parameters": per_device_bytes(parts.target.params),
            "optimizer_state": per_device_bytes(parts.target.opt_state),
            "batch": per_device_bytes(batch),
            **(_memory(compiled) if compiled is not None else oom["memory"])},
        "train_flops_per_step": train_flops,
        "cost_model": _cost(compiled) if compiled is not None else {},
        "collectives": collectives(compiled.as_text() if compiled is not None else ""),
        "compile_seconds": compile_s,
    }
    if oom:
        record["compiler_out_of_memory"] = oom["message"]
    rollout = task.rollout_plan()
    if rollout:
        record["rollout"] = compile_rollout(config, task, parts, mesh, rollout)
        if rollout["reference_on_device"]:  # Sharded like the params (tasks.policy).
            record["bytes_per_device"]["reference"] = record["bytes_per_device"]["parameters"]
    return record


def compile_rollout(config, task, parts, mesh, rollout: dict) -> dict:
    """The rollout's sampler (prefill + KV-cache decode of ``rollout["max_new_tokens"]``
    tokens for the global rollout batch), compiled with the policy's parameter shardings."""
    import jax

    from medvl_jax.parallel import rules as rules_lib
    from medvl_jax.sampling import sampler
    from medvl_jax.train import flops as flops_lib
    from medvl_jax.train import state as state_lib

    # The sampled model's params (LoRA merged), placed as the state's base params are.
    placed = state_lib.flatten(parts.target.params)
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=placed[state_lib.path_str(path)].sharding),
        jax.eval_shape(task.model_params, parts.target.params))
    bs = int(config.data.batch_size)
    prompt = _abstract(rollout["prompt"], parts.batch_sharding, bs)
    p = prompt["tokens"].shape[1]
    n = int(rollout["max_new_tokens"])
    fn, extra = sampler.sampling_program(task.model_config, n)
    replicated = rules_lib.replicated(mesh)
    extra = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated) for x in extra]
    args = (params, prompt["tokens"], prompt["input_mask"], prompt["mask_ar"],
            prompt["images"], *extra)
    t0 = time.perf_counter()
    with rules_lib.activation_rules(mesh):
        compiled, oom = _compile(fn.func.lower(*args, **fn.keywords))
    out = {"batch": bs, "prompt_length": p, "max_new_tokens": n,
           "flops": flops_lib.count(fn, *args, while_trips=n),
           "compile_seconds": time.perf_counter() - t0}
    if oom:
        return {**out, "bytes_per_device": oom["memory"], "cost_model": {},
                "collectives": collectives(""), "compiler_out_of_memory": oom["message"]}
    return {**out, "bytes_per_device": _memory(compiled), "cost_model": _cost(compiled),
            "collectives": collectives(compiled.as_text())}


def summarise(record: dict, devices, headroom: float) -> dict:
    """Adds the chip, totals, fit and the estimated time/MFU to a compiled record."""
    chip, hbm, peak = chip_of(devices)
    m = record["bytes_per_device"]
    oom = "compiler_out_of_memory" in record
    if oom:  # The compiler stopped at temporaries; the arguments are ours.
        total = m["parameters"] + m["optimizer_state"] + m["batch"] + m["temporaries"]
    else:
        total = m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"] + m["code"]
    total += m.get("reference", 0)  # Resident beside the step's own arguments.
    n = len(devices)
    flops_dev = record["train_flops_per_step"] / n
    cost = record["cost_model"]
    out = dict(record, chip=chip.name, devices=n, hbm_bytes_per_device=int(hbm),
               peak_flops_per_device=peak, total_bytes_per_device=int(total),
               headroom=headroom, fits=not oom and bool(total <= (1 - headroom) * hbm))
    r = record.get("rollout")
    if r:  # The train state and the reference stay resident while the sampler runs.
        rm = r["bytes_per_device"]
        rtotal = (rm["arguments"] + rm["outputs"] - rm["aliased"] + rm["temporaries"]
                  + rm["code"] + m["optimizer_state"] + m.get("reference", 0))
        if "compiler_out_of_memory" in r:
            rtotal = max(rtotal, rm["temporaries"] + m["parameters"] + m["optimizer_state"]
                         + m.get("reference", 0))
        rfits = "compiler_out_of_memory" not in r and rtotal <= (1 - headroom) * hbm
        out["rollout"] = dict(r, total_bytes_per_device=int(rtotal), fits=bool(rfits))
        out["fits"] = out["fits"] and bool(rfits)
    if cost.get("flops"):
        # XLA counts a loop body once: scale by the FLOPs it missed.
        scale = max(1.0, flops_dev / cost["flops"])
        out["roofline_seconds"] = max(flops_dev / peak, cost.get("bytes accessed", 0) * scale
                                      / chip.hbm_bandwidth)
        if cost.get("optimal_seconds", 0) > 0:  # None for some chips (v5e here).
            seconds = cost["optimal_seconds"] * scale
            out["estimate"] = {"step_seconds": seconds, "mfu": flops_dev / seconds / peak,
                               "loop_correction": scale}
    return out


def plan(spec: str, overrides: Sequence = (), *, topology: str, headroom: float = 0.1,
         devices=None) -> dict:
    """Plans config ``spec`` (with ``--config.k=v`` overrides as pairs) for ``topology``."""
    from medvl_jax.train import run

    devices = devices if devices is not None else topology_devices(topology)
    config = run.load(spec, overrides)
    record = compile_step(config, devices)
    out = summarise(record, devices, headroom)
    out.update(config=spec, overrides=[f"--config.{k}={v}" for k, v in overrides],
               topology=topology)
    return out


def suggestions(config) -> list[list[tuple[str, Any]]]:
    """Overrides to try, in order, when a step does not fit: everything on fsdp, then full
    remat of the towers, then gradient accumulation 2, 4, 8 (where the batch divides)."""
    tries: list[list[tuple[str, Any]]] = []
    cur: list[tuple[str, Any]] = []
    mesh = dict(config.train.mesh)
    if mesh.get("fsdp", 1) != -1:
        cur = [("train.mesh", {"data": 1, "fsdp": -1, "tensor": int(mesh.get("tensor", 1))})]
        tries.append(list(cur))
    remat = [(f"model.{t}.remat_policy", "full") for t in ("vision", "text")
             if "remat_policy" in ((config.get("model") or {}).get(t) or {})
             and config.model[t].remat_policy != "full"]
    if remat:
        cur = cur + remat
        tries.append(list(cur))
    accum = int(config.optim.grad_accum)
    for k in (2, 4, 8):
        a = accum * k
        if int(config.data.batch_size) % a == 0:
            tries.append(cur + [("optim.grad_accum", a)])
    return tries


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def _gib(b: float) -> str:
    return f"{b / GiB:.2f} GiB"


def format_plan(p: dict) -> str:
    """The human-readable report of a plan record."""
    m = p["bytes_per_device"]
    lines = [
        f"plan: {p['config']} {' '.join(p['overrides'])}".rstrip(),
        f"  topology {p['topology']}: {p['devices']} x TPU {p['chip']} devices, mesh "
        f"{p['mesh']}; task {p['task']}, {p['parameters'] / 1e9:.3f}B parameters, global batch "
        f"{p['global_batch']} (grad_accum {p['grad_accum']}); compiled in "
        f"{p['compile_seconds']:.0f} s",
        "  memory per device:",
        f"    parameters        {_gib(m['parameters'])}",
        f"    optimizer state   {_gib(m['optimizer_state'])}",
        f"    batch             {_gib(m['batch'])}",
        *([f"    frozen reference  {_gib(m['reference'])}   (the KL term's, kept on device)"]
          if "reference" in m else []),
        f"    temporaries       {_gib(m['temporaries'])}   (activations, gradients, workspace)",
        f"    total             {_gib(p['total_bytes_per_device'])} of "
        f"{_gib(p['hbm_bytes_per_device'])} HBM -> "
        + ("fits" if p["fits"] else "DOES NOT FIT")
        + f" (with {p['headroom']:.0%} headroom)",
        *([f"    the TPU compiler: {p['compiler_out_of_memory']}"]
          if "compiler_out_of_memory" in p else []),
        f"  train FLOPs per step {p['train_flops_per_step']:.3e} "
        f"({p['train_flops_per_step'] / p['devices']:.3e} per device)",
    ]
    est = p.get("estimate")
    if est:
        lines.append(f"  ESTIMATE from XLA's TPU cost model (optimistic): step "
                     f"{est['step_seconds'] * 1e3:.1f} ms, MFU {est['mfu']:.0%}")
    elif "roofline_seconds" in p:
        lines.append("  no estimate: XLA's TPU cost model gives none for this chip")
    if "roofline_seconds" in p:
        lines.append(f"  roofline: a step takes at least {p['roofline_seconds'] * 1e3:.1f} ms "
                     f"(FLOPs / peak, or bytes accessed / HBM bandwidth)")
    lines.append("  collectives (a loop body counted once):")
    for kind in _COLLECTIVES:
        c = p["collectives"][kind]
        if c["count"]:
            lines.append(f"    {kind:<19}{c['count']:>5} ops  {_gib(c['bytes'])}")
    big = p["collectives"]["largest all-gather"]
    if big[0]:
        lines.append(f"    largest all-gather {big[1]} ({_gib(big[0])})")
    r = p.get("rollout")
    if r:
        lines.append(f"  rollout ({r['batch']} x {r['prompt_length']} prompt + "
                     f"{r['max_new_tokens']} new tokens, KV cache included): "
                     f"{_gib(r['total_bytes_per_device'])} per device with the train state "
                     f"resident -> " + ("fits" if r["fits"] else "DOES NOT FIT")
                     + f"; {r['flops']:.3e} FLOPs at most")
        if "compiler_out_of_memory" in r:
            lines.append(f"    the TPU compiler: {r['compiler_out_of_memory']}")
    for s in p.get("suggestion_trials", []):
        lines.append(f"  tried {' '.join(s['overrides'])}: {_gib(s['total_bytes_per_device'])}"
                     f" -> {'fits' if s['fits'] else 'does not fit'}")
    return "\n".join(lines)


@cli_errors.handle_errors
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m medvl_jax.plan --config FILE[:ARG] --topology NAME [--config.k=v ...]
    [--suggest] [--json PATH] [--headroom F]``; exit 0 when the step fits, 1 when not."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with cli_errors.user_input():
        overrides, rest = config_lib.parse_overrides(argv)
    p = argparse.ArgumentParser(prog="python -m medvl_jax.plan", description=__doc__.split(
        "\n")[0])
    p.add_argument("--config", required=True, help="configs/<name>.py[:arg]")
    p.add_argument("--topology", required=True, help="e.g. v5e:2x2, v5p:2x2x4, v6e:8x8")
    p.add_argument("--headroom", type=float, default=0.1,
                   help="fraction of HBM to keep free (default 0.1)")
    p.add_argument("--suggest", action="store_true",
                   help="when it does not fit, compile variants until one does")
    p.add_argument("--json", default="", help="also write the record(s) here")
    cli_errors.add_verbose_flag(p)
    args = p.parse_args(rest)
    devices = topology_devices(args.topology)
    with cli_errors.user_input():
        result = plan(args.config, overrides, topology=args.topology, headroom=args.headroom,
                      devices=devices)
    print(format_plan(result), flush=True)
    if args.suggest and not result["fits"]:
        from medvl_jax.train import run

        trials = []
        for extra in suggestions(run.load(args.config, overrides)):
            print(f"trying {' '.join(f'--config.{k}={v}' for k, v in extra)} ...", flush=True)
            try:
                trial = plan(args.config, list(overrides) + extra, topology=args.topology,
                             headroom=args.headroom, devices=devices)
            except (ValueError, KeyError) as e:  # The task refuses the variant; say why.
                print(f"  -> not possible: {str(e).splitlines()[0]}", flush=True)
                continue
            trials.append(trial)
            print(f"  -> {_gib(trial['total_bytes_per_device'])} per device: "
                  + ("fits" if trial["fits"] else "does not fit"), flush=True)
            if trial["fits"]:
                print(format_plan(trial))
                break
        result["suggestion_trials"] = trials
        fitting = [t for t in trials if t["fits"]]
        print(f"suggestion: {' '.join(fitting[0]['overrides'])}" if fitting else
              "suggestion: none of the variants fits; use more devices or a larger chip")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"plan written to {args.json}")
    return 0 if result["fits"] or any(t["fits"] for t in result.get("suggestion_trials", [])) \
        else 1


if __name__ == "__main__":
    sys.exit(main())
