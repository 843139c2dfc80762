"""GradCAM reduction on hand-made tensors, and the matching stage on the tiny BLIP ITM."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capvqa.data.items import ImageRef, VQAItem
from capvqa.engine.stage import StageInput
from capvqa.ops.gradcam import gradcam_patch_relevance


def reference_relevance(attention, gradient, mask):
    """Loop transcription of LAVIS compute_gradcam's 'average over tokens' row."""
    batch, heads, tokens, keys = attention.shape
    out = torch.zeros(batch, keys - 1)
    for b in range(batch):
        n = int(mask[b].sum()) - 2
        for t in range(1, n + 1):
            for p in range(1, keys):
                cell = 0.0
                for h in range(heads):
                    a = attention[b, h, t, p] * mask[b, t]
                    g = max(float(gradient[b, h, t, p]), 0.0) * mask[b, t]
                    cell += a * g
                out[b, p - 1] += cell / heads
        out[b] /= n
    return out


def test_reduction_matches_hand_computation():
    torch.manual_seed(0)
    attention = torch.rand(2, 3, 6, 5)
    gradient = torch.randn(2, 3, 6, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    got = gradcam_patch_relevance(attention, gradient, mask)
    assert got.shape == (2, 4)
    torch.testing.assert_close(got, reference_relevance(attention, gradient, mask))


def test_reduction_small_exact_case():
    # one head, tokens [ENC, w1, w2, SEP], keys [CLS, p1, p2]
    attention = torch.tensor([[[[9.0, 9.0, 9.0], [0.0, 0.5, 0.5], [0.0, 0.2, 0.8], [9.0, 9.0, 9.0]]]])
    gradient = torch.tensor([[[[9.0, 9.0, 9.0], [0.0, 2.0, -1.0], [0.0, 1.0, 1.0], [9.0, 9.0, 9.0]]]])
    mask = torch.ones(1, 4)
    got = gradcam_patch_relevance(attention, gradient, mask)
    # p1: (0.5*2 + 0.2*1)/2 = 0.6 ; p2: (0.5*0 [negative grad clamped] + 0.8*1)/2 = 0.4
    torch.testing.assert_close(got, torch.tensor([[0.6, 0.4]]))


def test_padding_tokens_and_cls_column_are_ignored():
    attention = torch.rand(1, 2, 5, 4)
    gradient = torch.rand(1, 2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    base = gradcam_patch_relevance(attention, gradient, mask)
    attention[:, :, 3:, :] = 100.0  # padded positions
    attention[:, :, :, 0] = 100.0  # image CLS key
    torch.testing.assert_close(gradcam_patch_relevance(attention, gradient, mask), base)


def test_shape_errors_are_explicit():
    with pytest.raises(ValueError):
        gradcam_patch_relevance(torch.rand(1, 2, 3, 4), torch.rand(1, 2, 3, 5), torch.ones(1, 3))


@pytest.fixture(scope="module")
def matcher(tiny_zoo, cpu_runtime):
    from capvqa.stages.gradcam_matching import GradCamMatching

    stage = GradCamMatching(model=str(tiny_zoo["itm"]))
    stage.setup(cpu_runtime)
    return stage


def _inputs(tmp_path: Path, questions):
    rng = np.random.default_rng(0)
    path = tmp_path / "image.png"
    Image.fromarray((rng.random((70, 90, 3)) * 255).astype("uint8")).save(path)
    return [
        StageInput(item=VQAItem(question_id=i, image_id=1, question=q, image=ImageRef(path=path)),
                   item_key=f"key{i}", image_hash="image")
        for i, q in enumerate(questions)
    ]


def test_relevance_changes_with_the_question(matcher, tmp_path):
    out = matcher.run(_inputs(tmp_path, ["What color is the dog?", "How many people are on the bus?"]))
    grid = matcher.grid
    assert all(o.relevance.shape == (grid[0] * grid[1],) for o in out)
    assert out[0].grid == grid
    assert not np.allclose(out[0].relevance, out[1].relevance)
    assert out[0].matching_text == "what color is the dog"


def test_grid_and_layer_come_from_the_model_config(matcher):
    vision = matcher._model.config.vision_config
    side = vision.image_size // vision.patch_size
    assert matcher.grid == [side, side]
    assert matcher.enc_token_id == matcher.processor.tokenizer.convert_tokens_to_ids("[ENC]")


def test_long_question_is_truncated_consistently(matcher, tmp_path):
    long_question = " ".join(["dog"] * 1000) + "?"
    out = matcher.run(_inputs(tmp_path, [long_question, "is it red?"]))
    assert np.isfinite(out[0].relevance).all()
    assert len(out[0].matching_text.split()) == 50


def test_batched_equals_single(matcher, tmp_path):
    inputs = _inputs(tmp_path, ["What is on the table?", "Is it sunny?", "Why?"])
    together = matcher.run(inputs)
    alone = [matcher.run([entry])[0] for entry in inputs]
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a.relevance, b.relevance, rtol=1e-4, atol=1e-12)


def test_gradient_only_at_attention_equals_full_backward(matcher, tmp_path):
    """Skipping the ViT backward gives the same relevance as LAVIS's full backward pass
    (docs/methods.md#matching-gradcam)."""
    from capvqa.data.images import distinct_images
    from capvqa.ops.gradcam import gradcam_patch_relevance as reduce
    from capvqa.text.pnp_vqa_formats import matching_text

    inputs = _inputs(tmp_path, ["what is the man holding?"])
    ours = matcher.run(inputs)[0].relevance
    model, processor = matcher._model, matcher.processor
    images, _ = distinct_images(inputs)
    pixel_values = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    tokens = processor.tokenizer([matching_text(inputs[0].item.question)], return_tensors="pt", truncation=True,
                                 max_length=35)
    ids = tokens["input_ids"].clone()
    ids[:, 0] = matcher.enc_token_id
    layer = model.text_encoder.encoder.layer[matcher.config.block_num].crossattention.self
    captured = {}

    def keep(_module, _args, output):
        captured["probs"] = output[1]  # returns None: the module output is left as is

    hook = layer.register_forward_hook(keep)
    model.requires_grad_(True)
    try:
        with torch.enable_grad():
            embeds = model.vision_model(pixel_values=pixel_values)[0]
            out = model.text_encoder(input_ids=ids, attention_mask=tokens["attention_mask"],
                                     encoder_hidden_states=embeds,
                                     encoder_attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long))
            captured["probs"].retain_grad()
            model.itm_head(out[0][:, 0, :])[:, 1].sum().backward()
    finally:
        hook.remove()
        model.requires_grad_(False)
        model.zero_grad(set_to_none=True)
    full = reduce(captured["probs"].detach(), captured["probs"].grad, tokens["attention_mask"])[0].numpy()
    np.testing.assert_allclose(ours, full, rtol=1e-4, atol=1e-12)
