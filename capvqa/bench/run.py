"""Run a pipeline's stages on synthetic questions with forced generation lengths and measure them.

Generation lengths are forced so that runs are comparable across code versions and with other
implementations at the same settings: every caption exactly ``caption_tokens`` new tokens, every answer
exactly ``answer_tokens``, and for Img2LLM every synthetic question exactly ``question_tokens`` and a fixed
share of the caption candidates passing the in-loop ITM filter (:mod:`capvqa.bench.forcing`). Everything
runs on a fresh, temporary cache: nothing is reused.

Three methods are measured (docs/methods.md): PNP-VQA at each UnifiedQA reader size, Img2LLM and PICa
(``pica``, and ``pica-full`` with tags and the 5-prompt ensemble) with the OPT LLM at a size given by
``--size`` (default 1.3B, which a laptop-class machine holds; larger OPTs are projected from counted work).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from capvqa.errors import ConfigError
from capvqa.synthetic.bench_models import OPT_SIZES, UNIFIEDQA_SIZES

if TYPE_CHECKING:
    from capvqa.bench.work import WorkCounter

PROMPT_TOKENS = 4  # [DEC] a picture of
QUESTIONS = [
    "what is the man on the left holding in his hand?",
    "how many people are standing near the red bus?",
    "what color is the umbrella of the woman?",
    "is there a dog sitting on the wooden bench?",
    "what is on the plate next to the cup?",
    "why is the street wet in this picture?",
]


@dataclass(frozen=True)
class BenchMethod:
    """What ``capvqa bench`` measures of one method: which size ``--size`` picks, the stage whose
    captions the counting pass must reproduce, and the default of every setting that applies to it (a
    setting absent here is refused for the method)."""

    name: str
    sizes: Mapping[str, Any]
    default_size: str
    sized_model: str  # what --size sizes, for messages and the JSON
    caption_stage: str
    defaults: Mapping[str, Any]


METHODS = {
    "pnp-vqa": BenchMethod("pnp-vqa", UNIFIEDQA_SIZES, "base", "UnifiedQA-v2 reader", "captioning",
                           {"num_captions": 100, "num_patches": 20, "caption_tokens": 16, "answer_tokens": 19}),
    # the authors generate 10 answer tokens without stop strings (docs/methods.md#img2llm); a question
    # of the QG model is forced to 10 T5 tokens (VQAv2 questions average 6.2 words, ~8 pieces with "?")
    "img2llm": BenchMethod("img2llm", OPT_SIZES, "1.3b", "OPT LLM", "caption_filter",
                           {"num_captions": 100, "num_patches": 20, "caption_tokens": 16, "answer_tokens": 10,
                            "question_tokens": 10, "filter_pass_share": 0.5}),
    # PICa: at most 5 answer tokens (pipelines/pica-opt-6.7b.yaml); a synthetic training pool
    "pica": BenchMethod("pica", OPT_SIZES, "1.3b", "OPT LLM", "caption",
                        {"caption_tokens": 16, "answer_tokens": 5, "pool_size": 64}),
}

# the pipelines bench can measure at real size: pipeline -> (method, the size its name fixes or None)
BENCH_PIPELINE_METHODS: dict[str, tuple[str, str | None]] = {
    "pnp-vqa": ("pnp-vqa", None),
    **{f"pnp-vqa-{size}": ("pnp-vqa", size) for size in UNIFIEDQA_SIZES},
    "img2llm": ("img2llm", None),
    **{f"img2llm-opt-{size}": ("img2llm", size) for size in ("6.7b", "13b", "30b", "66b")},
    "pica": ("pica", None),
    "pica-opt-6.7b": ("pica", "6.7b"),
    "pica-full": ("pica", None),
}
BENCH_PIPELINES: dict[str, str | None] = {name: size for name, (_, size) in BENCH_PIPELINE_METHODS.items()}
DEFAULT_SIZE = "base"


def bench_method(pipeline: str) -> BenchMethod:
    if pipeline not in BENCH_PIPELINE_METHODS:
        raise ConfigError(f"capvqa bench cannot measure {pipeline!r}: it builds real-size models for PNP-VQA, "
                          f"Img2LLM and PICa only; give one of {', '.join(BENCH_PIPELINES)}")
    return METHODS[BENCH_PIPELINE_METHODS[pipeline][0]]


def resolve_bench_config(pipeline: str, size: str | None = None) -> tuple[str, str]:
    """``(config name, size)`` that ``capvqa bench PIPELINE [--size SIZE]`` measures.

    The size is the PNP-VQA reader's or the Img2LLM/PICa LLM's (OPT). ``pnp-vqa-large`` means size large,
    ``img2llm-opt-13b`` OPT-13B; ``--size`` may repeat the name's size but not contradict it; ``pnp-vqa``,
    ``img2llm``, ``pica`` and ``pica-full`` take ``--size`` (default base, 1.3b, 1.3b, 1.3b). Other
    pipelines are refused: bench builds real-size models for these methods only.
    """
    method = bench_method(pipeline)
    if size is not None and size not in method.sizes:
        raise ConfigError(f"unknown --size {size!r}; valid: {', '.join(method.sizes)}")
    implied = BENCH_PIPELINE_METHODS[pipeline][1]
    if implied is not None and size is not None and size != implied:
        other = (f"pnp-vqa-{size} (or pnp-vqa --size {size})" if method.name == "pnp-vqa"
                 else f"{method.name} --size {size}")
        raise ConfigError(f"{pipeline} is the {implied} size but --size {size} was given; drop --size, or "
                          f"bench {other}")
    chosen = implied or size or method.default_size
    return (f"pnp-vqa-{chosen}" if method.name == "pnp-vqa" else pipeline), chosen


def check_bench_counts(**counts: int | None) -> None:
    """Refuse a count below 1 (``questions=0`` ...) before anything is built; ``None`` means not given."""
    for name, value in counts.items():
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def method_settings(pipeline: str, **given: Any) -> dict[str, Any]:
    """The method's settings: each given one (``None``: not given) checked, the others at its defaults.

    A setting the method does not have is refused (``--num-captions`` for PICa, ``--pool-size`` for
    PNP-VQA ...), so that a run never silently measures something other than what was asked.
    """
    method = bench_method(pipeline)
    unused = sorted(name for name, value in given.items() if value is not None and name not in method.defaults)
    if unused:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in unused)
        raise ConfigError(f"{flags} do{'es' if len(unused) == 1 else ''} not apply to {pipeline}; its settings: "
                          f"{', '.join('--' + n.replace('_', '-') for n in method.defaults)}")
    chosen = {name: given.get(name) if given.get(name) is not None else default
              for name, default in method.defaults.items()}
    check_bench_counts(**{name: value for name, value in chosen.items() if name != "filter_pass_share"})
    share = chosen.get("filter_pass_share")
    if share is not None and not 0 < share <= 1:
        raise ConfigError(f"--filter-pass-share must be in (0, 1], got {share}")
    return chosen


def synthetic_dataset(folder: Path, questions: int, seed: int = 0, questions_per_image: int = 1,
                      split: str = "val2014", first_image: int = 1, answers: bool = False,
                      first_question_id: int = 10) -> Path:
    """A folder dataset (data/sample layout) of noise photographs, ``questions_per_image`` consecutive
    questions per image (VQAv2 has about 5.4, listed image by image); ``answers``: with an
    annotations.json (a PICa example pool) and a COCO captions file, ``captions.json``."""
    from PIL import Image

    from capvqa.synthetic.offline_tokenizers import VQA_WORDS

    rng, text_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    (folder / "images").mkdir(parents=True, exist_ok=True)
    qs, annotations, captions = [], [], []
    for i in range(questions):
        image_id = first_image + i // questions_per_image
        if i % questions_per_image == 0:
            pixels = (rng.random((480, 640, 3)) * 255).astype("uint8")
            Image.fromarray(pixels).save(folder / "images" / f"COCO_{split}_{image_id:012d}.jpg", quality=90)
            # a COCO caption is about 10 words
            words = [VQA_WORDS[int(k)] for k in text_rng.integers(0, len(VQA_WORDS), 10)]
            captions.append({"image_id": image_id, "id": image_id, "caption": "a " + " ".join(words) + "."})
        question_id = first_question_id + 10 * i
        qs.append({"image_id": image_id, "question": QUESTIONS[i % len(QUESTIONS)], "question_id": question_id})
        answer = VQA_WORDS[int(text_rng.integers(0, len(VQA_WORDS)))]
        annotations.append({"question_type": "what", "multiple_choice_answer": answer, "answer_type": "other",
                            "image_id": image_id, "question_id": question_id,
                            "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": k + 1}
                                        for k in range(10)]})
    meta = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": split, "license": {}}
    (folder / "questions.json").write_text(json.dumps({**meta, "questions": qs}))
    if answers:
        (folder / "annotations.json").write_text(json.dumps({**meta, "annotations": annotations}))
        (folder / "captions.json").write_text(json.dumps({"annotations": captions}))
    return folder


def bench_overrides(method: str, settings: Mapping[str, Any], batch_size: int, scratch: Path) -> list[str]:
    """The config overrides that set a method's forced lengths and sizes (see the module docstring)."""
    tokens = settings["caption_tokens"]
    from capvqa.bench.forcing import draws_for_share

    if method == "pnp-vqa":
        return [
            f"captioning.num_captions={settings['num_captions']}",
            f"captioning.num_patches={settings['num_patches']}",
            f"captioning.min_length={PROMPT_TOKENS + tokens}",
            f"captioning.max_length={PROMPT_TOKENS + tokens}",
            f"reader.min_new_tokens={settings['answer_tokens']}",
            f"reader.max_new_tokens={settings['answer_tokens']}",
            *(f"{stage}.batch_size={batch_size}" for stage in ("matching", "captioning", "reader")),
        ]
    # the LLM: exactly answer_tokens, no stop string (the authors' Img2LLM script sets none; PICa's line
    # break would cut a random completion anywhere)
    llm = [f"llm.max_new_tokens={settings['answer_tokens']}", "llm.stop=[]"]
    if method == "img2llm":
        return [
            f"caption_filter.num_captions={settings['num_captions']}",
            f"caption_filter.num_patches={settings['num_patches']}",
            f"caption_filter.min_length={PROMPT_TOKENS + tokens}",
            f"caption_filter.max_length={PROMPT_TOKENS + tokens}",
            # the draw cap at the rounds the forced pass share needs: every question gets all its captions
            f"caption_filter.max_draws={draws_for_share(settings['num_captions'], settings['filter_pass_share'])}",
            "question_generation.checkpoint=null",  # random weights: no fine-tune to convert
            f"question_generation.max_length={1 + settings['question_tokens']}",  # counts the start token
            # the QG inputs hold all captions (~1,700 tokens): few per generate keeps attention in memory
            "question_generation.max_inputs_per_generate=8",
            *llm,
        ]
    pool = synthetic_dataset(scratch / "pool", settings["pool_size"], seed=1, questions_per_image=1,
                             split="train2014", first_image=1_000_001, answers=True, first_question_id=10_000_010)
    return [
        f"caption.min_length={PROMPT_TOKENS + tokens}",
        f"caption.max_length={PROMPT_TOKENS + tokens}",
        f"examples.pool_dataset={pool}",
        f"examples.pool_captions={pool / 'captions.json'}",  # COCO captions, as a real pool has
        *llm,
    ]


def build_models(method: str, size: str) -> dict[str, Path]:
    from capvqa.synthetic import bench_models

    if method == "pnp-vqa":
        return bench_models.ensure_pnp_vqa_models(size)
    if method == "img2llm":
        return bench_models.ensure_img2llm_models(size)
    return bench_models.ensure_pica_models(size)


def force_stages(method: str, runner: Any, settings: Mapping[str, Any]) -> None:
    """Bind the forcing of :mod:`capvqa.bench.forcing` to this run's stage objects."""
    from capvqa.bench.forcing import force_filter_pass_share, force_generation_lengths

    for bound in runner.stages:
        if bound.name == "caption_filter":
            force_filter_pass_share(bound.stage, settings["filter_pass_share"])
        elif bound.name == "question_generation":
            force_generation_lengths(bound.stage, lambda stage: stage._model)
        elif bound.name == "llm":
            force_generation_lengths(bound.stage, lambda stage: stage.backend.model)


def run_benchmark(
    pipeline: str = "pnp-vqa",
    *,
    size: str | None = None,
    models: str = "random",
    questions: int = 4,
    questions_per_image: int = 1,
    batch_size: int = 4,
    device: str | None = None,
    dtype: str | None = None,
    num_captions: int | None = None,
    num_patches: int | None = None,
    caption_tokens: int | None = None,
    answer_tokens: int | None = None,
    question_tokens: int | None = None,
    filter_pass_share: float | None = None,
    pool_size: int | None = None,
    threads: int | None = None,
    roofline: bool = False,
    peak_tflops: float | None = None,
    peak_bandwidth_gbs: float | None = None,
    progress: Any = None,
    keep_freed_host_memory: bool = False,
) -> dict[str, Any]:
    """Measure every stage; returns the JSON-ready result (see ``capvqa bench --help``).

    ``keep_freed_host_memory`` tunes this process's allocator for CPU runs as ``capvqa run`` does
    (:mod:`capvqa.engine.host_memory`); ``capvqa bench`` turns it on, a library call opts in.

    ``pipeline`` and ``size`` are resolved by :func:`resolve_bench_config`, the method's settings (``None``:
    its default) by :func:`method_settings`; every setting is checked before any model is built or loaded.

    ``roofline``: afterwards, run the same questions again, untimed, counting each stage's FLOPs and
    operand bytes (``capvqa.bench.work``), and relate them to the device's peaks (``capvqa.bench.peaks``).
    """
    config_name, size = resolve_bench_config(pipeline, size)
    method = bench_method(pipeline)
    check_bench_counts(questions=questions, questions_per_image=questions_per_image, batch_size=batch_size,
                       threads=threads)
    settings = method_settings(pipeline, num_captions=num_captions, num_patches=num_patches,
                               caption_tokens=caption_tokens, answer_tokens=answer_tokens,
                               question_tokens=question_tokens, filter_pass_share=filter_pass_share,
                               pool_size=pool_size)
    if models not in ("random", "tiny"):
        raise ConfigError(f"models must be 'random' (real sizes, random weights) or 'tiny', got {models!r}")
    import torch

    from capvqa.bench.memory import PeakMemory
    from capvqa.bench.peaks import check_given_peaks, device_peaks
    from capvqa.data.datasets import open_dataset
    from capvqa.engine.host_memory import host_allocator
    from capvqa.engine.pipeline import Pipeline
    from capvqa.engine.runner import PipelineRunner
    from capvqa.engine.runtime import make_runtime
    from capvqa.engine.store import CacheStore

    check_given_peaks(peak_tflops, peak_bandwidth_gbs)
    if threads:
        torch.set_num_threads(threads)
    built = build_models(method.name, size) if models == "random" else {}
    runtime = make_runtime(device, dtype, keep_freed_host_memory=keep_freed_host_memory)

    with tempfile.TemporaryDirectory(prefix="capvqa-bench-") as scratch:
        scratch_dir = Path(scratch)
        overrides = bench_overrides(method.name, settings, batch_size, scratch_dir)
        overrides += [f"models.{role}={path}" for role, path in built.items()]
        pipe = Pipeline.from_yaml(config_name, overrides, models=None if built else "tiny", batch_size=batch_size)
        data = open_dataset(str(synthetic_dataset(scratch_dir / "data", questions,
                                                  questions_per_image=questions_per_image)))
        store = CacheStore(scratch_dir / "cache")
        # stages that keep dataset-level arrays (PICa's pool embeddings) keep them in the scratch cache too
        runtime = dataclasses.replace(runtime, cache_dir=store.directory)
        runner = PipelineRunner(pipe.build_stages(pipe.resolved_spec(data), runtime=runtime), store, runtime,
                                progress)
        force_stages(method.name, runner, settings)
        stages: dict[str, Any] = {}
        started = time.perf_counter()
        for bound in runner.stages:
            with PeakMemory(runtime.device.type) as peak:
                stats = runner.run_stage(bound, data, len(data))
            stages[bound.name] = {
                "seconds_per_question": round(stats.compute_seconds / questions, 4),
                "compute_seconds": round(stats.compute_seconds, 4),
                "model_load_seconds": round(stats.setup_seconds, 4),
                "peak_memory_bytes": int(peak.bytes),
            }
            if stats.images_encoded is not None:  # stages that encode images say how many they encoded
                stages[bound.name]["images_encoded_per_question"] = round(stats.images_encoded / questions, 4)
        wall = time.perf_counter() - started
        records = [outputs for _, outputs in runner.results(data)]
        work, counted_records = (count_work(runner, data, scratch_dir / "counting-cache", progress) if roofline
                                 else (None, None))
        stages_by_name = {bound.name: bound.stage for bound in runner.stages}
        record_output_figures(method.name, stages, records, settings, questions, stages_by_name)
        store.close()

    total = sum(stage["seconds_per_question"] for stage in stages.values())
    roofline_figures = {}
    if work is not None:
        peaks = device_peaks(runtime.device, runtime.dtype, peak_tflops, peak_bandwidth_gbs)
        for name, counter in work.items():
            stages[name].update(work_per_question(counter.flops, counter.bytes, stages[name]["compute_seconds"],
                                                  questions, peaks))
        caption_stage = method.caption_stage
        roofline_figures = {
            # the counted work is the timed work only if the counting pass drew the same captions (it does
            # on CPU; nondeterministic GPU kernels could flip a sampled token)
            "counted_same_captions": [captions_of(r[caption_stage]) for r in counted_records]
                                     == [captions_of(r[caption_stage]) for r in records],
            "device_peaks": peaks.to_json(),
            "work": work_per_question(sum(c.flops for c in work.values()), sum(c.bytes for c in work.values()),
                                      sum(stage["compute_seconds"] for stage in stages.values()), questions, peaks),
        }
    sized = f"{method.sized_model} {size}" if models == "random" else "tiny zoo"
    return {
        "device": str(runtime.device) + (f" ({torch.cuda.get_device_name(runtime.device)})"
                                         if runtime.device.type == "cuda" else f" ({platform.processor() or platform.machine()})"),
        "settings": {
            "pipeline": config_name, "method": method.name, "size": size, "sized_model": sized, "models": models,
            "questions": questions, "questions_per_image": questions_per_image, "batch_size": batch_size,
            "dtype": runtime.dtype_name, "threads": torch.get_num_threads(), "host_allocator": host_allocator(),
            **{("caption_new_tokens" if name == "caption_tokens" else name): value for name, value in settings.items()},
        },
        "random_weights": True,
        "note": "random weights: these numbers measure cost only, never accuracy",
        **({"llm_note": f"the LLM is OPT-{size}; the published runs use OPT-6.7B to 66B: bench them with --size "
                        "where memory allows, else project the llm stage from its counted FLOPs and bytes "
                        "(--roofline; README, Scale)"} if method.name != "pnp-vqa" and models == "random" else {}),
        "stages": stages,
        "total_seconds_per_question": round(total, 4),
        "questions_per_second": round(1 / total, 4) if total else None,
        "wall_seconds": round(wall, 2),
        "peak_memory_bytes": max(stage["peak_memory_bytes"] for stage in stages.values()),
        **roofline_figures,
    }


def captions_of(output: Any) -> Any:
    """The captions of a caption stage's output (PNP-VQA's and Img2LLM's lists, PICa's one caption)."""
    return output.captions if hasattr(output, "captions") else output.caption


def record_output_figures(method: str, stages: dict[str, Any], records: list[dict[str, Any]],
                          settings: Mapping[str, Any], questions: int, stage_objects: Mapping[str, Any]) -> None:
    """Generated tokens and tokens/s per generating stage, and the input lengths a stage's cost grows with
    (recorded so runs with other tokenizers can be compared)."""
    caption_tokens, answer_tokens = settings["caption_tokens"], settings["answer_tokens"]
    if method == "pnp-vqa":
        tokens = {"captioning": sum(r["captioning"].draws for r in records) * caption_tokens,
                  "reader": questions * answer_tokens}
        reader_tokenizer = stage_objects["reader"].tokenizer
        passages = [p for r in records for p in r["reader"].passages]
        stages["reader"]["mean_passage_tokens"] = _mean_tokens(reader_tokenizer, passages)
    elif method == "img2llm":
        filtered = [r["caption_filter"] for r in records]
        draws, passed = sum(f.draws for f in filtered), sum(f.passed for f in filtered)
        generated = [q for r in records for q in r["question_generation"].questions]
        tokens = {"caption_filter": draws * caption_tokens,
                  "question_generation": len(generated) * settings["question_tokens"],
                  "llm": questions * answer_tokens}
        stages["caption_filter"].update(candidates_per_question=round(draws / questions, 2),
                                        kept_per_question=round(sum(f.kept for f in filtered) / questions, 2),
                                        pass_share=round(passed / draws, 4) if draws else None)
        qg = stage_objects["question_generation"]
        qg_inputs = [text for r in records for text in qg_input_texts(qg, r)]
        stages["question_generation"].update(questions_generated_per_question=round(len(generated) / questions, 2),
                                             mean_input_tokens=_mean_tokens(qg.tokenizer, qg_inputs))
        stages["llm"]["mean_prompt_tokens"] = _mean_prompt_tokens(stage_objects["llm"], records)
    else:
        prompts_per_question = sum(len(r["prompt"].prompts) for r in records) / questions
        tokens = {"caption": round(stages["caption"]["images_encoded_per_question"] * questions) * caption_tokens,
                  "llm": round(prompts_per_question * questions) * answer_tokens}
        stages["llm"]["prompts_per_question"] = round(prompts_per_question, 2)
        stages["llm"]["mean_prompt_tokens"] = _mean_prompt_tokens(stage_objects["llm"], records)
    for name, count in tokens.items():
        seconds = stages[name]["compute_seconds"]
        stages[name]["generated_tokens"] = count
        stages[name]["generated_tokens_per_second"] = round(count / seconds, 2) if seconds else None


def qg_input_texts(stage: Any, record: Mapping[str, Any]) -> list[str]:
    from capvqa.stages.question_generation import qg_inputs

    cfg = stage.config
    return qg_inputs(record["answer_extraction"].answers, record["caption_filter"].captions, cfg.template,
                     cfg.caption_separator)


def _mean_tokens(tokenizer: Any, texts: list[str]) -> float:
    return round(sum(len(ids) for ids in tokenizer(texts)["input_ids"]) / max(len(texts), 1), 2)


def _mean_prompt_tokens(llm_stage: Any, records: list[dict[str, Any]]) -> float:
    """Mean LLM prompt length in the LLM's tokens (before any truncation to its context)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llm_stage.config.model)
    tokenizer.model_max_length = 10**9  # measured, not run: no warning about the model's context
    return _mean_tokens(tokenizer, [p for r in records for p in r["prompt"].prompts])


def count_work(runner: Any, data: Any, cache_folder: Path, progress: Any = None
               ) -> tuple[dict[str, WorkCounter], list[dict[str, Any]]]:
    """Each stage's ``WorkCounter`` over the same questions, and the records the counting pass made.

    It runs from a fresh cache so that every item is computed again; the seeded sampler draws the same
    captions as the timed run, so the work is the timed run's (the caller checks the captions).
    """
    from capvqa.bench.work import WorkCounter
    from capvqa.engine.runner import PipelineRunner
    from capvqa.engine.store import CacheStore

    counters = {bound.name: WorkCounter() for bound in runner.stages}
    labelled = (lambda name, total: progress(f"{name} (counting work)", total)) if progress else None
    store = CacheStore(cache_folder)
    try:
        counting = PipelineRunner(runner.stages, store, runner.runtime, labelled, compute_context=counters.__getitem__)
        for bound in counting.stages:
            counting.run_stage(bound, data, len(data))
        records = [outputs for _, outputs in counting.results(data)]
    finally:
        store.close()
    return counters, records


def work_per_question(flops: int, operand_bytes: int, compute_seconds: float, questions: int,
                      peaks: Any) -> dict[str, Any]:
    """The JSON figures of counted work: per question, and as a share of the device's peaks."""
    from capvqa.bench.peaks import utilisation

    return {
        "flops_per_question": round(flops / questions),
        "operand_bytes_per_question": round(operand_bytes / questions),
        **utilisation(flops, operand_bytes, compute_seconds, peaks),
    }
