"""Which classes a pipeline config's ``type:`` may name, and the check that a class is a stage.

A config is data that people share, so naming a stage must not be a way to run code: ``type:`` resolves
only to capvqa's own stages (:data:`capvqa.stages.BUILTIN_STAGES`, by class name or dotted path), to
stages that an installed package declares in the ``capvqa.stages`` entry-point group, or to classes
registered in this process with :func:`register_stage`. Nothing is imported from the current folder or
from any other module path. Each class is checked against the stage contract
(:class:`capvqa.engine.stage.Stage`) before a config may use it.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from importlib import metadata
from typing import Any

from capvqa.errors import ConfigError

ENTRY_POINT_GROUP = "capvqa.stages"

_registered: dict[str, type] = {}  # name -> class, from register_stage
_checked: dict[type, None] = {}


def register_stage(stage_class: type, name: str | None = None) -> str:
    """Make ``stage_class`` nameable in configs, as ``name`` (default: the class name) and as its dotted
    path ``module.ClassName``. Returns the name. The class is checked against the stage contract now."""
    check_stage_class(stage_class, name or stage_class.__name__)
    key = name or stage_class.__name__
    _registered[key] = stage_class
    _registered[f"{stage_class.__module__}.{stage_class.__qualname__}"] = stage_class
    return key


def unregister_stage(name: str) -> None:
    """Forget a class registered with :func:`register_stage` (both its name and its dotted path)."""
    stage_class = _registered.pop(name, None)
    if stage_class is not None:
        _registered.pop(f"{stage_class.__module__}.{stage_class.__qualname__}", None)


def _builtin_target(type_name: str) -> tuple[str, str] | None:
    from capvqa.stages import BUILTIN_STAGES, RENAMED_PATHS

    class_name = RENAMED_PATHS.get(type_name, type_name)
    if class_name in BUILTIN_STAGES:
        return BUILTIN_STAGES[class_name], class_name
    module, _, class_name = type_name.rpartition(".")
    if BUILTIN_STAGES.get(class_name) == module:
        return module, class_name
    return None


def _entry_points() -> dict[str, metadata.EntryPoint]:
    found: dict[str, metadata.EntryPoint] = {}
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        found[entry.name] = entry
        found[entry.value.replace(":", ".")] = entry
    return found


def available_stage_types() -> list[str]:
    """Names a config may use: built-in stages, entry points, registered classes."""
    from capvqa.stages import BUILTIN_STAGES

    names = set(BUILTIN_STAGES) | {e.name for e in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(names | {n for n in _registered if "." not in n})


def resolve_stage_type(type_name: Any) -> type:
    """The stage class a config's ``type:`` names, checked against the stage contract.

    Raises :class:`ConfigError` for anything that is not a built-in, entry-point or registered stage,
    without importing it.
    """
    if not isinstance(type_name, str) or not type_name.strip():
        raise ConfigError(f"a stage's 'type' must be a stage name, got {type_name!r}")
    type_name = type_name.strip()
    if type_name in _registered:
        return _registered[type_name]
    target = _builtin_target(type_name)
    if target is not None:
        module_name, class_name = target
        stage_class = getattr(importlib.import_module(module_name), class_name)
    else:
        entry = _entry_points().get(type_name)
        if entry is None:
            raise ConfigError(
                f"stage type {type_name!r} is not a capvqa stage and is not registered, so it is not "
                f"imported. Built-in stages: {', '.join(available_stage_types())}. To use your own stage, "
                f"declare it in your package's entry points (group {ENTRY_POINT_GROUP!r}, e.g. "
                f"[project.entry-points.\"{ENTRY_POINT_GROUP}\"] MyStage = \"mypkg.stages:MyStage\") or call "
                "capvqa.register_stage(MyStage) before loading the config"
            )
        try:
            stage_class = entry.load()
        except Exception as error:  # noqa: BLE001 - a plugin's import error, named for the user
            raise ConfigError(f"stage type {type_name!r} (entry point {entry.value}) cannot be loaded: {error}") from error
    check_stage_class(stage_class, type_name)
    return stage_class


def check_stage_class(stage_class: Any, type_name: str) -> None:
    """Raise :class:`ConfigError` unless ``stage_class`` satisfies the stage contract
    (:class:`capvqa.engine.stage.Stage`): what the engine reads, declared and of the right kind."""
    if stage_class in _checked:
        return
    problems = stage_contract_problems(stage_class)
    if problems:
        raise ConfigError(f"stage type {type_name!r} does not satisfy the stage contract: {'; '.join(problems)}")
    _checked[stage_class] = None


def stage_contract_problems(stage_class: Any) -> list[str]:
    """Every way ``stage_class`` breaks the stage contract (empty when it satisfies it)."""
    if not isinstance(stage_class, type):
        return [f"{stage_class!r} is not a class"]
    problems = []
    for attribute, kind in (("NAME", str), ("VERSION", str)):
        value = getattr(stage_class, attribute, None)
        if not isinstance(value, kind) or not value:
            problems.append(f"{attribute} must be a non-empty string")
    for attribute in ("INPUTS", "MODEL_FIELDS"):
        value = getattr(stage_class, attribute, None)
        if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
            problems.append(f"{attribute} must be a tuple of strings")
    config = getattr(stage_class, "Config", None)
    if not (isinstance(config, type) and dataclasses.is_dataclass(config)):
        problems.append("Config must be a dataclass")
    else:
        if not config.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            problems.append("Config must be a frozen dataclass (its fields form the cache key)")
        fields = {f.name: f for f in dataclasses.fields(config)}
        batch = fields.get("batch_size")
        if batch is None or batch.metadata.get("semantic", True):
            problems.append("Config needs a non-semantic batch_size field (stage.non_semantic(N))")
        for model_field in getattr(stage_class, "MODEL_FIELDS", ()) or ():
            if isinstance(model_field, str) and model_field not in fields:
                problems.append(f"MODEL_FIELDS names {model_field!r}, which is not a Config field")
    output = getattr(stage_class, "Output", None)
    if not (isinstance(output, type) and dataclasses.is_dataclass(output)):
        problems.append("Output must be a dataclass (the record the stage returns per item)")
    for method in ("setup", "run", "cleanup"):
        if not callable(getattr(stage_class, method, None)):
            problems.append(f"method {method}() is missing")
    cost = getattr(stage_class, "cost", None)
    if cost is not None and not callable(cost):
        problems.append("cost, when defined, must be a method cost(input) -> int")
    problems.extend(neighbour_inputs_problems(stage_class, getattr(stage_class, "NEIGHBOUR_INPUTS", ())))
    return problems


def neighbour_inputs_problems(stage_class: Any, neighbour_inputs: Any) -> list[str]:
    """Why ``neighbour_inputs`` (a stage's ``NEIGHBOUR_INPUTS``, on its class or narrowed by an instance)
    breaks the contract: it must be a tuple of names from the class's ``INPUTS``."""
    if not isinstance(neighbour_inputs, tuple) or not all(isinstance(v, str) for v in neighbour_inputs):
        return ["NEIGHBOUR_INPUTS, when defined, must be a tuple of input names"]
    inputs = getattr(stage_class, "INPUTS", ())
    declared = getattr(stage_class, "NEIGHBOUR_INPUTS", ())
    unknown = [name for name in neighbour_inputs if not isinstance(inputs, tuple) or name not in inputs]
    if unknown:
        return [f"NEIGHBOUR_INPUTS names {unknown}, which are not in INPUTS (a neighbour's result is read "
                "through one of the stage's own required inputs)"]
    if isinstance(declared, tuple) and not set(neighbour_inputs) <= set(declared):
        return [f"NEIGHBOUR_INPUTS {list(neighbour_inputs)} of an instance may only narrow the class's "
                f"{list(declared)}"]
    return []


def answer_field_problem(stage_class: type) -> str | None:
    """Why ``stage_class`` cannot be a pipeline's answer stage, or None: its Output needs ``answer: str``."""
    output = stage_class.Output
    fields = {f.name: f for f in dataclasses.fields(output)}
    if "answer" not in fields:
        return f"its output {output.__name__} has no 'answer' field"
    try:
        hint = typing.get_type_hints(output).get("answer")
    except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to the declared text
        hint = fields["answer"].type
    if hint not in (str, "str"):
        return f"its output {output.__name__}.answer is {hint!r}, not str"
    return None
