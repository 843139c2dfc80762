"""Original BLIP .pth checkpoints -> Hugging Face folders (ITM and captioner), on the tiny zoo models.

The fake "original" checkpoints are written with the inverse of the converter's key mapping, spelled out
here independently from the original code's module names (salesforce/BLIP models/vit.py: ``cls_token``,
``pos_embed``, ``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
``norm``; med.py BERT names unchanged).
"""

import json
import re

import pytest
import torch

from capvqa.errors import ModelLoadError
from capvqa.models import blip_checkpoint as bc
from capvqa.models.checkpoints import capvqa_home, checkpoint_download_path
from capvqa.models.loading import ModelRef

WORDS = "text_decoder.bert.embeddings.word_embeddings.weight"
DECODER = "text_decoder.cls.predictions.decoder"
_HF_TO_ORIGINAL = [
    (r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.", r"visual_encoder.blocks.\1.norm1."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.", r"visual_encoder.blocks.\1.norm2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"visual_encoder.blocks.\1.attn.qkv."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.",
     r"visual_encoder.blocks.\1.attn.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
    (r"^vision_model\.post_layernorm\.", "visual_encoder.norm."),
]


def original_key(name: str) -> str:
    for pattern, replacement in _HF_TO_ORIGINAL:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    assert not name.startswith("vision_model."), name
    return name  # text_encoder.*, text_decoder.bert.*, text_decoder.cls.*, vision_proj, text_proj, itm_head


def hf_class(kind):
    return bc.model_class(kind)


def randomized_reference(folder, kind, seed=3):
    """The tiny zoo model with every weight redrawn (LayerNorms included), ties kept as in BLIP."""
    model = hf_class(kind).from_pretrained(folder).eval()
    generator = torch.Generator().manual_seed(seed)
    state = {
        name: torch.randn(t.shape, generator=generator, dtype=t.dtype) * 0.1
        for name, t in model.state_dict().items()
    }
    if kind == "captioner":  # tied in BLIP and in transformers: the same tensor under both names
        state[f"{DECODER}.weight"] = state[WORDS]
        state[f"{DECODER}.bias"] = state["text_decoder.cls.predictions.bias"]
    model.load_state_dict(state)
    return model


def original_state(model, kind):
    """``model``'s weights under the original BLIP names, plus the original-only entries."""
    state = {original_key(name): t.clone() for name, t in model.state_dict().items()}
    if kind == "captioner":  # keep the tie's shared storage, as torch.save of the original model does
        state[f"{DECODER}.weight"] = state[WORDS]
        state[f"{DECODER}.bias"] = state["text_decoder.cls.predictions.bias"]
    text = "text_encoder" if kind == "itm" else "text_decoder.bert"
    positions = model.config.text_config.max_position_embeddings
    state[f"{text}.embeddings.position_ids"] = torch.arange(positions).expand(1, -1)
    state["visual_encoder_m.cls_token"] = torch.randn(1, 1, model.config.vision_config.hidden_size)
    state["visual_encoder_m.blocks.0.attn.qkv.weight"] = state["visual_encoder.blocks.0.attn.qkv.weight"] + 1
    state["text_encoder_m.embeddings.word_embeddings.weight"] = torch.randn(4, 4)
    state["vision_proj_m.weight"] = torch.randn(4, 4)
    state["image_queue"] = torch.randn(16, 8)
    state["text_queue"] = torch.randn(16, 8)
    state["idx_queue"] = torch.full((1, 8), -100)
    state["ptr_queue"] = torch.zeros(1, dtype=torch.long)
    state["temp"] = torch.tensor(0.07)
    return state


@pytest.fixture(scope="module")
def originals(tiny_zoo, tmp_path_factory):
    """{kind: (reference HF model, original-format state, checkpoint path)}"""
    folder = tmp_path_factory.mktemp("blip-originals")
    result = {}
    for kind in ("itm", "captioner"):
        model = randomized_reference(tiny_zoo[kind], kind)
        state = original_state(model, kind)
        path = folder / f"model_{kind}.pth"
        torch.save({"model": state}, path)
        result[kind] = (model, state, path)
    return result


def tiny_heads(tiny_zoo, kind):
    return hf_class(kind).config_class.from_pretrained(tiny_zoo[kind]).text_config.num_attention_heads


def itm_inputs(tiny_zoo, model):
    from transformers import BlipProcessor

    processor = BlipProcessor.from_pretrained(tiny_zoo["itm"])
    texts = ["a dog sitting on the beach", "two cats"]
    tokens = processor.tokenizer(texts, padding="longest", return_tensors="pt")
    tokens["input_ids"][:, 0] = processor.tokenizer.convert_tokens_to_ids("[ENC]")
    size = model.config.vision_config.image_size
    pixel_values = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    return tokens["input_ids"], tokens["attention_mask"], pixel_values


@pytest.mark.parametrize("kind", ["itm", "captioner"])
def test_original_checkpoint_converts_to_identical_model(kind, tiny_zoo, originals, tmp_path, torch_load_calls):
    reference, _, path = originals[kind]
    loads = torch_load_calls
    heads = tiny_heads(tiny_zoo, kind)
    folder = bc.convert_blip_checkpoint(path, kind, tiny_zoo[kind], tmp_path / "converted",
                                        text_attention_heads=heads)
    assert loads and all(kwargs.get("weights_only") is True for kwargs in loads)

    model, info = hf_class(kind).from_pretrained(folder, output_loading_info=True)
    model.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.config.text_config.num_attention_heads == heads
    assert model.config.vision_config.layer_norm_eps == bc.ORIGINAL_VISION_LAYER_NORM_EPS
    loaded = model.state_dict()
    expected = reference.state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name

    marker = json.loads((folder / bc.MARKER).read_text())
    assert marker["kind"] == kind
    assert set(marker["dropped"]) == {"momentum copy", "queue", "temperature", "position_ids buffer"}
    assert "image_queue" in marker["dropped"]["queue"] and marker["dropped"]["temperature"] == ["temp"]
    from transformers import BlipProcessor

    assert len(BlipProcessor.from_pretrained(folder).tokenizer) == model.config.text_config.vocab_size

    input_ids, attention_mask, pixel_values = itm_inputs(tiny_zoo, model)
    with torch.inference_mode():
        if kind == "itm":
            ours = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                         use_itm_head=True).itm_score
            theirs = reference(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                               use_itm_head=True).itm_score
        else:
            assert marker["tied"] == [f"{DECODER}.bias", f"{DECODER}.weight"]
            decoder = model.text_decoder
            embeddings = decoder.bert.embeddings.word_embeddings.weight
            assert decoder.cls.predictions.decoder.weight.data_ptr() == embeddings.data_ptr()
            inputs = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
            ours, theirs = model(**inputs).logits, reference(**inputs).logits
    assert torch.equal(ours, theirs)


def test_ensure_converts_once_and_accepts_plain_state_dicts(tiny_zoo, originals, tmp_path, cpu_runtime):
    reference, state, _ = originals["itm"]
    # a bare state dict (no "model" key) saved from DistributedDataParallel
    path = tmp_path / "model_large_retrieval_coco.pth"
    torch.save({"module." + name: t for name, t in state.items()}, path)
    heads = tiny_heads(tiny_zoo, "itm")
    base = ModelRef(str(tiny_zoo["itm"]))
    folder = bc.ensure_blip_model(str(path), "itm", base, text_attention_heads=heads)
    assert folder.parent == capvqa_home() / "models" / "converted"
    assert folder.name.startswith("model_large_retrieval_coco-itm-")
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert bc.ensure_blip_model(path, "itm", tiny_zoo["itm"], text_attention_heads=heads) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    other = bc.ensure_blip_model(path, "itm", tiny_zoo["itm"], text_attention_heads=heads,
                                 vision_layer_norm_eps=1e-5)
    assert other != folder  # config overrides are part of the cache identity
    assert json.loads((other / "config.json").read_text())["vision_config"]["layer_norm_eps"] == 1e-5

    from capvqa.models.blip_itm import load_blip_itm

    itm = load_blip_itm(str(folder), None, cpu_runtime)  # the stages' loading path
    assert itm.enc_token_id == itm.processor.tokenizer.convert_tokens_to_ids("[ENC]")
    loaded = itm.model.state_dict()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(loaded[name], tensor), name


def test_cached_url_is_used_offline_and_a_missing_one_is_refused(tiny_zoo, originals):
    url = "https://storage.example.invalid/BLIP/models/model_large_caption.pth"
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE=1"):
        bc.ensure_blip_model(url, "captioner", tiny_zoo["captioner"])
    with pytest.raises(ModelLoadError, match="not downloaded yet"):
        bc.resolve_blip_checkpoint(bc.BLIP_ITM_LARGE_COCO_URL)
    cached = checkpoint_download_path(url)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(originals["captioner"][2].read_bytes())
    assert bc.resolve_blip_checkpoint(url) == cached
    folder = bc.ensure_blip_model(url, "captioner", tiny_zoo["captioner"],
                                  text_attention_heads=tiny_heads(tiny_zoo, "captioner"))
    assert json.loads((folder / bc.MARKER).read_text())["checkpoint"] == str(cached)


class NotATensor:
    pass


def test_pickled_objects_are_refused(originals, tmp_path):
    _, state, _ = originals["itm"]
    torch.save({"model": state, "extra": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(ModelLoadError, match="tensors only"):
        bc.load_original_state_dict(tmp_path / "evil.pth")
    torch.save({"model": {"w": torch.ones(1)}, "epoch": 3}, tmp_path / "ok.pth")
    assert list(bc.load_original_state_dict(tmp_path / "ok.pth")) == ["w"]
    torch.save({"weights": [torch.ones(1)]}, tmp_path / "nostate.pth")
    with pytest.raises(ModelLoadError, match="no BLIP state dict"):
        bc.load_original_state_dict(tmp_path / "nostate.pth")


def test_wrong_checkpoints_are_rejected_with_the_keys(tiny_zoo, originals, tmp_path):
    heads = {"text_attention_heads": tiny_heads(tiny_zoo, "itm")}
    # a captioner checkpoint is not an ITM one: its text encoder is missing
    missing = r"missing \[itm_head\.bias, itm_head\.weight, text_encoder\."
    with pytest.raises(ModelLoadError, match=missing) as error:
        bc.convert_blip_checkpoint(originals["captioner"][2], "itm", tiny_zoo["itm"], tmp_path / "a", **heads)
    assert "text_decoder.*" in str(error.value) and "BLIP 'itm' checkpoint of this size" in str(error.value)

    _, state, _ = originals["itm"]
    broken = dict(state)
    broken["visual_encoder.pos_embed"] = torch.zeros(1, 5, 3)  # another image size / width
    broken["visual_encoder.head.weight"] = torch.zeros(2, 2)  # not part of BLIP's ViT
    broken["text_encoder.pooler.dense.weight"] = torch.zeros(2, 2)
    del broken["itm_head.bias"]
    torch.save({"model": broken}, tmp_path / "broken.pth")
    with pytest.raises(ModelLoadError, match="does not fit") as error:
        bc.convert_blip_checkpoint(tmp_path / "broken.pth", "itm", tiny_zoo["itm"], tmp_path / "b", **heads)
    message = str(error.value)
    assert "missing [itm_head.bias]" in message
    assert "visual_encoder.head.weight" in message and "text_encoder.pooler.dense.weight" in message
    assert "visual_encoder.pos_embed (1, 5, 3) != vision_model.embeddings.position_embedding" in message
    assert not (tmp_path / "b").exists()

    # the captioner's output projection must equal the (tied) word embeddings
    _, state, _ = originals["captioner"]
    untied = dict(state)
    untied[f"{DECODER}.weight"] = untied[f"{DECODER}.weight"] + 1
    torch.save({"model": untied}, tmp_path / "untied.pth")
    with pytest.raises(ModelLoadError, match="ties it to"):
        bc.convert_blip_checkpoint(tmp_path / "untied.pth", "captioner", tiny_zoo["captioner"],
                                   tmp_path / "c", text_attention_heads=tiny_heads(tiny_zoo, "captioner"))

    with pytest.raises(ModelLoadError, match="unknown BLIP checkpoint kind"):
        bc.ensure_blip_model(str(originals["itm"][2]), "vqa", tiny_zoo["itm"])


def test_default_heads_are_blips_twelve(tiny_zoo, originals, tmp_path):
    """The default (12 heads, the original's) cannot fit a 32-wide text encoder: a clear error."""
    with pytest.raises(ModelLoadError, match="text_attention_heads=12 does not divide"):
        bc.convert_blip_checkpoint(originals["itm"][2], "itm", tiny_zoo["itm"], tmp_path / "x")


def test_spec_facts_on_full_size_blip_large_shapes():
    """ViT-L/16 at 384 px + BERT-base text, all on the meta device: the defaults give the original's
    12 heads, LayerNorm eps 1e-6 and a 30524-token vocabulary, and every shape fits."""
    from transformers import BlipConfig

    hub_like = BlipConfig(
        text_config={"encoder_hidden_size": 1024, "num_attention_heads": 8},  # the hub's wrong 8
        vision_config={"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                       "intermediate_size": 4096, "image_size": 384, "patch_size": 16},
        image_text_hidden_size=256,
    )
    for kind in ("itm", "captioner"):
        with torch.device("meta"):
            original = hf_class(kind)(hub_like)
        state = {original_key(name): t for name, t in original.state_dict().items()}
        state["visual_encoder_m.pos_embed"] = state["visual_encoder.pos_embed"]
        config = bc.converted_config(hub_like, state, kind)
        assert config.text_config.num_attention_heads == 12
        assert config.vision_config.layer_norm_eps == 1e-6
        assert config.text_config.vocab_size == bc.ORIGINAL_VOCAB_SIZE
        assert hub_like.text_config.num_attention_heads == 8  # the base config is not modified
        if kind == "captioner":  # ties are compared by value: not on meta tensors
            state.pop(f"{DECODER}.weight")
            state.pop(f"{DECODER}.bias")
        conversion = bc.conversion_tensors(state, kind, config)
        assert conversion.dropped == {"momentum copy": ["visual_encoder_m.pos_embed"]}
        assert conversion.tensors["vision_model.embeddings.position_embedding"].shape == (1, 577, 1024)
        assert conversion.tensors["vision_model.encoder.layers.23.self_attn.qkv.weight"].shape == (3072, 1024)


def test_key_mapping_examples():
    assert bc.hf_key("visual_encoder.blocks.11.attn.qkv.weight", "itm") == (
        "vision_model.encoder.layers.11.self_attn.qkv.weight")
    assert bc.hf_key("visual_encoder.blocks.0.attn.proj.bias", "itm") == (
        "vision_model.encoder.layers.0.self_attn.projection.bias")
    assert bc.hf_key("visual_encoder.norm.weight", "captioner") == "vision_model.post_layernorm.weight"
    assert bc.hf_key("visual_encoder.patch_embed.proj.weight", "itm") == (
        "vision_model.embeddings.patch_embedding.weight")
    assert bc.hf_key("text_encoder.encoder.layer.7.crossattention.self.key.weight", "itm") == (
        "text_encoder.encoder.layer.7.crossattention.self.key.weight")
    assert bc.hf_key("text_decoder.cls.predictions.transform.dense.weight", "captioner") == (
        "text_decoder.cls.predictions.transform.dense.weight")
    for key in ("text_encoder_m.encoder.layer.0.output.dense.weight", "ptr_queue", "temp",
                "text_encoder.embeddings.position_ids"):
        assert bc.hf_key(key, "itm") is None
    assert bc.drop_reason("text_decoder.bert.embeddings.word_embeddings.weight", "itm") == "other head"
    assert bc.drop_reason("itm_head.weight", "captioner") == "other head"
    assert bc.drop_reason("itm_head.weight", "itm") is None
