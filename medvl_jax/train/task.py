"""What a task gives the shared loop (SFT, contrastive, DPO, GRPO all implement this).

The loop (loop.py) owns the mesh, data iteration, state, optimizer, checkpoints, metrics and
guards; a task owns its model and its loss. Required members::

    name: str                                     # saved in checkpoint metadata
    dummy_batch(batch_size) -> dict               # zeros shaped like a real local batch
    init(rng, batch) -> params                    # may carry flax logical-axis boxes
    loss(params, batch, rng) -> (loss, metrics)   # scalar loss, dict of scalar metrics

``init`` is only ever called under ``jax.eval_shape`` or ``jax.jit``, so it must be a pure
function of its inputs. Parameters created with ``nn.with_logical_partitioning`` carry their
logical axis names; the loop reads them from the abstract output of ``init`` and shards each
parameter as ``medvl_jax.parallel.rules.RULES`` says (unnamed parameters are replicated).

``loss`` is traced inside the jitted step. ``rng`` is ``fold_in(seed, step)`` (and further
folded per microbatch under gradient accumulation). The loss must be a mean over the examples
of the batch, so that the mean over equal microbatches equals the loss of the whole batch.

Optional members (checked with ``hasattr``)::

    evaluators() -> {name: fn(state) -> dict}     # run every train.eval_every steps and at
                                                  # the end; results go to eval_<name>_<step>.json
    flops_per_example: float                      # training FLOPs (forward + backward) of one
                                                  # example, for the MFU estimate
    count_tokens(local_batch) -> int              # tokens in a batch (default: the sum of
                                                  # batch["input_mask"] when present)
    data_iterator(config, *, process_index, process_count) -> iterator
                                                  # the task's own data, when train() is given
                                                  # no data_iter_fn
    prepare_batch(params, local_data, rng) -> dict
                                                  # host-side: turns what the iterator gave
                                                  # into the step's batch with the current
                                                  # params (GRPO: rollouts), outside the jit
    updates_per_batch: int                        # optimizer steps on each prepared batch
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import numpy as np

Batch = Mapping[str, Any]
Evaluator = Callable[[Any], dict]


@runtime_checkable
class Task(Protocol):
    """The members every task has; see the module docstring for the optional ones."""

    name: str

    def dummy_batch(self, batch_size: int) -> dict:
        """Zeros shaped like a real batch of ``batch_size`` examples (for shape-only init)."""
        ...

    def init(self, rng: Any, batch: Batch) -> Any:
        """Parameters for a batch of this shape (boxed with logical axes where named)."""
        ...

    def loss(self, params: Any, batch: Batch, rng: Any) -> tuple[Any, dict]:
        """``(scalar loss, {name: scalar metric})`` of one batch."""
        ...


def evaluators(task: Any) -> dict[str, Evaluator]:
    """The task's evaluators, or an empty dict."""
    return dict(task.evaluators()) if hasattr(task, "evaluators") else {}


def count_tokens(task: Any, local_batch: Batch) -> int:
    """Tokens in a local batch: the task's count, else the sum of ``input_mask``, else 0."""
    if hasattr(task, "count_tokens"):
        return int(task.count_tokens(local_batch))
    if "input_mask" in local_batch:
        return int(np.asarray(local_batch["input_mask"]).sum())
    return 0


def check_task(task: Any) -> None:
    """Raises TypeError naming the first required member the task lacks."""
    for member in ("name", "dummy_batch", "init", "loss"):
        if not hasattr(task, member):
            raise TypeError(f"{type(task).__name__} is not a task: it has no {member!r} "
                            f"(see medvl_jax.train.task)")
