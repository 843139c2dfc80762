"""Fused (SDPA) attention in BLIP's ViT computes what transformers' eager BlipAttention computes."""

import copy

import torch

from capvqa.models.blip_vision_attention import use_fused_vision_attention


def small_blip_vision():
    from transformers import BlipVisionConfig, BlipVisionModel

    torch.manual_seed(0)
    config = BlipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                              image_size=48, patch_size=16)
    return BlipVisionModel(config).eval()


def test_fused_vision_attention_equals_eager():
    eager = small_blip_vision()
    fused = copy.deepcopy(eager)
    assert use_fused_vision_attention(fused) == 3
    assert use_fused_vision_attention(fused) == 0  # already switched: idempotent
    pixels = torch.randn(2, 3, 48, 48)
    with torch.inference_mode():
        expected = eager(pixel_values=pixels).last_hidden_state
        got = fused(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_training_falls_back_to_eager_attention():
    model = small_blip_vision()
    use_fused_vision_attention(model)
    model.train()
    layer = model.encoder.layers[0].self_attn
    _, probabilities = layer(torch.randn(1, 10, 64))
    assert probabilities is not None and probabilities.shape == (1, 4, 10, 10)


def test_stages_load_blip_with_fused_vision_attention(tiny_zoo, cpu_runtime):
    from capvqa.models.blip_itm import load_blip_itm
    from capvqa.stages.patch_captioning import PatchCaptioning

    itm = load_blip_itm(str(tiny_zoo["itm"]), None, cpu_runtime)
    captioner = PatchCaptioning(model=str(tiny_zoo["captioner"]))
    captioner.setup(cpu_runtime)
    for model in (itm.model, captioner._captioner.model):
        names = {type(m).__name__ for m in model.vision_model.modules()}
        assert "FusedBlipAttention" in names and "BlipAttention" not in names
