"""SLURM launcher for multi-node GPU training: writes an sbatch script and submits it.

    python -m launch.slurm --nodes 2 --gpus_per_node 8 --partition gpu --time 24:00:00 \\
        --setup "source ~/venvs/medvl/bin/activate" -- \\
        --config configs/medsynth_sft.py --workdir /shared/runs/sft1

The script asks for ``--nodes`` nodes with ``--gpus_per_node`` GPUs each and starts the trainer
with ``srun``:

* ``--processes per_gpu`` (default): one task per GPU. JAX's SLURM detection gives each
  process the GPU numbered by its local task id, so GPUs are not bound per task here
  (every task sees its node's GPUs and picks its own).
* ``--processes per_node``: one task per node driving all its GPUs
  (``JAX_LOCAL_DEVICE_IDS=0,...,G-1``).

In the job step the trainer finds ``SLURM_STEP_NODELIST``/``SLURM_PROCID``/... and calls
``jax.distributed.initialize()``, which takes the coordinator (the step's first node, a port
derived from the job id), the process count and this process's id from SLURM. The workdir
must be on a file system every node sees: all processes write one checkpoint together.

Preemption and time limits: the job is requeueable (``--requeue``), and with ``--time`` SLURM
sends the trainer SIGTERM ``--signal_s`` seconds before the limit; the trainer then saves and
exits with status 75, on which the script requeues the job (``scontrol requeue``), so it
resumes from that checkpoint. ``--no-requeue`` leaves both out.

``--dry_run`` prints the script and the ``sbatch`` command instead of writing/submitting.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Sequence

from launch import common

_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


def sbatch_script(*, nodes: int, gpus_per_node: int, processes: str, train_cmd: Sequence[str],
                  chdir: str, job_name: str = "medvl_jax", time: str | None = None,
                  partition: str | None = None, account: str | None = None,
                  cpus_per_task: int | None = None, output: str | None = None,
                  exclusive: bool = False, sbatch_args: Sequence[str] = (),
                  setup: Sequence[str] = (), env: Sequence[str] = (), requeue: bool = True,
                  signal_s: int = 120) -> str:
    """The text of the sbatch script (see the module docstring)."""
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"nodes and gpus_per_node must be >= 1, got {nodes}, {gpus_per_node}")
    if processes not in ("per_gpu", "per_node"):
        raise ValueError(f"processes must be 'per_gpu' or 'per_node', got {processes!r}")
    if time is not None and not _TIME.match(time):
        raise ValueError(f"time {time!r} is not a SLURM time limit ([D-]HH:MM:SS, MM, ...)")
    tasks_per_node = gpus_per_node if processes == "per_gpu" else 1
    head = [f"--job-name={job_name}", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}",
            f"--gpus-per-node={gpus_per_node}"]
    if cpus_per_task:
        head.append(f"--cpus-per-task={cpus_per_task}")
    if time:
        head.append(f"--time={time}")
    if partition:
        head.append(f"--partition={partition}")
    if account:
        head.append(f"--account={account}")
    if exclusive:
        head.append("--exclusive")
    if requeue:
        head.append("--requeue")
        if time and signal_s > 0:
            head.append(f"--signal=TERM@{signal_s}")
    head.append(f"--output={output or job_name + '-%j.out'}")
    for a in sbatch_args:
        if not a.startswith("--"):
            raise ValueError(f"sbatch argument {a!r} must start with '--' (e.g. --qos=high)")
        head.append(a)
    lines = ["#!/bin/bash"] + [f"#SBATCH {h}" for h in head]
    lines += ["", "set -eo pipefail", f"cd {common.join([chdir])}"]
    lines += list(setup)
    for kv in env:
        key, eq, value = kv.partition("=")
        if not eq or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise ValueError(f"--env {kv!r} must be NAME=value")
        lines.append(f"export {key}={common.join([value])}")
    lines.append("export PYTHONUNBUFFERED=1")
    if processes == "per_node":
        ids = ",".join(str(i) for i in range(gpus_per_node))
        lines.append(f"# One process per node drives all {gpus_per_node} GPUs of its node.")
        lines.append(f"export JAX_LOCAL_DEVICE_IDS={ids}")
    srun = ["srun", "--kill-on-bad-exit=1"]
    if cpus_per_task:  # srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05).
        srun.append(f"--cpus-per-task={cpus_per_task}")
    if not requeue:
        lines += ["", common.join([*srun, *train_cmd])]
        return "\n".join(lines) + "\n"
    code = common.PREEMPTED_EXIT_CODE
    lines += ["", common.join([*srun, *train_cmd]) + " && status=0 || status=$?",
              f"if [ \"$status\" -eq {code} ]; then  # Preempted: saved, start again.",
              f'  echo "exit status {code}: requeueing job $SLURM_JOB_ID"',
              '  scontrol requeue "$SLURM_JOB_ID"',
              "fi",
              'exit "$status"']
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.slurm",
        description="Write an sbatch script that runs the trainer on SLURM GPU nodes, and "
                    "submit it.",
        epilog="Arguments after '--' go to the training command.")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus_per_node", type=int, default=8)
    p.add_argument("--processes", choices=("per_gpu", "per_node"), default="per_gpu",
                   help="one process per GPU (default) or one per node")
    p.add_argument("--job_name", default="medvl_jax")
    p.add_argument("--time", default=None, help="time limit, e.g. 24:00:00")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--cpus_per_task", type=int, default=None)
    p.add_argument("--output", default=None, help="log file pattern (default JOB_NAME-%%j.out)")
    p.add_argument("--exclusive", action="store_true", help="whole nodes only")
    p.add_argument("--requeue", action=argparse.BooleanOptionalAction, default=True,
                   help="requeue the job when the trainer exits with status 75 (preempted, "
                        "saved); default on")
    p.add_argument("--signal_s", type=int, default=120,
                   help="with --time: SIGTERM the trainer this many seconds before the limit, "
                        "so it saves and is requeued (0: no signal)")
    p.add_argument("--sbatch_arg", action="append", default=[],
                   help="an extra #SBATCH line, e.g. --sbatch_arg=--qos=high (repeatable)")
    p.add_argument("--setup", action="append", default=[],
                   help="a shell line run before srun, e.g. 'module load cuda' (repeatable)")
    p.add_argument("--env", action="append", default=[],
                   help="NAME=value exported before srun (repeatable)")
    p.add_argument("--chdir", default=os.getcwd(),
                   help="directory the job runs in (default: here, the repository root)")
    p.add_argument("--python", default="python3", help="the Python interpreter on the nodes")
    p.add_argument("--module", default=common.DEFAULT_MODULE, help="python -m MODULE to run")
    p.add_argument("--script", default=None,
                   help="where to write the script (default: ./JOB_NAME.sbatch)")
    p.add_argument("--dry_run", action="store_true",
                   help="print the script and the sbatch command; write and submit nothing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, train_args = common.parse(parser, argv)
    try:
        script = sbatch_script(
            nodes=args.nodes, gpus_per_node=args.gpus_per_node, processes=args.processes,
            train_cmd=common.train_command(args.python, args.module, train_args),
            chdir=os.path.abspath(args.chdir), job_name=args.job_name, time=args.time,
            partition=args.partition, account=args.account, cpus_per_task=args.cpus_per_task,
            output=args.output, exclusive=args.exclusive, sbatch_args=args.sbatch_arg,
            setup=args.setup, env=args.env, requeue=args.requeue, signal_s=args.signal_s)
    except ValueError as e:
        parser.error(str(e))
    path = args.script or f"{args.job_name}.sbatch"
    if args.dry_run:
        print(f"# sbatch script ({path}):")
        print(script, end="")
        print("# submit:")
        return common.run(["sbatch", path], dry_run=True)
    with open(path, "w") as f:
        f.write(script)
    print(f"# wrote {path}")
    return common.run(["sbatch", path], dry_run=False, check=False)


if __name__ == "__main__":
    sys.exit(main())
