"""Declarative pipeline configs: ``pipelines/*.yaml`` -> validated :class:`PipelineSpec`.

A config names its models by role and its stages by dotted class path, in execution order::

    name: pnp-vqa-base
    models: {itm: Salesforce/blip-itm-large-coco, ...}
    stages:
      matching: {type: capvqa.stages.gradcam_matching.GradCamMatching, model: itm, block_num: 7}
      captioning: {type: ..., model: captioner, inputs: {relevance: matching}, num_captions: 100}
    answer: reader

``extends: other-config`` starts from another config. Overrides (``--set key=value``, or
``overrides=[...]`` in Python) address ``seed``, ``models.ROLE`` and ``STAGE.PARAM``; values are parsed
as YAML scalars. Validation binds every stage's parameters to its config dataclass without loading any
model, and unknown keys are rejected with the list of valid ones.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from capvqa.engine.registry import answer_field_problem, resolve_stage_type
from capvqa.errors import ConfigError
from capvqa.resources import pipelines_dir

_RESERVED_STAGE_KEYS = ("type", "model", "models", "inputs")
_TOP_LEVEL_KEYS = ("name", "method", "description", "extends", "seed", "task", "models", "stages", "answer",
                   "models_preset", "run")
TASKS = ("auto", "vqav2", "okvqa")


@dataclass(frozen=True)
class StageSpec:
    """One stage of a pipeline as declared: class path, model role, upstream inputs, parameters."""

    name: str
    type: str
    model_roles: dict[str, str]  # config field holding a model id -> role in the pipeline's models
    inputs: dict[str, str]
    params: dict[str, Any]


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    method: str
    description: str
    seed: int
    models: dict[str, str]
    stages: tuple[StageSpec, ...]
    answer: str
    task: str = "auto"
    models_preset: str | None = None
    run: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config, loadable again with :func:`load_spec` (what run folders save)."""
        stages: dict[str, Any] = {}
        for stage in self.stages:
            node: dict[str, Any] = {"type": stage.type}
            if stage.model_roles:
                node["models"] = dict(stage.model_roles)
            if stage.inputs:
                node["inputs"] = dict(stage.inputs)
            node.update(stage.params)
            stages[stage.name] = node
        out: dict[str, Any] = {
            "name": self.name,
            "method": self.method,
            "description": self.description,
            "seed": self.seed,
            "task": self.task,
            "models": dict(self.models),
            "stages": stages,
            "answer": self.answer,
        }
        if self.models_preset:
            out["models_preset"] = self.models_preset
        if self.run:
            out["run"] = dict(self.run)
        return out

    def stage(self, name: str) -> StageSpec:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)


def available_pipelines() -> list[str]:
    return sorted(p.stem for p in pipelines_dir().glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: malformed YAML{where}: {getattr(error, 'problem', error)}") from error
    except OSError as error:
        raise ConfigError(f"cannot read pipeline config {path}: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a pipeline config must be a mapping with 'stages' and 'models'")
    return data


def locate_config(name_or_path: str | Path) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise ConfigError(f"pipeline config file {candidate} does not exist")
        return candidate
    path = pipelines_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"unknown pipeline {str(name_or_path)!r}; available: {', '.join(available_pipelines())} "
            "(or give a path to a .yaml config)"
        )
    return path


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_raw_config(name_or_path: str | Path, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    path = locate_config(name_or_path)
    if str(path) in seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle ({' -> '.join(seen)})")
    data = _read_yaml(path)
    unknown = sorted(set(data) - set(_TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {unknown}; valid: {list(_TOP_LEVEL_KEYS)}")
    parent = data.pop("extends", None)
    if parent:
        data = _merge(load_raw_config(parent, (*seen, str(path))), data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. captioning.num_captions=50")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _apply_override(data: dict[str, Any], parts: list[str], value: Any) -> None:
    stages = data.get("stages") or {}
    models = data.get("models") or {}
    head = parts[0]
    if head in ("seed", "task", "answer", "name", "description") and len(parts) == 1:
        data[head] = value
        return
    if head == "models" and len(parts) == 2:
        if parts[1] not in models:
            raise ConfigError(f"unknown model role {parts[1]!r}; valid: {sorted('models.' + r for r in models)}")
        models[parts[1]] = value
        return
    if head in stages and len(parts) == 2:
        param = parts[1]
        valid = _stage_param_names(stages[head])
        if param not in valid:
            raise ConfigError(
                f"unknown key {'.'.join(parts)!r}; valid keys of stage {head!r}: "
                f"{sorted(f'{head}.{p}' for p in valid)}"
            )
        stages[head][param] = value
        return
    valid_keys = ["seed", "task", *(f"models.{r}" for r in models)]
    for stage_name, node in stages.items():
        valid_keys += [f"{stage_name}.{p}" for p in sorted(_stage_param_names(node))]
    raise ConfigError(f"unknown key {'.'.join(parts)!r}; valid keys: {valid_keys}")


def _stage_param_names(node: dict[str, Any]) -> set[str]:
    stage_class = resolve_stage_type(str(node.get("type", "")))
    # a model bound to a role is chosen through the role (models.ROLE=...), not as a stage parameter
    return {f.name for f in dataclasses.fields(stage_class.Config)} - set(_model_roles(node, stage_class))


def _model_roles(node: dict[str, Any], stage_class: type) -> dict[str, str]:
    """``model: ROLE`` binds the stage's first model field; ``models: {field: ROLE}`` binds any."""
    roles: dict[str, str] = {}
    model_fields = tuple(getattr(stage_class, "MODEL_FIELDS", ()))
    if node.get("model") is not None:
        if not model_fields:
            raise ConfigError(f"stage type {node.get('type')} loads no model, so it takes no 'model' role")
        roles[model_fields[0]] = str(node["model"])
    for field_name, role in (node.get("models") or {}).items():
        if field_name not in model_fields:
            raise ConfigError(
                f"stage type {node.get('type')} has no model field {field_name!r}; model fields: {list(model_fields)}"
            )
        roles[str(field_name)] = str(role)
    return roles


def load_spec(
    name_or_path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    models_preset: str | None = None,
) -> PipelineSpec:
    """Load, merge, apply a models preset, then overrides, and validate (no model is loaded).

    Overrides come last so that an explicit ``models.ROLE=...`` wins over the preset.
    """
    data = load_raw_config(name_or_path)
    # a saved run config records its preset: re-resolve it here (the tiny zoo may live elsewhere now)
    models_preset = models_preset or data.get("models_preset")
    if models_preset:
        from capvqa.models.presets import apply_models_preset

        data["models"] = apply_models_preset(models_preset, data.get("models") or {})
        data["models_preset"] = models_preset
        if models_preset == "tiny":
            # fine-tuned checkpoints for the full-size architectures (e.g. Img2LLM's T5_large_QG.pth)
            # cannot load into tiny models: tiny runs use the tiny weights alone
            for node in (data.get("stages") or {}).values():
                if isinstance(node, dict) and node.get("checkpoint"):
                    node["checkpoint"] = None
    for text in overrides:
        parts, value = parse_override(text)
        _apply_override(data, parts, value)
    return _validate(data, str(name_or_path))


def _execution_order(stages_node: dict[str, Any], origin: str) -> dict[str, Any]:
    """Stages ordered so each comes after the stages it reads, otherwise in declaration order.

    A config that ``extends`` another may add a stage that an inherited stage reads (e.g. tags for a
    prompt); declaration order alone would put it last.
    """
    remaining = dict(stages_node)
    ordered: dict[str, Any] = {}
    while remaining:
        for name, node in remaining.items():
            sources = set(((node or {}).get("inputs") or {}).values()) if isinstance(node, dict) else set()
            if sources <= set(ordered) or not sources & set(remaining):
                ordered[name] = node
                del remaining[name]
                break
        else:
            raise ConfigError(f"{origin}: the stages' inputs form a cycle among {sorted(remaining)}")
    return ordered


def _validate(data: dict[str, Any], origin: str) -> PipelineSpec:
    stages_node = data.get("stages")
    if not isinstance(stages_node, dict) or not stages_node:
        raise ConfigError(f"{origin}: 'stages' must be a non-empty mapping of stage name -> settings")
    stages_node = _execution_order(stages_node, origin)
    models = {str(k): str(v) for k, v in (data.get("models") or {}).items()}
    stages: list[StageSpec] = []
    for name, node in stages_node.items():
        if not isinstance(node, dict) or "type" not in node:
            raise ConfigError(f"{origin}: stage {name!r} needs a 'type' (dotted class path)")
        stage_class = resolve_stage_type(node["type"])
        params = {k: v for k, v in node.items() if k not in _RESERVED_STAGE_KEYS}
        roles = _model_roles(node, stage_class)
        for role in roles.values():
            if role not in models:
                raise ConfigError(f"{origin}: stage {name!r} uses model role {role!r}; roles: {sorted(models)}")
        inputs = {str(k): str(v) for k, v in (node.get("inputs") or {}).items()}
        earlier = [s.name for s in stages]
        for input_name, upstream in inputs.items():
            if upstream not in earlier:
                raise ConfigError(
                    f"{origin}: stage {name!r} input {input_name!r} reads {upstream!r}, which is not an "
                    f"earlier stage (earlier: {earlier})"
                )
        missing_inputs = sorted(set(stage_class.INPUTS) - set(inputs))
        if missing_inputs:
            raise ConfigError(f"{origin}: stage {name!r} ({node['type']}) needs inputs {missing_inputs}")
        config_fields = {f.name for f in dataclasses.fields(stage_class.Config)} - set(roles)
        unknown = sorted(set(params) - config_fields)
        if unknown:
            raise ConfigError(
                f"{origin}: stage {name!r} has unknown parameters {unknown}; valid: {sorted(config_fields)}"
            )
        stages.append(StageSpec(name=str(name), type=node["type"], model_roles=roles, inputs=inputs, params=params))
    answer = data.get("answer") or stages[-1].name
    if answer not in {s.name for s in stages}:
        raise ConfigError(f"{origin}: answer stage {answer!r} is not one of the stages")
    problem = answer_field_problem(resolve_stage_type(next(s.type for s in stages if s.name == answer)))
    if problem:
        raise ConfigError(f"{origin}: stage {answer!r} cannot be the answer stage: {problem}")
    spec = PipelineSpec(
        name=str(data.get("name") or Path(origin).stem),
        method=str(data.get("method") or ""),
        description=str(data.get("description") or ""),
        seed=int(data.get("seed", 42)),
        task=_check_task(data.get("task", "auto"), origin),
        models=models,
        stages=tuple(stages),
        answer=answer,
        models_preset=data.get("models_preset"),
        run=dict(data.get("run") or {}),
    )
    for stage in spec.stages:  # bind parameters now so type errors surface before any model loads
        build_stage_config(spec, stage)
    return spec


def _check_task(task: Any, origin: str) -> str:
    if task not in TASKS:
        raise ConfigError(f"{origin}: task must be one of {list(TASKS)}, got {task!r}")
    return str(task)


def resolve_task(task: str, dataset_name: str | None) -> str:
    """``auto`` -> ``okvqa`` when the dataset is OK-VQA (by name), else ``vqav2``."""
    if task != "auto":
        return task
    name = (dataset_name or "").lower().replace("-", "").replace("_", "")
    return "okvqa" if "okvqa" in name else "vqav2"


def build_stage_config(spec: PipelineSpec, stage: StageSpec) -> Any:
    """The stage's frozen config dataclass: model roles resolved to ids, the pipeline seed and task
    applied to stages that have such fields (unless the stage sets them itself)."""
    stage_class = resolve_stage_type(stage.type)
    params = dict(stage.params)
    for field_name, role in stage.model_roles.items():
        params[field_name] = spec.models[role]
    field_types = {f.name: f for f in dataclasses.fields(stage_class.Config)}
    if "seed" in field_types and "seed" not in params:
        params["seed"] = spec.seed
    if "task" in field_types and "task" not in params:
        params["task"] = resolve_task(spec.task, None)
    for f in dataclasses.fields(stage_class.Config):  # types first: __post_init__ checks assume them
        if f.name in params:
            _check_type(stage.name, f, params[f.name])
    try:
        config = stage_class.Config(**params)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"stage {stage.name!r}: {error}") from error
    return config


def _check_type(stage_name: str, f: dataclasses.Field, value: Any) -> None:
    expected = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    checks = {"int": int, "float": (int, float), "str": str, "bool": bool}
    base = expected.replace(" | None", "")
    if base in checks and not (value is None and "None" in expected):
        if isinstance(value, bool) and base in ("int", "float"):
            ok = False
        else:
            ok = isinstance(value, checks[base])
        if not ok:
            raise ConfigError(
                f"stage {stage_name!r}: parameter {f.name!r} must be {base}, got {value!r} ({type(value).__name__})"
            )
