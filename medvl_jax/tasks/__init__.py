"""The table of tasks: ``config.task`` names a module, the module names its task class.

``config.task = "sft"`` is the class ``TASK`` of :mod:`medvl_jax.tasks.sft`; a dotted name
(``"mylab.tasks.ppo"``) is a module outside the package that does the same. Adding a task is
one file (``medvl_jax/tasks/<name>.py`` defining a :class:`~medvl_jax.tasks.base.Task` subclass
and ``TASK = ThatClass``) plus its config: nothing imports a task by name, nothing registers
on import. The task's config section (``config[name]``) is its ``default_config()``, merged
under whatever part of it a config gives (:func:`complete_config`).
"""
from __future__ import annotations

import importlib
import pkgutil

import ml_collections

from medvl_jax.tasks.base import Task


def get(name: str) -> type[Task]:
    """The task class ``config.task = name`` names; a ValueError listing the known tasks
    when there is none."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"config.task must name a task, one of {known()}; got {name!r}")
    module_name = name if "." in name else f"{__name__}.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name and not module_name.startswith(f"{e.name}."):
            raise  # The task's module exists but something it imports does not.
        raise ValueError(f"unknown task {name!r}; known tasks: {known()}") from None
    task = getattr(module, "TASK", None)
    if not (isinstance(task, type) and issubclass(task, Task)):
        raise ValueError(f"unknown task {name!r}: module {module_name} defines no TASK (a "
                         f"medvl_jax.tasks.base.Task subclass); known tasks: {known()}")
    if task.name != name.rsplit(".", 1)[-1]:
        raise ValueError(f"{module_name}.TASK is named {task.name!r}; a task's name is its "
                         f"module's ({name.rsplit('.', 1)[-1]!r})")
    return task


def known() -> list[str]:
    """Names of the tasks in this package (modules that define ``TASK``)."""
    out = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        task = getattr(module, "TASK", None)
        if isinstance(task, type) and issubclass(task, Task):
            out.append(info.name)
    return sorted(out)


def section(name: str) -> str:
    """The config section of task ``name`` (its last dotted part)."""
    return name.rsplit(".", 1)[-1]


# Top-level keys a config may leave out, with their defaults.
OPTIONAL = {"init_from": "", "vision_init": "", "vision_stage": "", "evals": {}}


def complete_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``config`` whose task section holds every default of the task's
    ``default_config()``, the config's own values taking precedence (a config may give only
    the fields it changes, or no section at all), and with the optional top-level keys
    (:data:`OPTIONAL`) it leaves out. Unknown keys are left for validation to name."""
    task = get(config.get("task"))
    key = section(config.task)
    given = config.get(key)
    out = ml_collections.ConfigDict(config.to_dict())
    merged = _merge(task.default_config().to_dict(),
                    given.to_dict() if given is not None else {})
    if merged or given is not None:
        with out.ignore_type():
            out[key] = ml_collections.ConfigDict(merged)
    for name, value in OPTIONAL.items():
        if name not in out:
            out[name] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    return out


def _merge(defaults: dict, given: dict) -> dict:
    out = dict(defaults)
    for k, v in given.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and out[k]:
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out
