"""Checkpoints: Orbax, async, keep-N, atomic; train state + data iterator state + metadata.

Layout: ``<workdir>/checkpoints/<step>/{state, data, meta}``. Orbax writes each step to a
temporary directory and renames it when complete, so a crash never leaves a half checkpoint
that resume would pick up. ``data`` is grain's iterator state, one JSON file per process.

Restoring onto another mesh (or device count) is restoring with a target whose leaves carry
the new shardings (state.abstract_state); Orbax reads each device's slice from the saved
arrays.

Rotation is done here, not by Orbax: the newest ``keep`` checkpoints are kept, and so is the
newest *good* one (marked by the loop once the step after it was finite; checkpoints found at
start-up count as good), so a divergence can never rotate the last usable state away.
"""
from __future__ import annotations

import glob
import os
import re
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

SCHEMA_VERSION = 2  # 2: TrainState.nonfinite_worst_streak


def metadata(config: ml_collections.ConfigDict, task: str) -> dict:
    """What is saved beside the state: schema version, task, model family and the config."""
    return {"schema_version": SCHEMA_VERSION, "task": task,
            "model_family": str(config.get("model_family", "medvl_vlm")),
            "config": config.to_json_best_effort()}


def check_compatible(saved: dict, current: dict) -> None:
    """Refuses to resume a checkpoint of another task or schema version."""
    for key in ("schema_version", "task", "model_family"):
        if saved.get(key) != current.get(key):
            raise ValueError(f"checkpoint {key}={saved.get(key)!r} does not match this run's "
                             f"{current.get(key)!r}")


class CheckpointManager:
    """A thin wrapper naming the three items, so the loop reads as save/restore."""

    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
        # Orbax refuses relative paths; a user's ``--checkpoint runs/sft`` is one.
        self._mngr = ocp.CheckpointManager(
            os.path.abspath(directory), item_names=("state", "data", "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                                 enable_async_checkpointing=async_save))
        self.keep = int(keep or 0)  # 0: keep all.
        self.good = set(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._mngr.latest_step()

    def save(self, step: int, state: Any, data_iter, meta: dict, *, force: bool = False) -> None:
        """Starts saving (asynchronously); returns once the state is copied off the devices.
        Then deletes the checkpoints past ``keep`` but the newest good one."""
        self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta)), force=force)
        steps = sorted(self._mngr.all_steps())
        if self.keep and len(steps) > self.keep:
            newest_good = max(self.good.intersection(steps), default=None)
            for old in steps[:-self.keep]:
                if old != newest_good:
                    self._mngr.delete(old)
                    self.good.discard(old)

    def mark_good(self, step: int) -> None:
        """Records that the step after checkpoint ``step`` was finite."""
        self.good.add(step)

    def set_aside_unconfirmed(self, to: str) -> int | None:
        """Moves the checkpoints newer than the newest good one into directory ``to`` (so a
        resume starts from the good one; nothing is deleted). Returns the good step or None."""
        self.wait()
        steps = sorted(self._mngr.all_steps())
        good = max(self.good.intersection(steps), default=None)
        later = [s for s in steps if good is None or s > good]
        if later and jax.process_index() == 0:
            os.makedirs(to, exist_ok=True)
            for s in later:
                dest = os.path.join(to, str(s))
                while os.path.exists(dest):  # Set aside before, by another diverging run.
                    dest += "+"
                os.replace(os.path.join(str(self._mngr.directory), str(s)), dest)
            print(f"moved checkpoint(s) {later} of a diverging run to {to}")
        self._mngr.reload()
        return good

    def restore(self, step: int, target: Any, data_iter) -> tuple[Any, dict]:
        """The state (placed as ``target``'s shardings say) and metadata; ``data_iter`` is set
        to the saved position in place.

        The data position is per process, so a run resumes with the process count that saved
        it (the mesh and device count may differ); another count is a ValueError saying so.
        """
        saved = self.data_process_count(step)
        if saved is not None and saved != jax.process_count():
            raise ValueError(
                f"checkpoint {self._mngr.directory}/{step} was written by {saved} process(es), "
                f"each saving its own data-iterator position; this run has "
                f"{jax.process_count()}. Resume with {saved} process(es) (any device count and "
                f"mesh), or train in a new workdir")
        out = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            data=grain.checkpoint.CheckpointRestore(data_iter),
            meta=ocp.args.JsonRestore()))
        return out.state, out.meta

    def data_process_count(self, step: int) -> int | None:
        """How many processes saved ``step``'s data-iterator state (from its file names), or
        None if that cannot be told."""
        pattern = os.path.join(str(self._mngr.directory), str(step), "data", "process_*-of-*.json")
        counts = {int(re.search(r"-of-(\d+)\.json$", f).group(1)) for f in glob.glob(pattern)}
        return counts.pop() if len(counts) == 1 else None

    def restore_state(self, step: int, target: Any = None) -> Any:
        """Only the train state (for evaluation or export); without a ``target``, as saved."""
        return self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target))).state

    def restore_params(self, step: int, target: Any) -> Any:
        """Only ``state.params`` (shaped and placed as ``target`` says); the optimizer state
        stays on disk (for export and evaluation)."""
        wanted = {"params": target}
        restore_args = jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(sharding=getattr(x, "sharding", None)), wanted)
        return self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            wanted, restore_args=restore_args, partial_restore=True))).state["params"]

    def read_metadata(self, step: int) -> dict:
        """The metadata saved with ``step`` (config, schema version, task, model family)."""
        return self._mngr.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._mngr.wait_until_finished()
