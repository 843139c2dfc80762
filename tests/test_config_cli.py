"""`capvqa config show|validate`: the resolved config as YAML, and checks, without loading any model or data."""

import subprocess
import sys

import pytest
import yaml

from capvqa.engine.config import load_spec


def capvqa_main(monkeypatch, capsys, *args):
    """Run the console entry point in this process: (exit status, stdout, stderr)."""
    from capvqa.cli import main

    monkeypatch.setattr(sys, "argv", ["capvqa", *args])
    with pytest.raises(SystemExit) as done:
        main()
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


@pytest.fixture
def nothing_loads(monkeypatch):
    """Every way a model, tokenizer, processor, checkpoint or dataset could be loaded raises."""
    import torch
    import transformers

    import capvqa.data.datasets

    def refuse(*args, **kwargs):
        raise AssertionError("capvqa config must not load models or data")

    for owner in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoProcessor,
                  transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase, transformers.ProcessorMixin,
                  transformers.PretrainedConfig):
        monkeypatch.setattr(owner, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(capvqa.data.datasets, "open_dataset", refuse)


def test_show_prints_the_resolved_config_loadable_again(monkeypatch, capsys, tmp_path, nothing_loads):
    status, out, err = capvqa_main(monkeypatch, capsys, "config", "show", "pica-full",
                                   "--set", "examples.n_shot=8", "--set", "seed=3")
    assert status == 0, err
    shown = yaml.safe_load(out)
    expected = load_spec("pica-full", ["examples.n_shot=8", "seed=3"]).to_dict()
    assert shown == expected
    assert "extends" not in shown and shown["seed"] == 3 and shown["stages"]["examples"]["n_shot"] == 8
    order = list(shown["stages"])
    assert order.index("tags") < order.index("prompt")  # an inherited stage reads a stage added later
    path = tmp_path / "shown.yaml"
    path.write_text(out)
    assert load_spec(path).to_dict() == expected


def test_show_applies_the_models_preset(monkeypatch, capsys, tiny_zoo, nothing_loads):
    status, out, err = capvqa_main(monkeypatch, capsys, "config", "show", "pnp-vqa", "--models", "tiny")
    assert status == 0, err
    shown = yaml.safe_load(out)
    assert shown["models_preset"] == "tiny" and shown["models"]["reader"] == str(tiny_zoo["reader"])


def test_validate_says_ok_with_a_summary(monkeypatch, capsys, nothing_loads):
    status, out, err = capvqa_main(monkeypatch, capsys, "config", "validate", "img2llm",
                                   "--set", "llm.max_new_tokens=30")
    assert status == 0, err
    assert out.startswith("ok: img2llm") and len(out.strip().splitlines()) == 1
    assert "prompt -> llm" in out and "answer from llm" in out


def test_validate_rejects_a_cross_stage_mismatch_before_any_model(monkeypatch, capsys, tmp_path, nothing_loads):
    data = load_spec("img2llm-whole-image-filter").to_dict()
    data["stages"]["prompt"]["inputs"]["captions"] = "captioning"  # the answers index caption_filter's list
    path = tmp_path / "mismatch.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    status, out, err = capvqa_main(monkeypatch, capsys, "config", "validate", str(path))
    assert status == 2
    assert "mismatch.yaml" in err and "stage 'prompt'" in err and "caption_filter" in err
    assert "Traceback" not in err and not out


def test_validate_names_a_restated_setting(monkeypatch, capsys, nothing_loads):
    status, _, err = capvqa_main(monkeypatch, capsys, "config", "validate", "img2llm",
                                 "--set", "prompt.reserve_tokens=20")
    assert status == 2 and "llm.max_new_tokens" in err


def test_validate_and_show_take_a_run_folder(monkeypatch, capsys, tmp_path, nothing_loads):
    spec = load_spec("pnp-vqa", ["captioning.num_captions=3"]).to_dict()
    spec["run"] = {"dataset": "sample", "limit": 2}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    status, out, err = capvqa_main(monkeypatch, capsys, "config", "validate", str(tmp_path))
    assert status == 0 and out.startswith("ok: pnp-vqa"), err
    status, out, err = capvqa_main(monkeypatch, capsys, "config", "show", str(tmp_path))
    assert status == 0 and yaml.safe_load(out) == spec, err


def test_validate_errors_exit_2_without_a_traceback():
    done = subprocess.run([sys.executable, "-m", "capvqa", "config", "validate", "pnp-vqa", "--set", "seed=abc"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "seed=abc" in done.stderr and "whole number" in done.stderr and "Traceback" not in done.stderr


def test_the_guard_refuses_loading(nothing_loads, tiny_zoo, cpu_runtime):
    """The tests above would prove nothing if the guard let a load through."""
    from capvqa.stages.img2llm_prompt import Img2LLMPrompt

    with pytest.raises(AssertionError, match="must not load"):
        Img2LLMPrompt(llm=str(tiny_zoo["causal_lm"])).setup(cpu_runtime)
