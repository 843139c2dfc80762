"""Run a pipeline's stages on synthetic questions with forced generation lengths and measure them.

Generation lengths are forced (every caption exactly ``caption_tokens`` new tokens, every answer exactly
``answer_tokens``) so that runs are comparable across code versions and with other implementations at the
same settings. Everything runs on a fresh, temporary cache: nothing is reused.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from capvqa.errors import ConfigError
from capvqa.synthetic.bench_models import UNIFIEDQA_SIZES

if TYPE_CHECKING:
    from capvqa.bench.work import WorkCounter

PROMPT_TOKENS = 4  # [DEC] a picture of
IMAGE_ENCODING_STAGES = ("matching", "captioning")  # PNP-VQA's two ViT-L encoders
QUESTIONS = [
    "what is the man on the left holding in his hand?",
    "how many people are standing near the red bus?",
    "what color is the umbrella of the woman?",
    "is there a dog sitting on the wooden bench?",
    "what is on the plate next to the cup?",
    "why is the street wet in this picture?",
]


# the pipelines bench can measure at real size: PNP-VQA at each reader size there is an architecture for
# (``pnp-vqa`` itself is the base configuration); the pipeline name fixes the size where it names one
BENCH_PIPELINES: dict[str, str | None] = {"pnp-vqa": None, **{f"pnp-vqa-{size}": size for size in UNIFIEDQA_SIZES}}
DEFAULT_SIZE = "base"


def resolve_bench_config(pipeline: str, size: str | None = None) -> tuple[str, str]:
    """``(config name, reader size)`` that ``capvqa bench PIPELINE [--size SIZE]`` measures.

    ``pnp-vqa-large`` means size large; ``--size`` may repeat it but not contradict it; ``pnp-vqa`` takes
    ``--size`` (default base). Other pipelines are refused: bench builds real-size models for PNP-VQA only.
    """
    if pipeline not in BENCH_PIPELINES:
        raise ConfigError(f"capvqa bench cannot measure {pipeline!r}: it builds real-size models for PNP-VQA "
                          f"only; give one of {', '.join(BENCH_PIPELINES)}")
    if size is not None and size not in UNIFIEDQA_SIZES:
        raise ConfigError(f"unknown --size {size!r}; valid: {', '.join(UNIFIEDQA_SIZES)}")
    implied = BENCH_PIPELINES[pipeline]
    if implied is not None and size is not None and size != implied:
        raise ConfigError(f"{pipeline} is the {implied} size but --size {size} was given; drop --size, or "
                          f"bench pnp-vqa-{size} (or pnp-vqa --size {size})")
    chosen = implied or size or DEFAULT_SIZE
    return f"pnp-vqa-{chosen}", chosen


def check_bench_counts(**counts: int | None) -> None:
    """Refuse a count below 1 (``questions=0`` ...) before anything is built; ``None`` means not given."""
    for name, value in counts.items():
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def synthetic_dataset(folder: Path, questions: int, seed: int = 0, questions_per_image: int = 1) -> Path:
    """A folder dataset (data/sample layout) of noise photographs, ``questions_per_image`` consecutive
    questions per image (VQAv2 has about 5.4, listed image by image)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    qs = []
    for i in range(questions):
        image_id = i // questions_per_image + 1
        if i % questions_per_image == 0:
            pixels = (rng.random((480, 640, 3)) * 255).astype("uint8")
            Image.fromarray(pixels).save(folder / "images" / f"COCO_val2014_{image_id:012d}.jpg", quality=90)
        qs.append({"image_id": image_id, "question": QUESTIONS[i % len(QUESTIONS)], "question_id": (i + 1) * 10})
    meta = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014", "license": {}}
    (folder / "questions.json").write_text(json.dumps({**meta, "questions": qs}))
    return folder


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
    num_captions: int = 100,
    num_patches: int = 20,
    caption_tokens: int = 16,
    answer_tokens: int = 19,
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

    ``pipeline`` and ``size`` are resolved by :func:`resolve_bench_config`; every setting is checked
    before any model is built or loaded.

    ``roofline``: afterwards, run the same questions again, untimed, counting each stage's FLOPs and
    operand bytes (``capvqa.bench.work``), and relate them to the device's peaks (``capvqa.bench.peaks``).
    """
    config_name, size = resolve_bench_config(pipeline, size)
    check_bench_counts(questions=questions, questions_per_image=questions_per_image, batch_size=batch_size,
                       num_captions=num_captions, num_patches=num_patches, caption_tokens=caption_tokens,
                       answer_tokens=answer_tokens, threads=threads)
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
    overrides = [
        f"captioning.num_captions={num_captions}",
        f"captioning.num_patches={num_patches}",
        f"captioning.min_length={PROMPT_TOKENS + caption_tokens}",
        f"captioning.max_length={PROMPT_TOKENS + caption_tokens}",
        f"reader.min_new_tokens={answer_tokens}",
        f"reader.max_new_tokens={answer_tokens}",
        *(f"{stage}.batch_size={batch_size}" for stage in ("matching", "captioning", "reader")),
    ]
    if models == "random":
        from capvqa.synthetic.bench_models import ensure_pnp_vqa_models

        built = ensure_pnp_vqa_models(size)
        overrides += [f"models.{role}={path}" for role, path in built.items()]
        spec_models = None
    else:
        spec_models = "tiny"
    pipe = Pipeline.from_yaml(config_name, overrides, models=spec_models)
    runtime = make_runtime(device, dtype, keep_freed_host_memory=keep_freed_host_memory)

    with tempfile.TemporaryDirectory(prefix="capvqa-bench-") as scratch:
        scratch_dir = Path(scratch)
        data = open_dataset(str(synthetic_dataset(scratch_dir / "data", questions,
                                                  questions_per_image=questions_per_image)))
        store = CacheStore(scratch_dir / "cache")
        runner = PipelineRunner(pipe.build_stages(runtime=runtime), store, runtime, progress)
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
            if bound.name in IMAGE_ENCODING_STAGES:  # each encodes every distinct image of a batch once
                stages[bound.name]["images_encoded_per_question"] = round(stats.batch_images / questions, 4)
        wall = time.perf_counter() - started
        records = [outputs for _, outputs in runner.results(data)]
        work, counted_records = (count_work(runner, data, scratch_dir / "counting-cache", progress) if roofline
                                 else (None, None))
        draws = sum(outputs["captioning"].draws for outputs in records)
        reader_tokenizer = next(b.stage for b in runner.stages if b.name == "reader").tokenizer
        passages = [p for outputs in records for p in outputs["reader"].passages]
        passage_tokens = sum(len(ids) for ids in reader_tokenizer(passages)["input_ids"]) / max(len(passages), 1)
        store.close()

    tokens = {"captioning": draws * caption_tokens, "reader": questions * answer_tokens}
    for name, count in tokens.items():
        seconds = stages[name]["compute_seconds"]
        stages[name]["generated_tokens"] = count
        stages[name]["generated_tokens_per_second"] = round(count / seconds, 2) if seconds else None
    # reader cost grows with passage length; recorded so runs with other tokenizers can be compared
    stages["reader"]["mean_passage_tokens"] = round(passage_tokens, 2)
    total = sum(stage["seconds_per_question"] for stage in stages.values())
    roofline_figures = {}
    if work is not None:
        peaks = device_peaks(runtime.device, runtime.dtype, peak_tflops, peak_bandwidth_gbs)
        for name, counter in work.items():
            stages[name].update(work_per_question(counter.flops, counter.bytes, stages[name]["compute_seconds"],
                                                  questions, peaks))
        roofline_figures = {
            # the counted work is the timed work only if the counting pass drew the same captions (it does
            # on CPU; nondeterministic GPU kernels could flip a sampled token)
            "counted_same_captions": [r["captioning"].captions for r in counted_records]
                                     == [r["captioning"].captions for r in records],
            "device_peaks": peaks.to_json(),
            "work": work_per_question(sum(c.flops for c in work.values()), sum(c.bytes for c in work.values()),
                                      sum(stage["compute_seconds"] for stage in stages.values()), questions, peaks),
        }
    return {
        "device": str(runtime.device) + (f" ({torch.cuda.get_device_name(runtime.device)})"
                                         if runtime.device.type == "cuda" else f" ({platform.processor() or platform.machine()})"),
        "settings": {
            "pipeline": config_name, "size": size, "models": models, "questions": questions,
            "questions_per_image": questions_per_image, "batch_size": batch_size,
            "dtype": runtime.dtype_name, "threads": torch.get_num_threads(), "host_allocator": host_allocator(), "num_captions": num_captions,
            "num_patches": num_patches, "caption_new_tokens": caption_tokens, "answer_tokens": answer_tokens,
        },
        "random_weights": True,
        "note": "random weights: these numbers measure cost only, never accuracy",
        "stages": stages,
        "total_seconds_per_question": round(total, 4),
        "questions_per_second": round(1 / total, 4) if total else None,
        "wall_seconds": round(wall, 2),
        "peak_memory_bytes": max(stage["peak_memory_bytes"] for stage in stages.values()),
        **roofline_figures,
    }


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
