"""The stage contract (capvqa/engine/stage.py) holds for every stage a shipped pipeline names, and a
config's ``type:`` can name only capvqa's own stages or stages registered on purpose."""

import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest
import yaml

from capvqa.engine.config import load_raw_config, load_spec
from capvqa.engine.registry import (
    answer_field_problem,
    check_stage_class,
    register_stage,
    resolve_stage_type,
    stage_contract_problems,
    unregister_stage,
)
from capvqa.engine.stage import Stage, non_semantic
from capvqa.errors import ConfigError
from capvqa.resources import pipelines_dir

PIPELINES = sorted(p.stem for p in pipelines_dir().glob("*.yaml"))


def _stage_types():
    return sorted({(node["type"]) for name in PIPELINES
                   for node in (load_raw_config(name).get("stages") or {}).values()})


@pytest.mark.parametrize("type_name", _stage_types())
def test_every_shipped_stage_satisfies_the_contract(type_name):
    stage_class = resolve_stage_type(type_name)
    assert stage_contract_problems(stage_class) == []
    assert set(stage_class.MODEL_FIELDS) <= {f.name for f in dataclasses.fields(stage_class.Config)}
    instance = stage_class(stage_class.Config()) if _defaults_build(stage_class) else None
    if instance is not None:
        assert isinstance(instance, Stage)  # the runtime-checkable Protocol: setup/run/cleanup + attributes


def _defaults_build(stage_class) -> bool:
    try:
        stage_class.Config()
    except Exception:  # noqa: BLE001 - some configs need a dataset-resolved value (e.g. a pool)
        return False
    return True


@pytest.mark.parametrize("name", PIPELINES)
def test_every_pipeline_answer_stage_outputs_a_string_answer(name):
    spec = load_spec(name)
    answer_class = resolve_stage_type(spec.stage(spec.answer).type)
    assert answer_field_problem(answer_class) is None


def test_old_module_paths_of_renamed_stages_still_resolve():
    from capvqa.stages.gradcam_matching import GradCamMatching
    from capvqa.stages.patch_captioning import PatchCaptioning

    assert resolve_stage_type("capvqa.stages.matching.GradCamMatching") is GradCamMatching
    assert resolve_stage_type("capvqa.stages.captioning.PatchCaptioning") is PatchCaptioning
    assert resolve_stage_type("GradCamMatching") is GradCamMatching


@pytest.mark.parametrize("type_name", ["this.s", "os.system", "subprocess.Popen", "capvqa.engine.runner.PipelineRunner",
                                       "capvqa.stages.gradcam_matching.torch", "evil_module_here.Stage", ""])
def test_unregistered_types_are_refused_without_importing(type_name):
    before = set(sys.modules)
    with pytest.raises(ConfigError) as raised:
        resolve_stage_type(type_name)
    assert "this" not in set(sys.modules) - before  # `import this` prints the Zen of Python
    assert "evil_module_here" not in sys.modules
    if type_name:
        assert "register" in str(raised.value)


@pytest.mark.slow
def test_a_yaml_naming_a_module_in_the_current_folder_runs_no_code(tmp_path):
    """python -m capvqa puts the current folder on sys.path; a config must not be a way to import from it."""
    (tmp_path / "evil.py").write_text("open('PWNED', 'w').write('x')\n")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({
        "name": "x", "models": {}, "stages": {"s": {"type": "evil.Stage"}}, "answer": "s"}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "capvqa", "run", "cfg.yaml", "--dataset", "sample"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "not registered" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "PWNED").exists()


@dataclass(frozen=True)
class _EchoConfig:
    suffix: str = "!"
    batch_size: int = non_semantic(4)


@dataclass(frozen=True)
class _Echo:
    answer: str


class EchoStage:
    """A user's own stage: answers with the question."""

    NAME: ClassVar[str] = "test_echo"
    VERSION: ClassVar[str] = "1"
    INPUTS: ClassVar[tuple[str, ...]] = ()
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ()
    Config = _EchoConfig
    Output = _Echo

    def __init__(self, config=None):
        self.config = config or _EchoConfig()

    def setup(self, runtime):
        pass

    def run(self, batch):
        return [_Echo(answer=entry.item.question + self.config.suffix) for entry in batch]

    def cleanup(self):
        pass


@pytest.fixture
def echo_registered():
    name = register_stage(EchoStage, "Echo")
    yield name
    unregister_stage(name)


def test_a_registered_user_stage_runs_in_a_pipeline(tmp_path, echo_registered):
    from capvqa import Pipeline, open_dataset

    config = tmp_path / "echo.yaml"
    config.write_text(yaml.safe_dump({"name": "echo", "models": {}, "stages": {"echo": {"type": "Echo", "suffix": "?!"}},
                                      "answer": "echo"}))
    result = Pipeline.from_yaml(config).run(open_dataset("sample", limit=2), cache_dir=tmp_path / "c")
    assert all(answer.endswith("?!") for answer in result.predictions.values())
    by_path = f"{EchoStage.__module__}.EchoStage"
    assert resolve_stage_type(by_path) is EchoStage


def test_entry_point_stages_resolve(monkeypatch):
    from importlib import metadata

    from capvqa.engine import registry

    entry = metadata.EntryPoint(name="Echo", value=f"{EchoStage.__module__}:EchoStage", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry.metadata, "entry_points", lambda group=None: [entry] if group == registry.ENTRY_POINT_GROUP else [])
    assert resolve_stage_type("Echo") is EchoStage
    assert resolve_stage_type(f"{EchoStage.__module__}.EchoStage") is EchoStage
    assert "Echo" in registry.available_stage_types()


def test_contract_problems_name_what_is_wrong():
    @dataclass  # not frozen, and no batch_size
    class LooseConfig:
        x: int = 1

    class Broken:
        NAME = ""
        VERSION = "1"
        INPUTS = ["a"]
        MODEL_FIELDS = ("model",)
        Config = LooseConfig
        Output = dict

        def setup(self, runtime):
            pass

    problems = " | ".join(stage_contract_problems(Broken))
    for expected in ("NAME", "INPUTS", "frozen", "batch_size", "'model'", "Output", "run()", "cleanup()"):
        assert expected in problems
    with pytest.raises(ConfigError, match="does not satisfy the stage contract"):
        check_stage_class(Broken, "Broken")
    with pytest.raises(ConfigError, match="stage contract"):
        register_stage(Broken)


def test_an_answer_stage_without_a_string_answer_is_refused(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({
        "name": "bad", "models": {"itm": "x"},
        "stages": {"matching": {"type": "GradCamMatching", "model": "itm"}}, "answer": "matching"}))
    with pytest.raises(ConfigError, match="cannot be the answer stage"):
        load_spec(config)
