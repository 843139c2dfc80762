"""Pipeline configs: loading, extends, overrides, validation without loading models."""

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
