"""Few-shot answering with an interleaved vision-language model: Flamingo's in-context recipe on IDEFICS
(docs/methods.md#few-shot-idefics).

Flamingo showed a frozen LM with visual cross-attention answering VQA from a handful of in-context
(image, question, answer) examples placed before the query; OpenFlamingo's evaluation picks them by CLIP
similarity (RICES) and IDEFICS is the open re-implementation of that recipe. Here the examples are the
ones PICa's selection stage (:mod:`capvqa.stages.example_selection`, wired as the ``examples`` input)
chose for the query: the top ``n_shot`` of its ranking, read from its record, so shots are set once
(``examples.n_shot``). Each example brings its own image, from the same pool the selection read; the
prompt interleaves them as OpenFlamingo's ``evaluate_vqa`` does -- examples first, the most similar one
last, then the query -- each as a user turn (image + question in the family's short-answer format) and an
assistant turn (its first answer), rendered by the model's chat template
(:func:`capvqa.text.vlm_prompts.render_few_shot_prompt`). Decoding is greedy and stops at the end of the
assistant turn (``<end_of_utterance>``) or the model's end of sequence; the answer is the first line of the
decoded text (:func:`capvqa.text.vlm_prompts.clean_answer`).

Where the examples' images come from: the selection record names each example by its pool question id
(and carries its question, answer and caption, not its image), so this stage opens the same pool and looks
the ids up; the pool's location is stated on this stage too (``pool_dataset``, ``pool_split``,
``pool_data_root``, ``pool_limit``, resolved from the run's dataset exactly as the selection resolves
them), and :meth:`VLMFewShotAnswerer.check_pipeline` refuses a config whose two pools differ, when it
loads. Images are decoded through :func:`capvqa.data.images.load_image`, like every image capvqa reads.

Model I/O: the model is loaded by :func:`capvqa.models.vlm.load_vision_language_model`; generation over
several images per prompt is :func:`generate_interleaved` here (the shared ``VisionLanguageModel.generate``
takes one image per prompt). A batch's prompts are decoded together with left padding.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from capvqa.data.images import distinct_images, load_image
from capvqa.data.items import ImageRef
from capvqa.data.official import normalize_id
from capvqa.engine.runtime import Runtime
from capvqa.engine.stage import DatasetContext, StageInput, non_semantic
from capvqa.errors import ConfigError, DataError
from capvqa.models.vlm import VisionLanguageModel, VlmCompletion, load_vision_language_model
from capvqa.text.vlm_prompts import FAMILY_MODEL_TYPES, clean_answer, few_shot_format, render_few_shot_prompt

log = logging.getLogger(__name__)

#: the pool settings this stage shares with the example selection (each must equal the selection's)
POOL_FIELDS = ("pool_dataset", "pool_split", "pool_data_root", "pool_limit")
#: the token that ends an assistant turn in Idefics2/3's chat template
END_OF_UTTERANCE = "<end_of_utterance>"


@dataclass(frozen=True)
class VLMFewShotConfig:
    """``prompt_format`` names the family's format (one of
    :data:`capvqa.text.vlm_prompts.FEW_SHOT_FORMATS`); ``max_new_tokens`` bounds the greedy answer.
    ``image_splitting`` lets Idefics2/3's processor split each image into tiles plus a global view; off,
    each image is its global view alone (one 364 px view, 169 tokens, in Idefics3), so nine images fit a
    prompt (split, a COCO image takes about 13 views). The ``pool_*`` fields say where the examples' images are: the example selection's pool, resolved the same
    way (``auto``: see :meth:`capvqa.stages.example_selection.ExampleSelection.resolve_params`); a
    pipeline config must state the same pool on both stages. ``device_map`` spreads a large model over
    devices and cannot change an answer."""

    model: str = "HuggingFaceM4/Idefics3-8B-Llama3"
    revision: str | None = None
    prompt_format: str = "idefics"
    max_new_tokens: int = 5
    image_splitting: bool = False
    pool_dataset: str = "auto"
    pool_split: str | None = None
    pool_data_root: str | None = non_semantic(None)
    pool_limit: int | None = None
    device_map: str | None = non_semantic(None)
    trust_remote_code: bool = non_semantic(False)
    batch_size: int = non_semantic(4)

    def __post_init__(self) -> None:
        few_shot_format(self.prompt_format)  # raises on a format that cannot hold examples
        if self.max_new_tokens < 1:
            raise ConfigError(f"vlm_fewshot_answer: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ConfigError(f"vlm_fewshot_answer: batch_size must be >= 1, got {self.batch_size}")
        if not isinstance(self.pool_dataset, str) or not self.pool_dataset.strip():
            raise ConfigError(f"pool_dataset must name a dataset (or be 'auto'), got {self.pool_dataset!r}")


@dataclass(frozen=True)
class VLMFewShotAnswer:
    """The answer, the decoded text it was cut from, the exact prompt text (chat template applied, one
    ``<image>`` per image), the number of generated tokens, and the pool question ids of the in-context
    examples in prompt order (the most similar last)."""

    answer: str
    raw: str
    prompt: str
    num_tokens: int
    example_ids: list


# ------------------------------------------------------------------------------------ model I/O


def stop_token_ids(vlm: VisionLanguageModel) -> list[int]:
    """The model's end-of-sequence ids and, when its tokenizer has it, ``<end_of_utterance>`` (the end of
    an assistant turn in Idefics2/3's chat template, which their generation configs do not list)."""
    eos = vlm.model.generation_config.eos_token_id
    if eos is None:
        eos = vlm.tokenizer.eos_token_id
    ids = [int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]) if i is not None]
    tokenizer = vlm.tokenizer
    end = tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE)
    if end is not None and end != tokenizer.unk_token_id and end not in ids:
        ids.append(int(end))
    return ids


def generate_interleaved(
    vlm: VisionLanguageModel, image_lists: Sequence[Sequence[Any]], prompts: Sequence[str], *,
    max_new_tokens: int, stop_ids: Sequence[int], image_splitting: bool = False,
) -> list[VlmCompletion]:
    """Greedy completions of prompts that each hold several images (``image_lists[i]`` in the order of
    prompt i's ``<image>`` tokens), decoded in one left-padded batch; generation ends at any ``stop_ids``.
    ``image_splitting`` is the Idefics2/3 processor's ``do_image_splitting``."""
    if len(image_lists) != len(prompts):
        raise ValueError(f"{len(image_lists)} image lists for {len(prompts)} prompts")
    if not prompts:
        return []
    encoded = vlm.processor(images=[list(images) for images in image_lists], text=list(prompts), padding=True,
                            do_image_splitting=image_splitting, return_tensors="pt")
    inputs = {}
    for key, value in encoded.items():
        if isinstance(value, torch.Tensor):
            value = value.to(vlm.device)
            if value.is_floating_point():
                value = value.to(vlm.model.dtype)  # pixel values in the model's precision
        inputs[key] = value
    tokenizer = vlm.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    with torch.inference_mode():
        output = vlm.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                    pad_token_id=pad_id, eos_token_id=list(stop_ids))
    new_ids = output[:, inputs["input_ids"].shape[1]:]  # a decoder-only LM returns the prompt first
    special = {pad_id, *stop_ids}
    texts = tokenizer.batch_decode(new_ids, skip_special_tokens=True)
    counts = [sum(1 for token in row.tolist() if token not in special) for row in new_ids]
    return [VlmCompletion(text=text, num_tokens=count) for text, count in zip(texts, counts)]


# ------------------------------------------------------------------------------------------ stage


class VLMFewShotAnswerer:
    NAME: ClassVar[str] = "vlm_fewshot_answer"
    VERSION: ClassVar[str] = "1"
    INPUTS: ClassVar[tuple[str, ...]] = ("examples",)
    INPUT_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {"examples": ("examples", "n_shot", "n_ensemble")}
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("model",)
    Config = VLMFewShotConfig
    Output = VLMFewShotAnswer

    def __init__(
        self, config: VLMFewShotConfig | None = None, *, vlm: VisionLanguageModel | None = None, **overrides: Any
    ) -> None:
        """``vlm`` injects a loaded model (tests); setup then loads no model (it still opens the pool)."""
        self.config = config or VLMFewShotConfig(**overrides)
        self.format = few_shot_format(self.config.prompt_format)
        self._vlm = vlm
        self._injected = vlm is not None
        self._pool_images: dict[Any, ImageRef] | None = None
        self._stop_ids: list[int] = []

    @classmethod
    def resolve_params(cls, params: Mapping[str, Any], dataset: DatasetContext) -> dict[str, Any]:
        """The pool resolved against the run's dataset by the selection's own rule, so ``auto`` means the
        same pool on both stages."""
        from capvqa.stages.example_selection import ExampleSelection

        pool = {name: params[name] for name in POOL_FIELDS if name in params}
        return {**params, **ExampleSelection.resolve_params(pool, dataset)}

    @classmethod
    def check_pipeline(cls, config: VLMFewShotConfig, upstream: dict[str, Any]) -> None:
        """The examples must come from one prompt's worth of a selection over this stage's pool: the record
        names examples by pool question id, which only that pool resolves to images."""
        source = upstream["examples"]
        theirs = source.config
        mine_pool = {name: getattr(config, name) for name in POOL_FIELDS}
        their_pool = {name: getattr(theirs, name, None) for name in POOL_FIELDS}
        differ = [name for name in POOL_FIELDS if mine_pool[name] != their_pool[name]]
        if differ:
            shown = ", ".join(f"{name}: {mine_pool[name]!r} here, {their_pool[name]!r} there" for name in differ)
            raise ConfigError(
                f"the in-context examples' images are read from this stage's pool, and stage {source.name!r} "
                f"selects the examples from its own; they differ ({shown}). Give both stages the same pool "
                f"settings (e.g. --set {source.name}.pool_dataset=okvqa and pool_dataset=okvqa on this stage)"
            )
        if getattr(theirs, "n_ensemble", 1) != 1:
            raise ConfigError(
                f"a few-shot prompt holds one set of examples, but stage {source.name!r} selects "
                f"{theirs.n_ensemble} (n_ensemble); set {source.name}.n_ensemble=1"
            )

    @property
    def vlm(self) -> VisionLanguageModel:
        if self._vlm is None:
            raise RuntimeError("VLMFewShotAnswerer.setup() must run before run()")
        return self._vlm

    def setup(self, runtime: Runtime) -> None:
        cfg = self.config
        if self._vlm is None:
            from capvqa.models.loading import ModelRef

            self._vlm = load_vision_language_model(
                ModelRef(cfg.model, cfg.revision), runtime, device_map=cfg.device_map,
                trust_remote_code=cfg.trust_remote_code,
            )
        vlm = self.vlm
        expected = FAMILY_MODEL_TYPES.get(self.format.name, ())
        if expected and vlm.model_type not in expected:
            log.warning("vlm few-shot: prompt format %r is for %s models, but %s is a %r model",
                        self.format.name, "/".join(expected), cfg.model, vlm.model_type)
        if not vlm.decoder_only:
            raise ConfigError(f"vlm few-shot: {cfg.model} has an encoder-decoder LM; interleaved few-shot "
                              "prompts need a decoder-only one (Idefics2/3)")
        self._stop_ids = stop_token_ids(vlm)
        self._pool_images = self._setup_pool_images()
        log.info("vlm few-shot: %s (%s), prompt %r, greedy <= %d new tokens; pool %s %s (%d questions)",
                 cfg.model, vlm.model_type, self.format.name, cfg.max_new_tokens, cfg.pool_dataset,
                 cfg.pool_split or "", len(self._pool_images))

    def _setup_pool_images(self) -> dict[Any, ImageRef]:
        """Pool question id -> image reference (nothing decoded yet), over the whole pool."""
        from capvqa.data.datasets import open_dataset
        from capvqa.stages.example_selection import AUTO_POOL, resolve_pool_split

        cfg = self.config
        if cfg.pool_dataset.strip() == AUTO_POOL:
            raise ConfigError(
                f"{self.NAME}: pool_dataset is 'auto', which is resolved from the run's dataset only when a "
                "pipeline runs on a dataset; set pool_dataset (as the example selection's)"
            )
        data_root = Path(cfg.pool_data_root).expanduser() if cfg.pool_data_root else None
        pool = open_dataset(cfg.pool_dataset, split=resolve_pool_split(cfg.pool_dataset, cfg.pool_split),
                            data_root=data_root, limit=cfg.pool_limit)
        return {normalize_id(item.question_id): item.image for item in pool}

    def _example_image(self, question_id: Any, decoded: dict[Any, Any]) -> Any:
        assert self._pool_images is not None
        ref = self._pool_images.get(normalize_id(question_id))
        if ref is None:
            raise DataError(
                f"in-context example {question_id!r} is not in the pool {self.config.pool_dataset} "
                f"{self.config.pool_split or ''}: the example selection and this stage read different pools"
            )
        key = str(ref.path) if ref.path is not None else normalize_id(question_id)
        if key not in decoded:
            decoded[key] = load_image(ref)
        return decoded[key]

    def cost(self, entry: StageInput) -> int:
        return len(entry.item.question)

    def run(self, batch: Sequence[StageInput]) -> list[VLMFewShotAnswer]:
        images, image_index = distinct_images(batch)
        decoded: dict[Any, Any] = {}
        prompts, image_lists, example_ids = [], [], []
        for entry, query_image in zip(batch, image_index):
            selected = entry.upstream["examples"]
            shots = list(reversed(selected.examples[: selected.n_shot]))  # most similar last, as RICES
            prompts.append(render_few_shot_prompt(
                self.format, [(e["question"], e["answer"]) for e in shots], entry.item.question,
                self.vlm.chat_template,
            ))
            image_lists.append([*(self._example_image(e["question_id"], decoded) for e in shots), images[query_image]])
            example_ids.append([e["question_id"] for e in shots])
        completions = generate_interleaved(self.vlm, image_lists, prompts, max_new_tokens=self.config.max_new_tokens,
                                           stop_ids=self._stop_ids, image_splitting=self.config.image_splitting)
        return [
            VLMFewShotAnswer(answer=clean_answer(c.text), raw=c.text, prompt=prompt, num_tokens=c.num_tokens,
                             example_ids=ids)
            for prompt, c, ids in zip(prompts, completions, example_ids)
        ]

    def cleanup(self) -> None:
        self._pool_images = None
        if not self._injected:
            self._vlm = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
