"""Published VQA accuracies (tables in docs/methods.md) and the rule that decides whether one applies to a run.

A delta against a paper is only meaningful when the run is the paper's setting: the same method, the
same model size, the same dataset split. Everything is decided from the run's ``config.yaml``; when a
number does not apply the lookup says why (tiny random-weight models, a dataset no paper reports, a
model size the paper did not publish), and when it applies with a difference the paper did not have
(a question subset, a non-paper ITM model) the difference is listed as a caveat next to the delta.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# dataset keys and how the tables name them
DATASET_NAMES = {
    "vqav2-val": "VQAv2 val",
    "vqav2-test-dev": "VQAv2 test-dev",
    "okvqa-test": "OK-VQA test",
    "gqa-test-dev": "GQA test-dev",
    "aokvqa-val": "A-OKVQA val",
}


@dataclass(frozen=True)
class PublishedResult:
    method: str
    size: str
    dataset: str  # a DATASET_NAMES key
    accuracy: float
    source: str
    setting: str = ""


PNP_SOURCE = "Tiong et al., 2022 (PNP-VQA)"
IMG2LLM_SOURCE = "Guo et al., 2023 (Img2LLM)"
PICA_SOURCE = "Yang et al., 2022 (PICa)"
BLIP2_SOURCE = "Li et al., 2023 (BLIP-2), Table 2"
# seed systems without a transformers port, listed with the numbers BLIP-2's Table 2 compares against
FROZEN_SOURCE = "Tsimpoukelli et al., 2021 (Frozen), as listed in BLIP-2's Table 2"
FLAMINGO_SOURCE = "Alayrac et al., 2022 (Flamingo), as listed in BLIP-2's Table 2"


def _pnp(size: str, values: tuple[float, float, float, float]) -> list[PublishedResult]:
    keys = ("vqav2-val", "vqav2-test-dev", "okvqa-test", "gqa-test-dev")
    return [PublishedResult("pnp-vqa", size, k, v, PNP_SOURCE, f"BLIP ViT-L ITM + captioner, UnifiedQA-v2 {size}")
            for k, v in zip(keys, values)]


def _blip2(size: str, values: tuple[float, float, float, float]) -> list[PublishedResult]:
    keys = ("vqav2-val", "vqav2-test-dev", "okvqa-test", "gqa-test-dev")
    return [PublishedResult("blip2", size, k, v, BLIP2_SOURCE, f"ViT-g + {size}, zero-shot")
            for k, v in zip(keys, values)]


def _img2llm(size: str, values: dict[str, float]) -> list[PublishedResult]:
    return [PublishedResult("img2llm", size, k, v, IMG2LLM_SOURCE, f"OPT-{size}") for k, v in values.items()]


PUBLISHED: tuple[PublishedResult, ...] = (
    *_pnp("base", (54.3, 55.2, 23.0, 34.6)),
    *_pnp("large", (57.5, 58.8, 27.1, 38.4)),
    *_pnp("3B", (62.1, 63.5, 34.1, 42.3)),
    *_img2llm("13B", {"vqav2-val": 57.1, "vqav2-test-dev": 57.3, "okvqa-test": 39.9, "aokvqa-val": 33.3}),
    *_img2llm("66B", {"vqav2-val": 59.9, "vqav2-test-dev": 60.3, "okvqa-test": 43.2}),
    *_img2llm("175B", {"vqav2-val": 60.6, "vqav2-test-dev": 61.9, "okvqa-test": 45.6, "aokvqa-val": 42.9}),
    PublishedResult("pica", "base", "okvqa-test", 43.3, PICA_SOURCE, "GPT-3, caption + tags, random examples"),
    PublishedResult("pica", "full", "okvqa-test", 46.9, PICA_SOURCE, "GPT-3, caption, CLIP examples, 5-prompt ensemble"),
    PublishedResult("pica", "full+tags", "okvqa-test", 48.0, PICA_SOURCE,
                    "GPT-3, caption + tags, CLIP examples, 5-prompt ensemble"),
    *_blip2("OPT-2.7B", (53.5, 52.3, 31.7, 34.6)),
    *_blip2("OPT-6.7B", (54.3, 52.6, 36.4, 36.4)),
    *_blip2("FlanT5-XL", (63.1, 63.0, 40.7, 44.2)),
    *_blip2("FlanT5-XXL", (65.2, 65.0, 45.9, 44.7)),
    PublishedResult("frozen", "7B", "vqav2-val", 29.6, FROZEN_SOURCE, "zero-shot"),
    PublishedResult("frozen", "7B", "okvqa-test", 5.9, FROZEN_SOURCE, "zero-shot"),
    *(PublishedResult("flamingo", size, key, value, FLAMINGO_SOURCE, "zero-shot")
      for size, values in (("3B", (49.2, 41.2)), ("9B", (51.8, 44.7)), ("80B", (56.3, 50.6)))
      for key, value in zip(("vqav2-test-dev", "okvqa-test"), values)),
)

METHOD_NAMES = {"pnp-vqa": "PNP-VQA", "img2llm": "Img2LLM", "pica": "PICa", "blip2": "BLIP-2",
                "frozen": "Frozen", "flamingo": "Flamingo"}
# end-to-end methods capvqa runs, and the seed systems it cannot run whose numbers a report on those
# methods shows for comparison (docs/methods.md#end-to-end-vision-language-models)
END_TO_END_METHODS = ("blip2", "instructblip", "llava", "qwen-vl")
COMPARISON_ONLY_METHODS = ("frozen", "flamingo")
# methods that answer from text about the image (captions, tags, QA pairs) instead of the image itself
CAPTION_PIPELINE_METHODS = ("pnp-vqa", "img2llm", "pica")
END_TO_END = "end-to-end"
CAPTION_PIPELINE = "caption pipeline"
# BLIP-2 hub checkpoints (all ViT-g) -> the size names of the paper's Table 2
_BLIP2_SIZES = {"opt-2.7b": "OPT-2.7B", "opt-6.7b": "OPT-6.7B", "flan-t5-xl": "FlanT5-XL", "flan-t5-xxl": "FlanT5-XXL"}

PNP_PAPER_VISION_MODELS = {
    "itm": "Salesforce/blip-itm-large-coco",
    "captioner": "Salesforce/blip-image-captioning-large",
}


@dataclass(frozen=True)
class PublishedLookup:
    """What the paper reports for a run's setting, or why nothing applies.

    ``result`` is None when no number applies (``reason`` says why); ``caveats`` list differences from
    the paper's setting that make the delta approximate.
    """

    method: str | None
    size: str | None
    dataset: str | None
    result: PublishedResult | None
    reason: str = ""
    caveats: tuple[str, ...] = field(default_factory=tuple)

    @property
    def applies(self) -> bool:
        return self.result is not None

    def describe(self) -> str:
        """One line for tables: the setting matched, or the reason no number applies."""
        if self.result is None:
            return self.reason
        text = f"{METHOD_NAMES.get(self.result.method, self.result.method)} {self.result.size}, " \
               f"{DATASET_NAMES[self.result.dataset]} ({self.result.source})"
        if self.caveats:
            text += "; " + "; ".join(self.caveats)
        return text


def method_of(config: dict[str, Any]) -> str | None:
    """``method`` from the config, else guessed from the pipeline name (``pnp-vqa-large`` -> pnp-vqa)."""
    method = config.get("method")
    if isinstance(method, str) and method:
        return method.lower()
    name = str(config.get("name") or "").lower()
    for known in METHOD_NAMES:
        if name.startswith(known):
            return known
    return None


def method_family(config: dict[str, Any]) -> str | None:
    """:data:`END_TO_END` when the run's answer comes from a vision-language model reading the image (a
    known end-to-end method, or an answer stage from a ``capvqa.stages.vlm*`` module), else
    :data:`CAPTION_PIPELINE` for the caption methods; None when the config says neither."""
    method = method_of(config)
    stages = config.get("stages") if isinstance(config.get("stages"), dict) else {}
    answer_stage = stages.get(config.get("answer")) if isinstance(config.get("answer"), str) else None
    answer_type = str(answer_stage.get("type") or "") if isinstance(answer_stage, dict) else ""
    if method in END_TO_END_METHODS or answer_type.startswith("capvqa.stages.vlm"):
        return END_TO_END
    if method in CAPTION_PIPELINE_METHODS:
        return CAPTION_PIPELINE
    return None


def dataset_key(run: dict[str, Any]) -> str | None:
    """Map ``run.dataset`` + ``run.split`` to a published dataset key (None: no paper reports it).

    OK-VQA's val2014 split is the "test" set of the papers; lmms-lab hub datasets name their splits
    validation / testdev.
    """
    name = str(run.get("dataset") or "").lower()
    split = str(run.get("split") or "").lower().replace("_", "-")
    base = name.removeprefix("hf:").rstrip("/").rsplit("/", 1)[-1]
    if base in ("vqav2", "vqa-v2", "vqa2"):
        if split in ("", "val2014", "val", "validation"):
            return "vqav2-val"
        if split in ("test-dev2015", "testdev", "test-dev"):
            return "vqav2-test-dev"
        return None
    if base in ("a-okvqa", "aokvqa"):
        return "aokvqa-val" if split in ("", "val", "validation") else None
    if base in ("okvqa", "ok-vqa"):
        return "okvqa-test" if split in ("", "val2014", "val", "validation", "test") else None
    if "gqa" in base:
        return "gqa-test-dev" if split in ("testdev", "test-dev", "testdev-balanced", "test-dev-balanced") else None
    return None


def model_size(method: str, models: dict[str, Any], config: dict[str, Any]) -> tuple[str | None, str]:
    """The paper's size name of a run (from its model ids), or None and the reason."""
    if method == "pnp-vqa":
        reader = str(models.get("reader") or "")
        found = re.search(r"unifiedqa-v2-t5-(base|large|3b|11b)", reader.lower())
        if not found:
            return None, f"reader {reader or '?'} is not a published UnifiedQA-v2 size"
        return {"base": "base", "large": "large", "3b": "3B", "11b": "11B"}[found.group(1)], ""
    if method == "img2llm":
        llm = str(models.get("llm") or models.get("causal_lm") or "")
        found = re.search(r"opt-(\d+(?:\.\d+)?)b", llm.lower())
        if not found:
            return None, f"LLM {llm or '?'} is not one of the paper's OPT models"
        return f"{found.group(1)}B", ""
    if method == "pica":
        params = _all_stage_params(config)
        ensemble = _first_param(params, ("n_ensemble", "num_ensemble", "ensemble"))
        selection = str(_first_param(params, ("mode", "example_selection", "selection")) or "")
        uses_tags = _pica_uses_tags(config, params)
        if _as_int(ensemble) >= 5 and "random" not in selection:
            return ("full+tags" if uses_tags else "full"), ""
        if "random" in selection and uses_tags:
            return "base", ""
        return None, "PICa setting (examples, tags, ensemble) matches none of the published ones"
    if method == "blip2":
        model = str(next(iter(models.values()), "") if len(models) == 1 else "")
        found = re.search(r"blip2-(opt-\d+(?:\.\d+)?b|flan-t5-xxl|flan-t5-xl)$", model.lower().rstrip("/"))
        if not found or found.group(1) not in _BLIP2_SIZES:
            return None, f"model {model or '?'} is not one of the paper's BLIP-2 checkpoints"
        return _BLIP2_SIZES[found.group(1)], ""
    return None, f"no published numbers for method {method!r}"


def lookup_published(config: dict[str, Any], num_questions: int | None = None) -> PublishedLookup:
    """Decide whether a published number applies to the run described by ``config`` (config.yaml)."""
    method = method_of(config)
    run = config.get("run") or {}
    dataset = dataset_key(run)
    models = config.get("models") or {}
    if config.get("models_preset") == "tiny":
        return PublishedLookup(method, None, dataset, None,
                               "tiny random-weight models: published numbers do not apply")
    if method is None:
        return PublishedLookup(None, None, dataset, None, "unknown method: no published number")
    size, why = model_size(method, models, config)
    if dataset is None:
        return PublishedLookup(method, size, None, None,
                               f"no published number for dataset {run.get('dataset') or '?'}"
                               + (f" split {run['split']}" if run.get("split") else ""))
    if size is None:
        return PublishedLookup(method, None, dataset, None, why)
    match = next((p for p in PUBLISHED if (p.method, p.size, p.dataset) == (method, size, dataset)), None)
    if match is None:
        return PublishedLookup(method, size, dataset, None,
                               f"the paper publishes no {DATASET_NAMES[dataset]} number for size {size}")
    return PublishedLookup(method, size, dataset, match, "", tuple(_caveats(method, config, num_questions)))


def _caveats(method: str, config: dict[str, Any], num_questions: int | None) -> list[str]:
    run = config.get("run") or {}
    notes = []
    if run.get("limit") or run.get("question_ids"):
        count = f"{num_questions} questions" if num_questions else "a subset"
        notes.append(f"{count}, not the full split")
    models = config.get("models") or {}
    if method in ("pnp-vqa", "img2llm"):
        for role, paper_id in PNP_PAPER_VISION_MODELS.items():
            used = models.get(role)
            if used is not None and str(used) != paper_id:
                notes.append(f"{role} is {used}, the paper used {paper_id}")
    if method == "img2llm" and str(_first_param(_all_stage_params(config), ("variant",)) or "paper") != "paper":
        notes.append("LAVIS prompt variant; the paper's numbers use the paper prompt")
    if method == "pica":
        llm = str(models.get("llm") or "")
        if llm and "davinci" not in llm.lower() and "gpt-3" not in llm.lower():
            notes.append(f"LLM is {llm}, the paper used GPT-3 (davinci)")
    return notes


def _pica_uses_tags(config: dict[str, Any], params: dict[str, Any]) -> bool:
    """Tags are used when a stage reads a ``tags`` input; configs saved before that rule said
    ``use_tags`` (or a similar flag) on the prompt stage."""
    stages = [s for s in (config.get("stages") or {}).values() if isinstance(s, dict)]
    if any("tags" in (stage.get("inputs") or {}) for stage in stages):
        return True
    flag = _first_param(params, ("use_tags", "with_tags", "num_tags"))
    return bool(flag) and flag not in ("none", "off", "false", 0)


def _all_stage_params(config: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stage in (config.get("stages") or {}).values():
        if isinstance(stage, dict):
            for key, value in stage.items():
                out.setdefault(key, value)
    return out


def _as_int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _first_param(params: dict[str, Any], names: tuple[str, ...]) -> Any:
    for name in names:
        if name in params:
            value = params[name]
            return value.lower() if isinstance(value, str) else value
    return None


def published_table(method: str) -> tuple[list[str], list[tuple[str, list[float | None]]]]:
    """The paper's table of ``method``: dataset columns and one row per size (None: not published)."""
    rows = [p for p in PUBLISHED if p.method == method]
    datasets = [k for k in DATASET_NAMES if any(p.dataset == k for p in rows)]
    sizes: list[str] = []
    for p in rows:
        if p.size not in sizes:
            sizes.append(p.size)
    table = []
    for size in sizes:
        values = {p.dataset: p.accuracy for p in rows if p.size == size}
        table.append((size, [values.get(d) for d in datasets]))
    return [DATASET_NAMES[d] for d in datasets], table
