"""Declarative pipeline configs: ``pipelines/*.yaml`` -> validated :class:`PipelineSpec`.

A config names its models by role and its stages by dotted class path, in execution order::

    name: pnp-vqa-base
    models: {itm: Salesforce/blip-itm-large-coco, ...}
    stages:
      matching: {type: capvqa.stages.gradcam_matching.GradCamMatching, model: itm, block_num: 7}
      captioning: {type: ..., model: captioner, inputs: {relevance: matching}, num_captions: 100}
    answer: reader

``extends: other-config`` starts from another config. Overrides (``--set key=value``, or
``overrides=[...]`` in Python) address ``seed``, ``task``, ``models.ROLE`` and ``STAGE.PARAM``; values are
parsed as YAML scalars. Validation binds every stage's parameters to its config dataclass without loading
any model, and unknown keys are rejected with the list of valid ones.

Each setting is stated once. The pipeline's ``task`` fills every stage's ``task`` field (a stage cannot
set its own). A stage may take some settings from the stage that reads its output, declared as
``CONSUMER_FIELDS = {own field: reader's field}``: Img2LLM's prompt is fitted to the budget of the LLM
stage that reads it, so its tokenizer, context length and answer room *are* that stage's ``model``,
``context_length`` and ``max_new_tokens``, and no override can make the two disagree.

Stages are also checked together when the config loads, before any model: an input whose upstream
``Output`` lacks a field the stage declares it reads (``INPUT_FIELDS = {input: (field, ...)}``), and any
check a stage class defines as ``check_pipeline(config, upstream)`` (``upstream``: input name ->
:class:`UpstreamStage`), which raises :class:`ConfigError` for a combination that cannot work.
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
_PIPELINE_PARAMS = ("task",)  # stage config fields only the pipeline sets (from its top-level key)
#: The dataset conventions a stage can follow (its ``task`` field): VQAv2's (Img2LLM's yes/no exemplars) or
#: OK-VQA's (Img2LLM's answer rules). The one list every stage and the config loader check against.
TASKS = ("vqav2", "okvqa")
#: A config's top-level ``task`` may also be ``auto``: resolved per dataset (:func:`resolve_task`).
AUTO_TASK = "auto"
PIPELINE_TASKS = (AUTO_TASK, *TASKS)


def check_task(task: Any, where: str, *, allow_auto: bool = False) -> str:
    """``task`` if it is one of :data:`TASKS` (or ``auto`` when allowed), else a ConfigError naming ``where``
    and the valid values."""
    valid = PIPELINE_TASKS if allow_auto else TASKS
    if not isinstance(task, str) or task not in valid:
        raise ConfigError(f"{where}: task must be one of {list(valid)}, got {task!r}")
    return task


@dataclass(frozen=True)
class StageSpec:
    """One stage of a pipeline as declared: class path, model role, upstream inputs, parameters."""

    name: str
    type: str
    model_roles: dict[str, str]  # config field holding a model id -> role in the pipeline's models
    inputs: dict[str, str]
    params: dict[str, Any]


@dataclass(frozen=True)
class UpstreamStage:
    """One input of a stage as cross-stage checks see it: the stage that feeds it, resolved.

    ``inputs`` are that stage's own inputs (input name -> stage name), so a check can follow the graph one
    step further (e.g. that two inputs derive from the same captions).
    """

    name: str
    stage_class: type
    config: Any
    inputs: dict[str, str]


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
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read pipeline config {path}: {error} (a config is a UTF-8 YAML text file)") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a pipeline config must be a mapping with 'stages' and 'models'")
    return data


RUN_CONFIG_NAME = "config.yaml"  # the resolved config a run folder holds


def locate_config(name_or_path: str | Path) -> Path:
    """The YAML file a pipeline argument means: a path to a ``.yaml`` file, a run folder (its
    ``config.yaml``), or the name of a config in ``pipelines/``."""
    candidate = Path(name_or_path)
    shipped = pipelines_dir() / f"{name_or_path}.yaml"
    if candidate.is_dir():
        if (candidate / RUN_CONFIG_NAME).is_file():
            return candidate / RUN_CONFIG_NAME
        if not shipped.is_file():  # a folder that happens to share a pipeline's name does not hide it
            raise ConfigError(
                f"{candidate} is a folder without {RUN_CONFIG_NAME}, so it is not a run folder; give a run "
                f"folder that holds {RUN_CONFIG_NAME}, a path to a .yaml config, or a pipeline name "
                f"({', '.join(available_pipelines())})"
            )
    elif candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise ConfigError(f"pipeline config file {candidate} does not exist")
        return candidate
    if not shipped.is_file():
        raise ConfigError(
            f"unknown pipeline {str(name_or_path)!r}; available: {', '.join(available_pipelines())} "
            "(or give a path to a .yaml config, or a run folder)"
        )
    return shipped


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
    if head in stages and isinstance(stages[head], dict) and len(parts) == 2:
        param = parts[1]
        _refuse_restated(head, param, stages)
        valid = _stage_param_names(head, stages)
        if param not in valid:
            raise ConfigError(
                f"unknown key {'.'.join(parts)!r}; valid keys of stage {head!r}: "
                f"{sorted(f'{head}.{p}' for p in valid)}"
            )
        stages[head][param] = value
        return
    valid_keys = ["seed", "task", *(f"models.{r}" for r in models)]
    for stage_name, node in stages.items():
        if isinstance(node, dict):
            valid_keys += [f"{stage_name}.{p}" for p in sorted(_stage_param_names(stage_name, stages))]
    raise ConfigError(f"unknown key {'.'.join(parts)!r}; valid keys: {valid_keys}")


def _stage_param_names(name: str, nodes: dict[str, Any]) -> set[str]:
    """The parameters stage ``name`` states itself: its config fields, less those set elsewhere -- a model
    bound to a role (chosen with models.ROLE=...), the pipeline's task, settings of the stage reading it."""
    node = nodes[name]
    stage_class = resolve_stage_type(str(node.get("type", "")))
    fields = {f.name for f in dataclasses.fields(stage_class.Config)}
    elsewhere = set(_model_roles(node, stage_class)) | set(_PIPELINE_PARAMS) | set(_reader_sources(name, nodes))
    return fields - elsewhere


def _reader_sources(name: str, nodes: dict[str, Any]) -> dict[str, str]:
    """Config fields of stage ``name`` that a stage reading its output states (the stage's
    ``CONSUMER_FIELDS``): own field -> ``READER.FIELD``. Only readers whose config has every one of those
    fields count (a stage reading the output for another purpose, e.g. a report, does not)."""
    node = nodes.get(name)
    if not isinstance(node, dict):
        return {}
    links = dict(getattr(resolve_stage_type(str(node.get("type", ""))), "CONSUMER_FIELDS", None) or {})
    sources: dict[str, str] = {}
    for reader, reader_node in nodes.items():
        if not links or not isinstance(reader_node, dict) or "type" not in reader_node:
            continue  # a stage without a type is reported where it is validated
        inputs = [str(v) for v in (reader_node.get("inputs") or {}).values()]
        if _states_consumer_fields(links, name, inputs, resolve_stage_type(str(reader_node.get("type", "")))):
            for own, theirs in links.items():
                sources.setdefault(own, f"{reader}.{theirs}")
    return sources


def _states_consumer_fields(links: dict[str, str], source: str, reader_inputs: Any, reader_class: type) -> bool:
    """Whether a stage (its inputs' sources, its class) states ``source``'s ``CONSUMER_FIELDS`` ``links``:
    it reads ``source``'s output and its config has every linked field."""
    return (bool(links) and source in reader_inputs
            and set(links.values()) <= {f.name for f in dataclasses.fields(reader_class.Config)})


def _refuse_restated(name: str, param: str, nodes: dict[str, Any]) -> None:
    """A ConfigError when stage ``name`` would state ``param``, a setting stated elsewhere."""
    if param in _PIPELINE_PARAMS:
        node = nodes[name]
        stage_class = resolve_stage_type(str(node.get("type", "")))
        if param in {f.name for f in dataclasses.fields(stage_class.Config)}:
            raise ConfigError(
                f"stage {name!r} cannot set {param!r}: it is the pipeline's, set once for every stage (the "
                f"top-level '{param}:' of the config, or --set {param}=VALUE; valid: {list(PIPELINE_TASKS)})"
            )
    source = _reader_sources(name, nodes).get(param)
    if source is not None:
        raise ConfigError(
            f"stage {name!r} cannot set {param!r}: it is {source} (stage {source.split('.')[0]!r} reads "
            f"{name!r} and the two must agree), so it is stated once, there; set {source} instead"
        )


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
        if parts == ["seed"]:
            _check_seed(value, f"override {text!r}")
        elif parts == ["task"]:
            check_task(value, f"override {text!r}", allow_auto=True)
        _apply_override(data, parts, value)
    origin = locate_config(name_or_path) if Path(name_or_path).is_dir() else name_or_path  # a run folder's file
    return _validate(data, str(origin))


def _check_seed(value: Any, where: str) -> int:
    """A seed is a whole number: ``1.9`` or ``true`` would silently become 1 through ``int()``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: seed must be a whole number (e.g. 42), got {value!r} ({type(value).__name__})")
    return value


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


def _check_models(models: Any, origin: str) -> dict[str, str]:
    if models is None:
        return {}
    if not isinstance(models, dict):
        raise ConfigError(f"{origin}: 'models' must be a mapping of role -> model id or folder, got {models!r}")
    for role, model in models.items():
        if isinstance(model, (bool, dict, list)) or model is None or not str(model).strip():
            raise ConfigError(f"{origin}: models.{role} must be a model id or folder, got {model!r}")
    return {str(k): str(v) for k, v in models.items()}


def _validate(data: dict[str, Any], origin: str) -> PipelineSpec:
    stages_node = data.get("stages")
    if not isinstance(stages_node, dict) or not stages_node:
        raise ConfigError(f"{origin}: 'stages' must be a non-empty mapping of stage name -> settings")
    stages_node = _execution_order(stages_node, origin)
    models = _check_models(data.get("models"), origin)
    if not isinstance(data.get("run") or {}, dict):
        raise ConfigError(f"{origin}: 'run' must be a mapping of run settings, got {data.get('run')!r}")
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
        optional = tuple(getattr(stage_class, "OPTIONAL_INPUTS", ()) or ())
        missing_inputs = sorted(set(stage_class.INPUTS) - set(optional) - set(inputs))
        if missing_inputs:
            raise ConfigError(f"{origin}: stage {name!r} ({node['type']}) needs inputs {missing_inputs}")
        unread = sorted(set(inputs) - set(stage_class.INPUTS) - set(optional))
        if unread:  # a misspelt input would otherwise be found only when the stage runs
            raise ConfigError(
                f"{origin}: stage {name!r} ({node['type']}) reads no input {unread}; its inputs: "
                f"{sorted({*stage_class.INPUTS, *optional})}"
            )
        config_fields = {f.name for f in dataclasses.fields(stage_class.Config)} - set(roles)
        unknown = sorted(set(params) - config_fields)
        if unknown:
            raise ConfigError(
                f"{origin}: stage {name!r} has unknown parameters {unknown}; "
                f"valid: {sorted(_stage_param_names(name, stages_node))}"
            )
        for param in params:
            try:
                _refuse_restated(name, param, stages_node)
            except ConfigError as error:
                raise ConfigError(f"{origin}: {error}") from error
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
        seed=_check_seed(data.get("seed", 42), origin),
        task=check_task(data.get("task", AUTO_TASK), origin, allow_auto=True),
        models=models,
        stages=tuple(stages),
        answer=answer,
        models_preset=data.get("models_preset"),
        run=dict(data.get("run") or {}),
    )
    check_stages_together(spec, origin)
    return spec


def check_stages_together(spec: PipelineSpec, origin: str = "") -> dict[str, Any]:
    """Bind every stage's config (types, derived settings) and run the cross-stage checks; nothing is
    loaded. Returns the configs by stage name. Called by :func:`load_spec`, so every loaded spec passed."""
    prefix = f"{origin}: " if origin else ""
    configs: dict[str, Any] = {}
    classes: dict[str, type] = {}
    for stage in spec.stages:  # bind parameters now so type errors surface before any model loads
        classes[stage.name] = resolve_stage_type(stage.type)
        try:
            configs[stage.name] = build_stage_config(spec, stage)
        except ConfigError as error:
            raise ConfigError(f"{prefix}{error}") from error
    for stage in spec.stages:
        stage_class = classes[stage.name]
        upstream = {
            input_name: UpstreamStage(source, classes[source], configs[source], dict(spec.stage(source).inputs))
            for input_name, source in stage.inputs.items()
        }
        problem = _input_fields_problem(stage_class, upstream)
        if problem:
            raise ConfigError(f"{prefix}stage {stage.name!r}: {problem}")
        check = getattr(stage_class, "check_pipeline", None)
        if callable(check):
            try:
                check(configs[stage.name], upstream)
            except ConfigError as error:
                raise ConfigError(f"{prefix}stage {stage.name!r}: {error}") from error
    return configs


def _input_fields_problem(stage_class: type, upstream: dict[str, UpstreamStage]) -> str | None:
    """Why an input cannot give ``stage`` the fields its class declares it reads (``INPUT_FIELDS``), or None."""
    declared = getattr(stage_class, "INPUT_FIELDS", None) or {}
    if not isinstance(declared, dict) or not all(
        isinstance(v, tuple) and all(isinstance(f, str) for f in v) for v in declared.values()
    ):
        return f"{stage_class.__name__}.INPUT_FIELDS must map input names to tuples of field names"
    for input_name, wanted in declared.items():
        if input_name not in upstream:
            continue  # a missing input is reported by the loader with the inputs the stage needs
        source = upstream[input_name]
        output = source.stage_class.Output
        have = {f.name for f in dataclasses.fields(output)}
        missing = [f for f in wanted if f not in have]
        if missing:
            return (
                f"input {input_name!r} reads stage {source.name!r}, whose output {output.__name__} has no "
                f"field {', '.join(repr(f) for f in missing)} ({stage_class.__name__} reads "
                f"{', '.join(wanted)}; {output.__name__} has {', '.join(sorted(have))}); point {input_name!r} at "
                f"a stage that produces them"
            )
    return None


def resolve_task(task: str, dataset_name: str | None) -> str:
    """``auto`` -> ``okvqa`` when the dataset is OK-VQA (by name), else ``vqav2``."""
    if task != AUTO_TASK:
        return task
    name = (dataset_name or "").lower().replace("-", "").replace("_", "")
    return "okvqa" if "okvqa" in name else "vqav2"


def build_stage_config(spec: PipelineSpec, stage: StageSpec) -> Any:
    """The stage's frozen config dataclass: model roles resolved to ids, the pipeline seed applied to
    stages that have a seed field (unless the stage sets its own), the pipeline's task to stages that have
    a task field, and the settings the stage takes from the stage reading its output (``CONSUMER_FIELDS``)."""
    stage_class = resolve_stage_type(stage.type)
    params = dict(stage.params)
    for field_name, role in stage.model_roles.items():
        params[field_name] = spec.models[role]
    field_types = {f.name: f for f in dataclasses.fields(stage_class.Config)}
    if "seed" in field_types and "seed" not in params:
        params["seed"] = spec.seed
    if "task" in field_types:
        params["task"] = resolve_task(spec.task, None)
    params.update(_settings_from_readers(spec, stage, stage_class))
    params.update(_referenced_stage_configs(spec, stage, stage_class, params))
    for f in dataclasses.fields(stage_class.Config):  # types first: __post_init__ checks assume them
        if f.name in params:
            _check_type(stage.name, f, params[f.name])
    try:
        config = stage_class.Config(**params)
    except (TypeError, ValueError, ConfigError) as error:  # a config's own checks name the stage's key
        raise ConfigError(f"stage {stage.name!r}: {error}") from error
    return config


def _referenced_stage_configs(
    spec: PipelineSpec, stage: StageSpec, stage_class: type, params: dict[str, Any]
) -> dict[str, Any]:
    """Config fields marked ``metadata={"stage_config": True}`` name another stage whose settings they reuse
    (PICa's pool captioner is the pipeline's ``caption`` stage): each such name becomes that stage's built
    config, so the settings are stated once, in that stage. One level only: the named stage may not
    itself name a stage (so references cannot form a cycle)."""
    resolved: dict[str, Any] = {}
    for f in dataclasses.fields(stage_class.Config):
        target = params.get(f.name)
        if not f.metadata.get("stage_config") or not isinstance(target, str):
            continue
        names = [s.name for s in spec.stages]
        if target not in names or target == stage.name:
            raise ConfigError(
                f"stage {stage.name!r}: {f.name} names stage {target!r}, which must be another stage of the "
                f"pipeline (stages: {names})"
            )
        referenced = spec.stage(target)
        if any(isinstance(referenced.params.get(g.name), str) and g.metadata.get("stage_config")
               for g in dataclasses.fields(resolve_stage_type(referenced.type).Config)):
            raise ConfigError(f"stage {stage.name!r}: {f.name} names stage {target!r}, which itself names a stage")
        resolved[f.name] = build_stage_config(spec, referenced)
    return resolved


def _settings_from_readers(spec: PipelineSpec, stage: StageSpec, stage_class: type) -> dict[str, Any]:
    """The values of the stage's ``CONSUMER_FIELDS``, read from the built config of each stage reading its
    output (see :func:`_reader_sources` for which count). Several readers must agree; a field also bound
    to a model role (a config saved before the field was derived) must name the same model."""
    links = dict(getattr(stage_class, "CONSUMER_FIELDS", None) or {})
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for reader in spec.stages:
        if not _states_consumer_fields(links, stage.name, reader.inputs.values(), resolve_stage_type(reader.type)):
            continue
        reader_config = build_stage_config(spec, reader)
        for own, theirs in links.items():
            value, source = getattr(reader_config, theirs), f"{reader.name}.{theirs}"
            if own in values and values[own] != value:
                raise ConfigError(
                    f"stage {stage.name!r}: its {own!r} is set by every stage reading it, and they disagree: "
                    f"{sources[own]} = {values[own]!r}, {source} = {value!r}"
                )
            values[own], sources[own] = value, source
    for own, value in values.items():
        if own in stage.params:
            raise ConfigError(f"stage {stage.name!r} cannot set {own!r}: it is {sources[own]}; set that instead")
        role = stage.model_roles.get(own)
        if role is not None and spec.models[role] != value:
            raise ConfigError(
                f"stage {stage.name!r}: its {own!r} is models.{role} = {spec.models[role]!r}, but it must be "
                f"{sources[own]} = {value!r}, the model of the stage reading it; bind both to the same "
                f"role, or remove the model binding of {stage.name!r} (it follows {sources[own]})"
            )
    return values


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
