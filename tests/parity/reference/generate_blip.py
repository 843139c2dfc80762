"""Generate the BLIP parity fixtures (tests/parity/fixtures/blip/) by running LAVIS 1.0.2 itself.

Run in the reference venv (LAVIS 1.0.2, transformers 4.26), never in the project's::

    .reference-venv/bin/python tests/parity/reference/generate_blip.py [--out DIR]

What runs (docs/methods.md#matching-gradcam, #question-guided-captioning, #captions-and-the-itm-filter):

1. ``PNPVQA.forward_itm`` (block 7, ``compute_gradcam``) on the committed images through LAVIS's
   ``blip_image_eval`` processor (384) and raw questions through its ``blip_question`` processor;
   recorded: GradCAM relevance, the ITM match logit, the ``[ENC]`` text ids and mask the text encoder read.
   LAVIS tokenises the mask without ``max_length`` but the model's text with ``max_length=35``, so a
   question over 35 tokens crashes ``forward_itm``; its tokenizer call gets ``max_length=35`` here (the
   model-consistent truncation), which changes nothing for shorter questions.
2. ``PNPVQA.forward_cap`` (``BlipCaption``, prompt "a picture of "), seeded: recorded are the patch indices
   ``torch.multinomial`` drew, the sampled decoder ids, the gathered patch embeddings each row attended
   to, the captions as LAVIS strips them (``output[len(prompt):]``), and the decoder logits teacher-forced
   on those ids and embeddings.
3. ``BlipITM.itm_rank`` -- what LAVIS Img2Prompt's ``forward_cap`` calls as its in-loop caption filter --
   on those decoder ids (prompt included) against those patch embeddings, plus rows cut short by
   ``[SEP]`` and padding as decoding produces them.

Models are small (see ``SIZES``) but keep what LAVIS hard-codes: GradCAM's 12 heads and 24x24 grid
(image 384, patch 16) and block 7 of 12 text layers. Every parameter is
``reference_weights.parameter_values(name, shape)`` under LAVIS's own name; the fixture stores the
(name, shape) manifest, never weights. ``BertTokenizer.from_pretrained("bert-base-uncased")`` is
redirected to the committed WordPiece vocabulary ``vocab.txt`` (written once with
``capvqa.synthetic.offline_tokenizers.wordpiece_vocab()``; LAVIS adds ``[DEC]`` and ``[ENC]``).
This script must not import capvqa.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

PARITY_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PARITY_DIR))
import reference_weights as rw  # noqa: E402

DEFAULT_OUT = PARITY_DIR / "fixtures" / "blip"
FIXTURE_VERSION = 1

SIZES = {
    "image_size": 384,
    "patch_size": 16,
    "vision_width": 32,
    "vision_heads": 2,
    "itm_vision_depth": 2,
    "captioner_vision_depth": 3,  # differs from the ITM's: the in-loop filter must read the captioner's ViT
    "text_hidden": 48,
    "text_heads": 12,
    "text_layers": 12,  # as BLIP: block 7 needs layers above it, or only [ENC] gets gradient
    "text_intermediate": 96,
    "max_position_embeddings": 64,
    "embed_dim": 16,
}
BLOCK_NUM = 7
MAX_TXT_LEN = 35
PROMPT = "a picture of "
CAPTIONING = {"cap_max_length": 20, "cap_min_length": 10, "top_p": 1, "top_k": 50, "repetition_penalty": 1.0,
              "num_captions": 2, "num_patches": 20}
SEED = 1234

# (file, width, height): none is 384x384, so resizing is exercised
IMAGES = [("street.png", 96, 64), ("sky.png", 50, 80), ("table.png", 120, 90)]
QUESTIONS = [
    (0, "What color is the BUS?"),
    (1, "Is there a kite in the sky?!"),
    (2, "How many cups are on the table... (left side)?"),
    (0, "Where is the man; standing: near the car, or \"next\" to the red bus??"),
    (2, "What kind of plate is on the table, and what food is on it, "
        "and is the table in a kitchen or a room, and is there a cup or a bottle or a glass next to the "
        "plate, and what color is the chair?"),
    (1, "Is it SUNNY? Or cloudy ?  "),
]
CAPTION_PAIRS = [0, 4]  # indices into QUESTIONS captioned by forward_cap (one of them the long question)
TRUNCATE_AT = [(0, 12), (3, 15)]  # (decoder row, position of [SEP]): rows ended early and padded


def draw_images(out: Path) -> list[Path]:
    """Small deterministic drawings (gradients + shapes), a few KB as PNG."""
    paths = []
    for index, (name, width, height) in enumerate(IMAGES):
        y, x = np.mgrid[0:height, 0:width]
        pixels = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)),
                           ((x + y + 40 * index) % 256)], axis=-1).astype(np.uint8)
        image = Image.fromarray(pixels, "RGB")
        draw = ImageDraw.Draw(image)
        draw.rectangle([width // 5, height // 4, width // 2, height // 2], fill=(200, 30 + 60 * index, 40))
        draw.ellipse([width // 2, height // 2, width - 4, height - 3], fill=(20, 90, 220 - 50 * index))
        draw.line([0, height - 1, width - 1, 0], fill=(250, 250, 250), width=2)
        path = out / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="PNG", optimize=True)
        paths.append(path)
    return paths


@contextmanager
def local_bert_tokenizer(vocab_file: Path):
    """``BertTokenizer.from_pretrained("bert-base-uncased")`` reads the committed vocabulary instead."""
    from transformers import BertTokenizer

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.txt").write_bytes(vocab_file.read_bytes())
        (Path(folder) / "tokenizer_config.json").write_text(
            json.dumps({"do_lower_case": True, "model_max_length": 512}), encoding="utf-8")
        original = BertTokenizer.from_pretrained.__func__

        def redirected(cls, name, *args, **kwargs):
            return original(cls, folder if name == "bert-base-uncased" else name, *args, **kwargs)

        BertTokenizer.from_pretrained = classmethod(redirected)
        try:
            yield
        finally:
            BertTokenizer.from_pretrained = classmethod(original)


class TruncatingTokenizer:
    """LAVIS's tokenizer with ``max_length`` defaulting to the ITM's 35 (forward_itm's mask call only)."""

    def __init__(self, tokenizer, max_length: int) -> None:
        self._tokenizer, self._max_length = tokenizer, max_length

    def __call__(self, *args, **kwargs):
        kwargs.setdefault("max_length", self._max_length)
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def set_reference_weights(model: torch.nn.Module) -> dict:
    """Fill every parameter with ``parameter_values(name, shape)``; return the manifest of the state dict:
    parameters, state-dict aliases of tied parameters, and the (position_ids) buffers."""
    parameters = []
    by_pointer = {}
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(torch.from_numpy(rw.parameter_values(name, tuple(parameter.shape))))
            parameters.append([name, list(parameter.shape)])
            by_pointer[parameter.data_ptr()] = name
    names = {name for name, _ in parameters}
    aliases, buffers = {}, {}
    for key, tensor in model.state_dict().items():
        if key in names:
            continue
        if tensor.data_ptr() in by_pointer:
            aliases[key] = by_pointer[tensor.data_ptr()]
        else:
            assert key.endswith("position_ids"), key
            assert torch.equal(tensor, torch.arange(tensor.shape[-1]).expand(tensor.shape)), key
            buffers[key] = list(tensor.shape)
    return {"parameters": parameters, "aliases": aliases, "arange_buffers": buffers}


def text_config(vocab_size: int):
    from lavis.models.med import BertConfig

    return BertConfig(
        vocab_size=vocab_size, hidden_size=SIZES["text_hidden"], num_hidden_layers=SIZES["text_layers"],
        num_attention_heads=SIZES["text_heads"], intermediate_size=SIZES["text_intermediate"],
        max_position_embeddings=SIZES["max_position_embeddings"], hidden_act="gelu", layer_norm_eps=1e-12,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, pad_token_id=0,
        add_type_embeddings=False, encoder_width=SIZES["vision_width"], add_cross_attention=True,
    )


def vision_encoder(depth: int):
    from lavis.models.vit import VisionTransformerEncoder

    encoder = VisionTransformerEncoder(
        img_size=SIZES["image_size"], patch_size=SIZES["patch_size"], embed_dim=SIZES["vision_width"],
        depth=depth, num_heads=SIZES["vision_heads"], mlp_ratio=4.0, qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
    )
    encoder.vision_width = SIZES["vision_width"]
    return encoder


def build_models(vocab_size: int):
    from lavis.models.blip_models.blip_caption import BlipCaption
    from lavis.models.blip_models.blip_image_text_matching import BlipITM
    from lavis.models.med import XBertEncoder, XBertLMHeadDecoder

    itm = BlipITM(image_encoder=vision_encoder(SIZES["itm_vision_depth"]),
                  text_encoder=XBertEncoder(config=text_config(vocab_size), add_pooling_layer=False),
                  embed_dim=SIZES["embed_dim"], max_txt_len=MAX_TXT_LEN)
    captioner = BlipCaption(image_encoder=vision_encoder(SIZES["captioner_vision_depth"]),
                            text_decoder=XBertLMHeadDecoder(config=text_config(vocab_size)), prompt=PROMPT)
    manifests = {"itm": set_reference_weights(itm), "captioner": set_reference_weights(captioner)}
    return itm.eval(), captioner.eval(), manifests


@contextmanager
def recording(obj, attribute: str, calls: list):
    """Replace ``obj.attribute`` by a wrapper appending (args, kwargs, result) to ``calls``."""
    original = getattr(obj, attribute)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    setattr(obj, attribute, wrapper)
    try:
        yield
    finally:
        setattr(obj, attribute, original)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` with fixed zip timestamps, so a rerun writes identical bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(arrays):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue())


def run_matching(pnp, itm, images: torch.Tensor, text_input: list[str]) -> dict:
    """forward_itm on all pairs in one batch; the text encoder's inputs and the ITM logits recorded."""
    seen = {}

    def keep_inputs(_module, args, kwargs):
        seen["input_ids"] = (args[0] if args else kwargs["input_ids"]).clone()
        seen["attention_mask"] = kwargs["attention_mask"].clone()

    def keep_logits(_module, _args, output):
        seen["logits"] = output.detach().clone()

    hooks = [itm.text_encoder.register_forward_pre_hook(keep_inputs, with_kwargs=True),
             itm.itm_head.register_forward_hook(keep_logits)]
    tokenizer = itm.tokenizer
    itm.tokenizer = TruncatingTokenizer(tokenizer, MAX_TXT_LEN)
    try:
        samples = pnp.forward_itm({"image": images, "text_input": list(text_input)}, block_num=BLOCK_NUM)
    finally:
        itm.tokenizer = tokenizer
        for hook in hooks:
            hook.remove()
    return {"gradcams": samples["gradcams"].detach().float(), **seen}


def run_captioning(pnp, captioner, images: torch.Tensor, gradcams: torch.Tensor, text_input: list[str]) -> dict:
    """Seeded forward_cap; every multinomial draw and generate call recorded."""
    multinomial_calls, generate_calls = [], []
    torch.manual_seed(SEED)
    with recording(torch, "multinomial", multinomial_calls), \
            recording(captioner.text_decoder, "generate", generate_calls):
        samples = pnp.forward_cap({"image": images, "text_input": list(text_input), "gradcams": gradcams},
                                  **CAPTIONING)
    num_captions = CAPTIONING["num_captions"]
    rows_patches, rows_image, ids, memory = [], [], [], []
    for round_index, (_args, kwargs, output) in enumerate(generate_calls):
        draws = multinomial_calls[round_index * num_captions:(round_index + 1) * num_captions]
        for b in range(images.shape[0]):  # rows are (item, draw) in forward_cap's flatten order
            for i in range(num_captions):
                rows_patches.append(sorted(int(p) for p in draws[i][2][b]))
                rows_image.append(b)
        ids.append(output)
        memory.append(kwargs["encoder_hidden_states"])
    return {"samples": samples, "patches": rows_patches, "item": rows_image, "ids": torch.cat(ids),
            "memory": torch.cat(memory).detach(), "rounds": len(generate_calls)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    from lavis.models.pnp_vqa_models.pnp_vqa import PNPVQA
    from lavis.processors.blip_processors import BlipImageEvalProcessor, BlipQuestionProcessor

    image_paths = draw_images(out)
    vocab_file = DEFAULT_OUT / "vocab.txt"
    vocab_size = len(vocab_file.read_text(encoding="utf-8").splitlines()) + 2  # + [DEC], [ENC]
    with local_bert_tokenizer(vocab_file):
        itm, captioner, manifests = build_models(vocab_size)
    assert len(itm.tokenizer) == len(captioner.tokenizer) == vocab_size
    assert itm.text_encoder.embeddings.word_embeddings.weight.shape[0] == vocab_size
    pnp = PNPVQA(image_question_matching_model=itm, image_captioning_model=captioner,
                 question_answering_model=None).eval()

    image_processor = BlipImageEvalProcessor(image_size=SIZES["image_size"])
    question_processor = BlipQuestionProcessor(max_words=50)
    pil_images = [Image.open(path).convert("RGB") for path in image_paths]
    pixels = torch.stack([image_processor(image) for image in pil_images])
    pair_images = pixels[[image for image, _ in QUESTIONS]]
    text_input = [question_processor(question) for _, question in QUESTIONS]

    matching = run_matching(pnp, itm, pair_images, text_input)
    caption_images = pair_images[CAPTION_PAIRS]
    captioning = run_captioning(pnp, captioner, caption_images, matching["gradcams"][CAPTION_PAIRS],
                                [text_input[p] for p in CAPTION_PAIRS])

    tokenizer = captioner.tokenizer
    ids, memory = captioning["ids"], captioning["memory"]
    with torch.no_grad():
        logits = captioner.text_decoder(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        encoder_hidden_states=memory,
                                        encoder_attention_mask=torch.ones(memory.shape[:2], dtype=torch.long),
                                        return_dict=True).logits
    # rows ended early as decoding leaves them: [SEP] then padding to the batch length
    filter_ids, filter_rows = [ids], list(range(ids.shape[0]))
    for row, position in TRUNCATE_AT:
        cut = ids[row].clone()
        cut[position] = tokenizer.sep_token_id
        cut[position + 1:] = tokenizer.pad_token_id
        filter_ids.append(cut[None])
        filter_rows.append(row)
    filter_ids = torch.cat(filter_ids)
    filter_memory = memory[filter_rows]
    # grad mode on, as forward_cap calls it: forward_itm left block 7 saving attention, whose gradient hook
    # cannot be registered under no_grad
    probabilities = itm.itm_rank(filter_memory, torch.ones(filter_memory.shape[:2], dtype=torch.long),
                                 encoder_input_ids=filter_ids).detach()
    decoded = [text[len(PROMPT):] for text in tokenizer.batch_decode(filter_ids, skip_special_tokens=True)]

    prompt = tokenizer([PROMPT], return_tensors="pt").input_ids
    prompt[:, 0] = tokenizer.bos_token_id
    fixture = {
        "fixture_version": FIXTURE_VERSION,
        "weights_version": rw.WEIGHTS_VERSION,
        "reference": "salesforce-lavis 1.0.2 (transformers 4.26.1)",
        "sizes": SIZES,
        "tokenizer": {"vocab_file": "vocab.txt", "vocab_size": vocab_size,
                      "pad": tokenizer.pad_token_id, "cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id,
                      "dec": tokenizer.bos_token_id, "enc": tokenizer.enc_token_id},
        "manifests": manifests,
        "images": [path.name for path in image_paths],
        "matching": {
            "block_num": BLOCK_NUM, "max_text_tokens": MAX_TXT_LEN,
            "pairs": [{"image": image, "question": question, "processed": processed,
                       "untruncated_tokens": len(itm.tokenizer(processed.strip("?")).input_ids)}
                      for (image, question), processed in zip(QUESTIONS, text_input)],
            "input_ids": matching["input_ids"].tolist(),
            "attention_mask": matching["attention_mask"].tolist(),
            "match_logits": matching["logits"][:, 1].tolist(),
        },
        "captioning": {
            "prompt": PROMPT, "prompt_ids": prompt[0, :-1].tolist(), "settings": CAPTIONING, "seed": SEED,
            "pairs": CAPTION_PAIRS, "rounds": captioning["rounds"],
            "rows": [{"pair": CAPTION_PAIRS[item], "patches": patches}
                     for item, patches in zip(captioning["item"], captioning["patches"])],
            "output_ids": ids.tolist(),
            "forward_cap_captions": captioning["samples"]["captions"],
        },
        "filter": {
            "rows": filter_rows, "output_ids": filter_ids.tolist(), "captions": decoded,
            "probabilities": probabilities.tolist(),
        },
    }
    (out / "blip_reference.json").write_text(json.dumps(fixture, indent=1) + "\n", encoding="utf-8")
    write_npz(out / "blip_reference.npz", {
        "gradcams": matching["gradcams"].numpy().astype(np.float32),
        "pixel_samples": pixels[:, :, ::16, ::16].numpy().astype(np.float32),
        "caption_memory": memory.numpy().astype(np.float32),
        "caption_logits": logits.numpy().astype(np.float32),
    })
    print(f"wrote {out}: {len(QUESTIONS)} matching pairs, {ids.shape[0]} caption rows "
          f"({captioning['rounds']} rounds), {filter_ids.shape[0]} filter rows; probabilities "
          f"{[round(p, 4) for p in probabilities.tolist()]}")


if __name__ == "__main__":
    main()
