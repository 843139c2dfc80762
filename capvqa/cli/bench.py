"""``capvqa bench``: seconds per question, tokens/s and peak memory per stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from capvqa.cli.console import check_output_file, console, print_text, print_warning, write_output_file


def bench(
    pipeline: Annotated[str, typer.Argument(help="pnp-vqa (size from --size) or pnp-vqa-base | pnp-vqa-large | pnp-vqa-3b (that size); img2llm | pica | pica-full (OPT size from --size) or img2llm-opt-6.7b ... | pica-opt-6.7b (that size).")] = "pnp-vqa",
    size: Annotated[str | None, typer.Option(help="PNP-VQA: base | large | 3b (the UnifiedQA reader; default base). Img2LLM, PICa: 125m | 350m | 1.3b | 2.7b | 6.7b | 13b | 30b | 66b (the OPT LLM; default 1.3b). Default: the pipeline's size.")] = None,
    random_weights: Annotated[bool, typer.Option("--random-weights", help="Real architectures and vocabulary sizes with random weights (no download).")] = False,
    models: Annotated[str | None, typer.Option(help="tiny: the tiny zoo instead (a quick check of the command).")] = None,
    questions: Annotated[int, typer.Option(help="Synthetic questions.")] = 4,
    questions_per_image: Annotated[int, typer.Option(help="Consecutive questions per synthetic image (VQAv2 has about 5.4): the stages encode each image once for all its questions.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Batch size of every stage.")] = 4,
    device: Annotated[str | None, typer.Option(help="cpu | cuda | cuda:N | mps (default: best available).")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto | float32 | bfloat16 | float16.")] = None,
    num_captions: Annotated[int | None, typer.Option(help="PNP-VQA, Img2LLM: captions per question (default 100; Img2LLM: captions kept).")] = None,
    num_patches: Annotated[int | None, typer.Option(help="PNP-VQA, Img2LLM: patches per caption (default 20).")] = None,
    caption_tokens: Annotated[int | None, typer.Option(help="Forced new tokens per caption (min = max; default 16).")] = None,
    answer_tokens: Annotated[int | None, typer.Option(help="Forced answer tokens (min = max; default: PNP-VQA 19, Img2LLM 10, PICa 5, each method's maximum).")] = None,
    question_tokens: Annotated[int | None, typer.Option(help="Img2LLM: forced tokens per synthetic question of the QG model (default 10).")] = None,
    filter_pass_share: Annotated[float | None, typer.Option(help="Img2LLM: share of caption candidates the in-loop ITM filter passes, fixed (default 0.5: 200 candidates for 100 captions).")] = None,
    pool_size: Annotated[int | None, typer.Option(help="PICa: questions in the synthetic training pool of example selection (default 64; its embeddings count as model load).")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    roofline: Annotated[bool, typer.Option("--roofline", help="Then run the questions again, untimed, counting each stage's FLOPs and operand bytes, and report them against the device's peaks.")] = False,
    peak_tflops: Annotated[float | None, typer.Option(help="With --roofline: the device's peak TFLOP/s in this dtype (default: measured with a large matrix product).")] = None,
    peak_bandwidth_gbs: Annotated[float | None, typer.Option(help="With --roofline: the device's peak memory bandwidth in GB/s (default: measured with a large copy).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result JSON here.")] = None,
) -> None:
    """Measure each stage of PNP-VQA, Img2LLM or PICa on synthetic images with forced generation lengths.
    Random weights measure cost only, never accuracy."""
    from rich.markup import escape
    from rich.table import Table

    from capvqa.bench.run import check_bench_counts, method_settings, resolve_bench_config, run_benchmark
    from capvqa.cli.progress import stage_progress
    from capvqa.errors import ConfigError

    # every setting is checked here, before transformers loads or a model is built (run_benchmark checks
    # them again for library callers)
    if random_weights == (models is not None):
        raise ConfigError("give exactly one of --random-weights (real sizes) or --models tiny")
    if models not in (None, "tiny"):
        raise ConfigError(f"--models {models!r}: only 'tiny' is measured (or --random-weights for real sizes)")
    resolve_bench_config(pipeline, size)
    check_bench_counts(questions=questions, questions_per_image=questions_per_image, batch_size=batch_size,
                       threads=threads)
    method_settings(pipeline, num_captions=num_captions, num_patches=num_patches, caption_tokens=caption_tokens,
                    answer_tokens=answer_tokens, question_tokens=question_tokens,
                    filter_pass_share=filter_pass_share, pool_size=pool_size)
    if (peak_tflops is not None or peak_bandwidth_gbs is not None) and not roofline:
        raise ConfigError("--peak-tflops and --peak-bandwidth-gbs are used by --roofline; add --roofline")
    if json_out is not None:
        check_output_file(json_out, "--json")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with stage_progress(enabled=True) as progress:
        result = run_benchmark(
            pipeline, size=size, models="random" if random_weights else models, questions=questions,
            questions_per_image=questions_per_image,
            batch_size=batch_size, device=device, dtype=dtype, num_captions=num_captions, num_patches=num_patches,
            caption_tokens=caption_tokens, answer_tokens=answer_tokens, question_tokens=question_tokens,
            filter_pass_share=filter_pass_share, pool_size=pool_size, threads=threads, roofline=roofline,
            peak_tflops=peak_tflops, peak_bandwidth_gbs=peak_bandwidth_gbs, progress=progress,
            keep_freed_host_memory=True,  # as capvqa run does, so the figures match a real run's
        )
    table = Table(title=f"{result['settings']['pipeline']} ({result['settings']['sized_model']}) on "
                        f"{escape(result['device'])}, {result['settings']['dtype']}, "
                        f"{questions} questions ({questions_per_image} per image), batch {batch_size}")
    for column in ("stage", "s / question", "tokens / s", "peak memory", "model load s"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for name, stage in result["stages"].items():
        rate = stage.get("generated_tokens_per_second")
        table.add_row(name, f"{stage['seconds_per_question']:.2f}", f"{rate:.1f}" if rate else "-",
                      f"{stage['peak_memory_bytes'] / 2**30:.2f} GiB", f"{stage['model_load_seconds']:.1f}")
    table.add_row("[bold]total[/]", f"[bold]{result['total_seconds_per_question']:.2f}[/]", "",
                  f"{result['peak_memory_bytes'] / 2**30:.2f} GiB", "")
    console.print(table)
    if "device_peaks" in result:
        console.print(roofline_table(result))
        if not result["counted_same_captions"]:
            print_warning("the counting pass drew other captions than the timed run (nondeterministic "
                          "kernels): its work figures are close to the timed run's, not equal")
    print_warning(result["note"])
    if "llm_note" in result:
        print_text(result["llm_note"])
    if json_out is not None:
        write_output_file(json_out, json.dumps(result, indent=2), "--json")
        print_text(f"written to {json_out}")


def roofline_table(result: dict) -> Any:
    """Counted work per stage against the device's peaks (``--roofline``)."""
    from rich.table import Table

    peaks = result["device_peaks"]
    table = Table(title=f"work against the device's peaks ({peaks['source']}: "
                        f"{peaks['flops_per_second'] / 1e12:.2f} TFLOP/s, {peaks['bytes_per_second'] / 1e9:.0f} GB/s)",
                  caption="operand bytes: each operand read or written once, without fusion (an estimate of traffic)")
    for column in ("stage", "GFLOP/q", "TFLOP/s", "% peak", "operand GB/s", "% peak", "bound"):
        table.add_column(column, justify="left" if column in ("stage", "bound") else "right")
    rows = [(name, stage) for name, stage in result["stages"].items()] + [("[bold]total[/]", result["work"])]
    for name, work in rows:
        table.add_row(name, f"{work['flops_per_question'] / 1e9:.4g}", f"{work['achieved_flops_per_second'] / 1e12:.3f}",
                      f"{work['percent_of_peak_flops']:.1f}", f"{work['achieved_operand_bytes_per_second'] / 1e9:.1f}",
                      f"{work['percent_of_peak_bandwidth']:.1f}", work["bound"])
    return table
