"""Local multi-process launcher: N processes of the trainer on this machine, one JAX job.

    python -m launch.local --num_processes 2 --devices_per_process 2 -- \\
        --config configs/medsynth_sft.py:smoke --workdir /tmp/mp_sft

Every process gets the coordinator address (127.0.0.1 and a free port), the number of
processes and its own id in ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
``JAX_PROCESS_ID``, which the trainer hands to ``jax.distributed.initialize``. With
``--platform cpu`` (the default) each process fakes ``--devices_per_process`` CPU devices and
the processes talk through gloo, so a real multi-process job runs on a laptop; with
``--platform gpu`` each process gets its own ``--devices_per_process`` GPUs.

Output lines are prefixed with the process id. When a process fails the others are killed
and the launcher exits with the failed process's code; a process that exits with 75
(preempted, saved) is not a failure: the others finish their save and the launcher exits
with 75. SIGINT/SIGTERM to the launcher is passed on to every process as SIGTERM (the trainer
saves a checkpoint at the next step and stops, status 75); processes still running
``--grace_s`` seconds later are killed.

``--dry_run`` prints one command line per process (environment assignments first) and starts
nothing.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Mapping, Sequence

from launch import common

_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, port: int, *, platform: str = "cpu",
                devices_per_process: int = 1,
                base_xla_flags: str = "") -> dict[str, str]:
    """The environment variables process ``process_id`` gets on top of the launcher's own.

    cpu: ``JAX_PLATFORMS=cpu``, ``devices_per_process`` fake CPU devices (an existing
    ``--xla_force_host_platform_device_count`` in ``base_xla_flags`` is replaced), gloo
    collectives. gpu: ``JAX_LOCAL_DEVICE_IDS``, this process's block of GPUs.
    """
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id {process_id} is not in [0, {num_processes})")
    if devices_per_process < 1:
        raise ValueError(f"devices_per_process must be >= 1, got {devices_per_process}")
    env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
           "JAX_NUM_PROCESSES": str(num_processes),
           "JAX_PROCESS_ID": str(process_id)}
    if platform == "cpu":
        flags = _DEVICE_COUNT_FLAG.sub("", base_xla_flags).split()
        flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags),
                   JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    elif platform == "gpu":
        first = process_id * devices_per_process
        env["JAX_LOCAL_DEVICE_IDS"] = ",".join(
            str(d) for d in range(first, first + devices_per_process))
    else:
        raise ValueError(f"platform must be 'cpu' or 'gpu', got {platform!r}")
    return env


def command_lines(envs: Sequence[Mapping[str, str]], cmd: Sequence[str]) -> list[str]:
    """One shell line per process: ``VAR=value ... command``."""
    return [" ".join(f"{k}={common.join([v])}" for k, v in env.items()) + " "
            + common.join(cmd) for env in envs]


class _Streams:
    """Copies each process's output to ours, line by line, prefixed with its id."""

    def __init__(self, out=None):
        self._out = out or sys.stdout
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def follow(self, rank: int, pipe) -> None:
        t = threading.Thread(target=self._copy, args=(rank, pipe), daemon=True)
        t.start()
        self._threads.append(t)

    def _copy(self, rank: int, pipe) -> None:
        for raw in iter(pipe.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            with self._lock:
                self._out.write(f"[{rank}] {line}\n")
                self._out.flush()
        pipe.close()

    def say(self, text: str) -> None:
        with self._lock:
            self._out.write(f"[launch] {text}\n")
            self._out.flush()

    def join(self, timeout: float = 5.0) -> None:
        for t in self._threads:
            t.join(timeout)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # Each process leads its own group (start_new_session).
    except (ProcessLookupError, PermissionError):
        pass


def run_processes(cmd: Sequence[str], envs: Sequence[Mapping[str, str]], *,
                  grace_s: float = 60.0, poll_s: float = 0.2) -> int:
    """Starts ``cmd`` once per environment in ``envs`` (added to ours), streams the output and
    waits. Returns 0 when every process succeeded, else the exit code of the first to fail
    (the others are then killed)."""
    streams = _Streams()
    procs: list[subprocess.Popen] = []
    stop = {"signal": None}

    def forward(signum, frame):  # Ask every process to checkpoint and stop.
        stop["signal"] = signum
        for p in procs:
            if p.poll() is None:
                _signal_group(p, signal.SIGTERM)

    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, forward)
    try:
        for rank, extra in enumerate(envs):
            proc = subprocess.Popen(list(cmd), env={**os.environ, **extra},
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            procs.append(proc)
            streams.follow(rank, proc.stdout)
        deadline = None
        while True:
            codes = [p.poll() for p in procs]
            # 75: preempted after saving; the others are saving too, not to be killed.
            failed = [(r, c) for r, c in enumerate(codes)
                      if c not in (None, 0, common.PREEMPTED_EXIT_CODE)]
            if failed and stop["signal"] is None:
                rank, code = failed[0]
                running = [r for r, c in enumerate(codes) if c is None]
                if running:
                    streams.say(f"process {rank} exited with code {code}; killing processes "
                                f"{running}")
                for r in running:
                    _signal_group(procs[r], signal.SIGKILL)
                for p in procs:
                    p.wait()
                return code
            if all(c is not None for c in codes):
                if stop["signal"] is not None:
                    return next((c for c in codes if c), 128 + stop["signal"])
                return next((c for c in codes if c), 0)
            if stop["signal"] is not None:
                deadline = deadline or time.monotonic() + grace_s
                if time.monotonic() > deadline:
                    streams.say(f"still running {grace_s:.0f} s after the signal; killing")
                    for p in procs:
                        if p.poll() is None:
                            _signal_group(p, signal.SIGKILL)
            time.sleep(poll_s)
    finally:
        for p in procs:  # Never leave a process behind (e.g. on an exception here).
            if p.poll() is None:
                _signal_group(p, signal.SIGKILL)
                p.wait()
        streams.join()
        for sig, handler in old.items():
            signal.signal(sig, handler)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.local",
        description="Run the trainer as N local processes of one JAX job.",
        epilog="Arguments after '--' go to the training command.")
    p.add_argument("--num_processes", type=int, default=2, help="processes to start")
    p.add_argument("--devices_per_process", type=int, default=1,
                   help="cpu: fake CPU devices per process; gpu: GPUs per process")
    p.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--port", type=int, default=0,
                   help="coordinator port on 127.0.0.1 (default: a free one)")
    p.add_argument("--module", default=common.DEFAULT_MODULE, help="python -m MODULE to run")
    p.add_argument("--python", default=sys.executable, help="the Python interpreter")
    p.add_argument("--grace_s", type=float, default=60.0,
                   help="after SIGINT/SIGTERM, seconds the processes get to save and stop")
    p.add_argument("--dry_run", action="store_true",
                   help="print the command line of every process and start nothing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, train_args = common.parse(parser, argv)
    if args.num_processes < 1:
        parser.error(f"--num_processes must be >= 1, got {args.num_processes}")
    if args.devices_per_process < 1:
        parser.error(f"--devices_per_process must be >= 1, got {args.devices_per_process}")
    port = args.port or free_port()
    base_flags = os.environ.get("XLA_FLAGS", "")
    envs = [process_env(i, args.num_processes, port, platform=args.platform,
                        devices_per_process=args.devices_per_process, base_xla_flags=base_flags)
            for i in range(args.num_processes)]
    cmd = common.train_command(args.python, args.module, train_args)
    if args.dry_run:
        for line in command_lines(envs, cmd):
            print(line)
        return 0
    return run_processes(cmd, envs, grace_s=args.grace_s)


if __name__ == "__main__":
    sys.exit(main())
