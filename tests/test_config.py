"""Pipeline configs: loading, extends, overrides, validation without loading models."""

import re

import pytest

from capvqa.engine.config import available_pipelines, load_spec
from capvqa.errors import ConfigError


def test_every_shipped_pipeline_validates():
    names = available_pipelines()
    assert {"pnp-vqa", "pnp-vqa-base", "pnp-vqa-large", "pnp-vqa-3b"} <= set(names)
    for name in names:
        spec = load_spec(name)
        assert spec.stages and spec.answer in {s.name for s in spec.stages}


def test_sizes_name_the_reader_and_share_blip_large():
    for size in ("base", "large", "3b"):
        spec = load_spec(f"pnp-vqa-{size}")
        assert spec.models["itm"] == "Salesforce/blip-itm-large-coco"
        assert spec.models["captioner"] == "Salesforce/blip-image-captioning-large"
        assert spec.models["reader"] == f"allenai/unifiedqa-v2-t5-{size}-1363200"
    assert load_spec("pnp-vqa").models == load_spec("pnp-vqa-base").models


def test_spec_defaults_follow_the_paper():
    spec = load_spec("pnp-vqa")
    captioning = spec.stage("captioning").params
    assert captioning["num_captions"] == 100 and captioning["num_patches"] == 20 and captioning["top_k"] == 50
    assert spec.stage("matching").params["block_num"] == 7
    assert spec.seed == 42


def test_overrides_apply_and_parse_yaml_scalars():
    spec = load_spec("pnp-vqa", ["captioning.num_captions=5", "seed=7", "models.reader=/some/folder",
                                 "captioning.top_p=0.9"])
    assert spec.stage("captioning").params["num_captions"] == 5
    assert spec.stage("captioning").params["top_p"] == 0.9
    assert spec.seed == 7 and spec.models["reader"] == "/some/folder"


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as error:
        load_spec("pnp-vqa", ["captioning.num_capshuns=5"])
    assert "captioning.num_capshuns" in str(error.value) and "captioning.num_captions" in str(error.value)
    with pytest.raises(ConfigError, match="valid keys"):
        load_spec("pnp-vqa", ["nosuchstage.x=1"])
    with pytest.raises(ConfigError, match="models.reader"):
        load_spec("pnp-vqa", ["models.nosuchrole=x"])


def test_wrong_value_type_is_rejected_before_loading_models():
    with pytest.raises(ConfigError, match="num_captions"):
        load_spec("pnp-vqa", ["captioning.num_captions=many"])


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nstages:\n  a: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml.*line"):
        load_spec(path)


def test_unknown_pipeline_lists_available():
    with pytest.raises(ConfigError, match="pnp-vqa-base"):
        load_spec("no-such-pipeline")


def test_inputs_must_name_earlier_stages(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: bad\nmodels: {reader: x}\nstages:\n"
        "  reader: {type: capvqa.stages.fid_reader.FiDReader, model: reader, inputs: {captions: later}}\n"
    )
    with pytest.raises(ConfigError, match="earlier stage"):
        load_spec(path)


def test_resolved_config_round_trips(tmp_path):
    import yaml

    spec = load_spec("pnp-vqa-large", ["captioning.num_captions=3"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    again = load_spec(path)
    assert again.to_dict() == spec.to_dict()


def test_explicit_model_override_wins_over_the_preset(tiny_zoo):
    spec = load_spec("pnp-vqa", ["models.reader=/my/reader"], models_preset="tiny")
    assert spec.models["reader"] == "/my/reader"
    assert spec.models["itm"] == str(tiny_zoo["itm"])


def test_saved_tiny_config_re_resolves_the_zoo(tmp_path, tiny_zoo):
    import yaml

    spec = load_spec("pnp-vqa", models_preset="tiny").to_dict()
    spec["models"] = {role: f"/moved/{role}" for role in spec["models"]}  # the zoo lived elsewhere then
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert load_spec(path).models["itm"] == str(tiny_zoo["itm"])


# --------------------------------------------------------------------------------------------------
# Each setting stated once


def test_img2llm_prompt_budget_is_the_llm_stage_settings():
    from capvqa.engine.config import build_stage_config

    spec = load_spec("img2llm", ["llm.max_new_tokens=30", "llm.context_length=1024", "llm.revision=abc123",
                                 "models.llm=/my/llm"])
    prompt = build_stage_config(spec, spec.stage("prompt"))
    assert (prompt.llm, prompt.revision, prompt.context_length, prompt.reserve_tokens) == (
        "/my/llm", "abc123", 1024, 30)
    with pytest.raises(ConfigError, match=r"llm\.max_new_tokens"):
        load_spec("img2llm", ["prompt.reserve_tokens=5"])
    with pytest.raises(ConfigError, match=r"llm\.context_length"):
        load_spec("img2llm", ["prompt.context_length=5"])
    with pytest.raises(ConfigError, match="valid keys") as error:
        load_spec("img2llm", ["prompt.nope=1"])
    assert "prompt.reserve_tokens" not in str(error.value) and "prompt.variant" in str(error.value)


def test_a_config_file_cannot_restate_the_llm_budget_on_the_prompt(tmp_path):
    import yaml

    data = load_spec("img2llm").to_dict()
    data["stages"]["prompt"]["reserve_tokens"] = 10
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError, match=r"config.yaml.*reserve_tokens.*llm\.max_new_tokens"):
        load_spec(path)


def test_pnp_and_img2llm_stage_configs_keep_their_cache_key_fields():
    """The semantic config is what the cache key hashes: the budget taken from the LLM stage is the same
    values as before (the variant and exemplar slots changed on purpose, to the authors' prompt)."""
    from capvqa.engine.config import build_stage_config
    from capvqa.engine.stage import semantic_config

    spec = load_spec("img2llm")
    assert semantic_config(build_stage_config(spec, spec.stage("prompt"))) == {
        "llm": "facebook/opt-6.7b", "revision": None, "variant": "authors", "num_context_captions": 30,
        "num_exemplar_slots": 30, "max_answer_words": 5, "task": "vqav2", "context_length": None,
        "reserve_tokens": 10,
    }


def test_a_saved_config_binding_the_prompt_to_a_model_role_still_loads_and_must_agree(tmp_path):
    """Run folders written before the prompt took its tokenizer from the LLM stage bind it to a role."""
    import yaml

    from capvqa.engine.config import build_stage_config

    data = load_spec("img2llm").to_dict()
    data["stages"]["prompt"]["models"] = {"llm": "llm"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    spec = load_spec(path)
    assert build_stage_config(spec, spec.stage("prompt")).llm == "facebook/opt-6.7b"

    data["models"]["tokenizer"] = "facebook/opt-125m"
    data["stages"]["prompt"]["models"] = {"llm": "tokenizer"}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError, match=r"models\.tokenizer.*llm\.model"):
        load_spec(path)


def test_task_is_one_list_and_the_pipeline_s_alone():
    from capvqa.engine.config import PIPELINE_TASKS, TASKS, build_stage_config
    from capvqa.stages.img2llm_prompt import YES_NO_TASKS, Img2LLMPromptConfig
    from capvqa.stages.llm_answer import LLMAnswerConfig

    assert PIPELINE_TASKS == ("auto", *TASKS) and set(YES_NO_TASKS) <= set(TASKS)
    for make in (lambda: load_spec("img2llm", ["task=aokvqa"]), lambda: LLMAnswerConfig(task="aokvqa"),
                 lambda: Img2LLMPromptConfig(task="aokvqa")):
        with pytest.raises(ConfigError, match="task") as error:
            make()
        assert all(repr(task) in str(error.value) for task in TASKS) and "'aokvqa'" in str(error.value)
    with pytest.raises(ConfigError, match=r"set once for every stage.*--set task="):
        load_spec("img2llm", ["llm.task=okvqa"])
    spec = load_spec("img2llm", ["task=okvqa"])
    assert {build_stage_config(spec, spec.stage(name)).task for name in ("prompt", "llm")} == {"okvqa"}


# --------------------------------------------------------------------------------------------------
# Checked together when the config loads


def write_config(tmp_path, data, name="config.yaml"):
    import yaml

    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_an_input_lacking_the_fields_a_stage_reads_is_rejected_at_load(tmp_path):
    data = load_spec("pica").to_dict()
    data["stages"]["llm"]["inputs"] = {"prompt": "caption"}  # a caption record has no prompts
    with pytest.raises(ConfigError, match=r"stage 'llm'.*'caption'.*prompts"):
        load_spec(write_config(tmp_path, data))


def test_img2llm_prompt_must_read_the_captions_its_answers_point_into(tmp_path):
    data = load_spec("img2llm-whole-image-filter").to_dict()  # it has a `captioning` stage to miswire
    data["stages"]["prompt"]["inputs"]["captions"] = "captioning"  # answers index caption_filter's list
    with pytest.raises(ConfigError, match=r"stage 'prompt'.*caption_filter"):
        load_spec(write_config(tmp_path, data))


# --------------------------------------------------------------------------------------------------
# Loader reliability


@pytest.mark.parametrize("value", ["abc", "1.9", "true", "[1]"])
def test_seed_override_must_be_a_whole_number(value):
    with pytest.raises(ConfigError, match=rf"seed={re.escape(value)}.*seed must be a whole number"):
        load_spec("pnp-vqa", [f"seed={value}"])
    assert load_spec("pnp-vqa", ["seed=7"]).seed == 7


def test_seed_in_a_config_file_must_be_a_whole_number(tmp_path):
    data = load_spec("pnp-vqa").to_dict()
    data["seed"] = 1.9
    with pytest.raises(ConfigError, match=r"config.yaml: seed must be a whole number.*1\.9"):
        load_spec(write_config(tmp_path, data))


def test_malformed_yaml_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nstages:\n  a: {type: b\n  c: d\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: malformed YAML at line \d+, column \d+"):
        load_spec(path)


def test_a_run_folder_means_its_config_yaml(tmp_path, monkeypatch):
    from capvqa.engine.config import locate_config

    spec = load_spec("pnp-vqa", ["captioning.num_captions=3"])
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    write_config(run, spec.to_dict())
    assert locate_config(run) == run / "config.yaml"
    assert load_spec(str(run)).to_dict() == spec.to_dict()

    empty = tmp_path / "runs" / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"empty is a folder without config\.yaml"):
        load_spec(empty)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pnp-vqa").mkdir()  # a folder sharing a pipeline's name does not hide the pipeline
    assert load_spec("pnp-vqa").name == "pnp-vqa"


def test_models_must_be_a_mapping_of_ids(tmp_path):
    data = load_spec("pnp-vqa").to_dict()
    data["models"]["reader"] = None
    with pytest.raises(ConfigError, match=r"models\.reader must be a model id"):
        load_spec(write_config(tmp_path, data))


def test_resolved_img2llm_config_round_trips(tmp_path):
    spec = load_spec("img2llm", ["llm.max_new_tokens=30", "task=okvqa"])
    again = load_spec(write_config(tmp_path, spec.to_dict()))
    assert again.to_dict() == spec.to_dict()
