"""TPU pod launcher: create a Cloud TPU VM slice, copy this repository to every worker,
install it and run the same training command on all workers at once.

    python -m launch.tpu --name medvl-v4 --zone us-central2-b --accelerator_type v4-32 -- \\
        --config configs/medsynth_sft.py --workdir /mnt/shared/runs/sft1

Steps (``--steps``, comma-separated, in this order; default ``create,copy,install,run``):

* ``create``: ``gcloud compute tpus tpu-vm create`` (waits until the slice is ready), or with
  ``--queued`` a queued resource (``gcloud compute tpus queued-resources create``), polled
  with ``describe`` until it is ACTIVE.
* ``copy``: the working tree (files git tracks, plus untracked files it does not ignore) is
  packed into a tarball, copied to every worker with ``tpu-vm scp --worker=all`` and unpacked
  into ``~/medvl_jax``; or, with ``--git_url``, every worker clones the repository and checks
  out ``--git_ref``.
* ``install``: ``pip install -e ".[tpu]"`` on every worker.
* ``run``: ``python3 -m medvl_jax.train ARGS`` on every worker (``tpu-vm ssh --worker=all``)
  with ``MEDVL_JAX_DISTRIBUTED=1``, so each process calls ``jax.distributed.initialize()``
  and JAX finds its peers from the TPU metadata. ``--detach`` leaves it running in the
  background (output in ``~/medvl_jax_train.log`` on each worker).
  With ``--requeue N`` a run that exits with status 75 (the trainer saved after a SIGTERM,
  e.g. a maintenance event) is started again, up to N times; it resumes from its checkpoint.
* ``delete``: deletes the TPU (or the queued resource and its TPU).

``--plan`` first compiles the training step for the slice's topology here, on this machine
(``python -m medvl_jax.plan``, needs the ``tpu`` extra), and creates nothing when it does not
fit: an out-of-memory found before the slice is paid for.

The workdir must be a path every worker sees (a shared file system): all workers write one
checkpoint together. ``--dry_run`` prints every command and runs none.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Sequence

from launch import common

STEPS = ("create", "copy", "install", "run", "delete")
DEFAULT_STEPS = "create,copy,install,run"
REMOTE_DIR = "medvl_jax"            # ~/medvl_jax on every worker.
REMOTE_TARBALL = "medvl_jax.tar.gz"
REMOTE_LOG = "medvl_jax_train.log"
DEFAULT_INSTALL = 'python3 -m pip install -q -e ".[tpu]"'

# The TPU software version JAX wants, by generation (cloud.google.com/tpu/docs/runtimes).
RUNTIME_VERSIONS = (("v6e", "v2-alpha-tpuv6e"), ("v5p", "v2-alpha-tpuv5"),
                    ("v5litepod", "v2-alpha-tpuv5-lite"), ("v5e", "v2-alpha-tpuv5-lite"),
                    ("v4", "tpu-ubuntu2204-base"), ("v3", "tpu-ubuntu2204-base"),
                    ("v2", "tpu-ubuntu2204-base"))


def default_runtime_version(accelerator_type: str) -> str:
    """The runtime (software) version for an accelerator type such as ``v4-32``."""
    generation = accelerator_type.split("-")[0].lower()
    for prefix, version in RUNTIME_VERSIONS:
        if generation == prefix:
            return version
    raise ValueError(f"no default runtime version for accelerator type {accelerator_type!r}; "
                     f"pass --runtime_version")


class Commands:
    """The gcloud command lines of one TPU (or queued resource) named ``name``."""

    def __init__(self, name: str, zone: str, project: str | None = None):
        self.name, self.zone = name, zone
        self._tail = [f"--zone={zone}"] + ([f"--project={project}"] if project else [])

    def create(self, accelerator_type: str, runtime_version: str, *, spot: bool = False
               ) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "create", self.name, *self._tail,
                f"--accelerator-type={accelerator_type}", f"--version={runtime_version}",
                *(["--spot"] if spot else [])]

    def create_queued(self, accelerator_type: str, runtime_version: str, *,
                      spot: bool = False) -> list[str]:
        # The queued resource and its TPU node share the name.
        return ["gcloud", "compute", "tpus", "queued-resources", "create", self.name,
                *self._tail, f"--node-id={self.name}", f"--accelerator-type={accelerator_type}",
                f"--runtime-version={runtime_version}", *(["--spot"] if spot else [])]

    def queued_state(self) -> list[str]:
        return ["gcloud", "compute", "tpus", "queued-resources", "describe", self.name,
                *self._tail, "--format", "value(state.state)"]

    def scp_to_all(self, local: str, remote: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{self.name}:{remote}",
                *self._tail, "--worker=all"]

    def ssh_all(self, command: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.name, *self._tail,
                "--worker=all", "--command", command]

    def delete(self) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "delete", self.name, *self._tail,
                "--quiet"]

    def delete_queued(self) -> list[str]:
        return ["gcloud", "compute", "tpus", "queued-resources", "delete", self.name,
                *self._tail, "--force", "--quiet"]


# Chips per topology: v5e/v6e slices are 2D and named by chips, v4/v5p slices 3D and named by
# TensorCores (two per chip).
_TOPOLOGIES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
                  256: "16x16"}
_TOPOLOGIES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4",
                  128: "4x4x8", 256: "4x8x8", 512: "8x8x8"}


def topology_for(accelerator_type: str) -> str:
    """The topology name ``python -m medvl_jax.plan`` takes for an accelerator type:
    ``v5litepod-16`` -> ``v5e:4x4``, ``v4-32`` -> ``v4:2x2x4``, ``v5p-64`` -> ``v5p:2x4x4``."""
    generation, _, count = accelerator_type.lower().partition("-")
    if not count.isdigit():
        raise ValueError(f"accelerator type {accelerator_type!r} is not GENERATION-COUNT")
    n = int(count)
    if generation in ("v5litepod", "v5e", "v6e"):
        name, table, chips = ("v6e" if generation == "v6e" else "v5e"), _TOPOLOGIES_2D, n
    elif generation in ("v4", "v5p"):
        name, table, chips = generation, _TOPOLOGIES_3D, n // 2
    else:
        raise ValueError(f"no planning topology for {accelerator_type!r} (v4, v5p, v5e, v6e)")
    if chips not in table:
        raise ValueError(f"no standard topology for {accelerator_type!r} ({chips} chips)")
    return f"{name}:{table[chips]}"


def plan_command(accelerator_type: str, train_args: Sequence[str]) -> list[str]:
    """``python -m medvl_jax.plan`` for the slice, with the training command's config and
    ``--config.*`` overrides (its workdir dropped)."""
    args, skip = [], False
    for a in train_args:
        if skip:
            skip = False
        elif a == "--workdir":
            skip = True
        elif not a.startswith("--workdir="):
            args.append(a)
    return [sys.executable, "-m", "medvl_jax.plan", "--topology",
            topology_for(accelerator_type), *args]


def unpack_command() -> str:
    return (f"rm -rf ~/{REMOTE_DIR} && mkdir -p ~/{REMOTE_DIR} && "
            f"tar -xzf ~/{REMOTE_TARBALL} -C ~/{REMOTE_DIR}")


def clone_command(url: str, ref: str) -> str:
    return (f"rm -rf ~/{REMOTE_DIR} && git clone -q {common.join([url])} ~/{REMOTE_DIR} && "
            f"git -C ~/{REMOTE_DIR} checkout -q {common.join([ref])}")


def install_command(install: str = DEFAULT_INSTALL) -> str:
    return f"cd ~/{REMOTE_DIR} && {install}"


def run_command(module: str, train_args: Sequence[str], *, detach: bool = False) -> str:
    """The shell line every worker runs: the trainer, told to join the pod's JAX job."""
    cmd = common.join(common.train_command("python3", module, train_args))
    if detach:
        cmd = f"nohup {cmd} > ~/{REMOTE_LOG} 2>&1 < /dev/null &"
    return f"cd ~/{REMOTE_DIR} && export MEDVL_JAX_DISTRIBUTED=1 && {cmd}"


def repo_files(root: str) -> list[str]:
    """Files of the working tree under ``root`` that git tracks or would track (untracked but
    not ignored), relative to ``root``; deleted files are left out."""
    out = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard"], check=True, capture_output=True).stdout
    names = sorted({n for n in out.decode().split("\0") if n})
    return [n for n in names if os.path.isfile(os.path.join(root, n))]


def pack(root: str, files: Sequence[str], tarball: str) -> None:
    """Writes ``files`` (relative to ``root``) into the gzip tarball ``tarball``."""
    with tarfile.open(tarball, "w:gz") as tar:
        for name in files:
            tar.add(os.path.join(root, name), arcname=name, recursive=False)


def wait_until_active(cmds: Commands, *, poll_s: float, timeout_s: float) -> None:
    """Polls the queued resource's state until ACTIVE; raises on FAILED/SUSPENDED/timeout."""
    start = time.monotonic()
    last = None
    while True:
        out = subprocess.run(cmds.queued_state(), check=True, capture_output=True, text=True)
        state = out.stdout.strip()
        if state != last:
            print(f"# queued resource {cmds.name}: {state}", flush=True)
            last = state
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED", "SUSPENDING"):
            raise RuntimeError(f"queued resource {cmds.name} is {state}; see `"
                               f"{common.join(cmds.queued_state()[:-2])}`")
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"queued resource {cmds.name} not ACTIVE after {timeout_s:.0f} s "
                               f"(last state {state}); it stays queued: delete it with `"
                               f"{common.join(cmds.delete_queued())}`")
        time.sleep(poll_s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.tpu",
        description="Create a Cloud TPU slice, copy and install this repository on every "
                    "worker, and run the trainer on all of them.",
        epilog="Arguments after '--' go to the training command.")
    p.add_argument("--name", required=True, help="TPU (and queued resource) name")
    p.add_argument("--zone", required=True, help="e.g. us-central2-b")
    p.add_argument("--accelerator_type", default="v4-8", help="e.g. v4-32, v5litepod-16")
    p.add_argument("--runtime_version", default=None,
                   help="TPU software version (default: the one for the accelerator type)")
    p.add_argument("--project", default=None, help="Google Cloud project (default: gcloud's)")
    p.add_argument("--queued", action="store_true",
                   help="request the slice as a queued resource and wait until it is ACTIVE")
    p.add_argument("--spot", action="store_true", help="Spot capacity (preemptible)")
    p.add_argument("--steps", default=DEFAULT_STEPS,
                   help=f"comma-separated subset of {','.join(STEPS)} (default {DEFAULT_STEPS})")
    p.add_argument("--repo", default=os.getcwd(),
                   help="the repository to copy (default: here)")
    p.add_argument("--git_url", default=None,
                   help="clone this URL on every worker instead of copying the working tree")
    p.add_argument("--git_ref", default="HEAD", help="commit/branch/tag to check out with "
                                                     "--git_url")
    p.add_argument("--install", default=DEFAULT_INSTALL,
                   help="install command, run in ~/medvl_jax on every worker")
    p.add_argument("--module", default=common.DEFAULT_MODULE, help="python -m MODULE to run")
    p.add_argument("--detach", action="store_true",
                   help=f"leave the run in the background (log: ~/{REMOTE_LOG} per worker)")
    p.add_argument("--requeue", type=int, default=0,
                   help="start the run again (up to this many times) when it exits with "
                        "status 75, preempted after saving")
    p.add_argument("--poll_s", type=float, default=30.0, help="queued resource polling period")
    p.add_argument("--wait_timeout_s", type=float, default=24 * 3600.0,
                   help="give up waiting for a queued resource after this long")
    p.add_argument("--plan", action="store_true",
                   help="compile the step for the slice's topology here first (python -m "
                        "medvl_jax.plan); create nothing if it does not fit")
    p.add_argument("--dry_run", action="store_true", help="print the commands; run none")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    launcher_argv, train_args = common.split_argv(argv)
    parser = build_parser()
    args = parser.parse_args(launcher_argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown or not steps:
        parser.error(f"--steps: unknown step(s) {unknown}; choose from {','.join(STEPS)}")
    if "run" in steps:
        common.require_train_args(parser, train_args)
    try:
        runtime = args.runtime_version or default_runtime_version(args.accelerator_type)
    except ValueError as e:
        parser.error(str(e))
    cmds = Commands(args.name, args.zone, args.project)
    dry = args.dry_run

    def run(cmd):
        return common.run(cmd, dry_run=dry)

    try:
        if args.plan:
            common.require_train_args(parser, train_args)
            try:
                command = plan_command(args.accelerator_type, train_args)
            except ValueError as e:
                parser.error(str(e))
            print(f"# plan {args.accelerator_type} here before creating it")
            run(command)
        if "create" in steps:
            print(f"# create {args.accelerator_type} ({runtime})")
            if args.queued:
                run(cmds.create_queued(args.accelerator_type, runtime, spot=args.spot))
                print(f"# wait: polled every {args.poll_s:.0f} s until the state is ACTIVE")
                print(common.join(cmds.queued_state()))
                if not dry:
                    wait_until_active(cmds, poll_s=args.poll_s, timeout_s=args.wait_timeout_s)
            else:
                run(cmds.create(args.accelerator_type, runtime, spot=args.spot))
        if "copy" in steps:
            if args.git_url:
                print(f"# copy: clone {args.git_url} at {args.git_ref} on every worker")
                run(cmds.ssh_all(clone_command(args.git_url, args.git_ref)))
            else:
                repo = os.path.abspath(args.repo)
                tarball = os.path.join(tempfile.gettempdir(), f"{args.name}-{REMOTE_TARBALL}")
                files = [] if dry else repo_files(repo)
                print(f"# copy: pack the files git tracks or would track in {repo} into "
                      f"{tarball}" + ("" if dry else f" ({len(files)} files)"))
                if not dry:
                    pack(repo, files, tarball)
                run(cmds.scp_to_all(tarball, REMOTE_TARBALL))
                run(cmds.ssh_all(unpack_command()))
        if "install" in steps:
            print("# install on every worker")
            run(cmds.ssh_all(install_command(args.install)))
        if "run" in steps:
            command = cmds.ssh_all(run_command(args.module, train_args, detach=args.detach))
            for attempt in range(args.requeue + 1):
                print("# run on every worker" + (f" (requeue {attempt})" if attempt else ""))
                try:
                    run(command)
                    break
                except subprocess.CalledProcessError as e:
                    if e.returncode != common.PREEMPTED_EXIT_CODE or attempt == args.requeue:
                        raise
                    print(f"# preempted (exit code {e.returncode}): starting the run again")
        if "delete" in steps:
            print("# delete")
            run(cmds.delete_queued() if args.queued else cmds.delete())
    except subprocess.CalledProcessError as e:
        print(f"# failed (exit code {e.returncode}): {common.join(e.cmd)}", file=sys.stderr)
        if "delete" in steps:
            print(f"# the TPU is kept; delete it with: "
                  f"{common.join(cmds.delete_queued() if args.queued else cmds.delete())}",
                  file=sys.stderr)
        return e.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
