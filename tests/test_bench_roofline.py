"""Roofline figures of `capvqa bench --roofline`: counted FLOPs and operand bytes, peaks, utilisation."""

import math
import os
import subprocess
import sys

import pytest
import torch

from capvqa.bench.peaks import DevicePeaks, device_peaks, measure_peaks, utilisation
from capvqa.bench.work import WorkCounter, operand_bytes
from capvqa.errors import ConfigError

FLOAT = 4


@pytest.mark.parametrize("inference", [False, True])
def test_linear_layer_flops_and_bytes(inference):
    x, weight = torch.randn(64, 128), torch.randn(256, 128)
    context = torch.inference_mode() if inference else torch.no_grad()
    with context, WorkCounter() as work:  # under inference_mode `linear` arrives whole and is decomposed
        torch.nn.functional.linear(x, weight)
    assert work.flops == 2 * 64 * 128 * 256
    assert work.bytes == (64 * 128 + 256 * 128 + 64 * 256) * FLOAT  # both operands read, the product written


def test_backward_is_counted_with_the_forward():
    layer, x = torch.nn.Linear(32, 16, bias=False), torch.randn(8, 32, requires_grad=True)
    with WorkCounter() as work:
        layer(x).sum().backward()
    assert work.flops == 3 * 2 * 8 * 32 * 16  # forward, input gradient, weight gradient


def test_fused_attention_on_cpu_is_counted():
    q = torch.randn(2, 4, 10, 16)
    k = torch.randn(2, 4, 12, 16)
    with torch.inference_mode(), WorkCounter() as work:
        torch.nn.functional.scaled_dot_product_attention(q, k, k)
    assert work.flops == 2 * (2 * 4 * 10 * 12 * 16) * 2  # scores and weighted sum, 2 FLOPs per multiply-add


def test_views_move_nothing_and_in_place_targets_are_read_and_written():
    a = torch.randn(100, 50)
    with WorkCounter() as work:
        a.t()
        a.view(50, 100)
        a[:10]
        a.shape  # noqa: B018
    assert work.bytes == 0
    with WorkCounter() as work:
        a.add_(1.0)
    assert work.bytes == 2 * 100 * 50 * FLOAT
    out = torch.empty(100, 50)
    with WorkCounter() as work:
        torch.add(a, a, out=out)  # the same input twice is read once; `out` is only written
        out.fill_(0.0)
    assert work.bytes == 2 * 100 * 50 * FLOAT + 100 * 50 * FLOAT


def test_a_batched_matmul_reshape_is_not_a_copy():
    x, weight = torch.randn(4, 10, 64), torch.randn(64, 32)
    with WorkCounter() as work:
        torch.matmul(x, weight)  # folds x to 2-D and unfolds the product with _unsafe_view
    assert work.bytes == (40 * 64 + 64 * 32 + 40 * 32) * FLOAT


def test_a_lookup_reads_the_rows_it_gathers_not_the_table():
    table, ids = torch.nn.Embedding(30_000, 768), torch.randint(0, 30_000, (32,))
    with torch.inference_mode(), WorkCounter() as work:
        table(ids)
    assert work.bytes == 2 * 32 * 768 * FLOAT + 32 * 8  # rows read, rows written, the int64 ids


def test_attention_backward_on_cpu_is_counted():
    q = torch.randn(2, 4, 10, 16, requires_grad=True)
    with WorkCounter() as work:
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    forward = 4 * 2 * 4 * 10 * 10 * 16
    assert work.flops == forward + 2.5 * forward  # torch's formula: backward is 2.5 forwards


def test_a_region_that_raised_is_not_counted():
    work = WorkCounter()
    with work:
        torch.mm(torch.randn(8, 8), torch.randn(8, 8))
    counted = (work.flops, work.bytes)
    with pytest.raises(RuntimeError), work:  # as a batch that ran out of memory and is retried as halves
        torch.mm(torch.randn(8, 8), torch.randn(8, 8))
        raise RuntimeError("out of memory")
    assert (work.flops, work.bytes) == counted


def test_an_expanded_operand_is_read_at_its_storage_size():
    row = torch.randn(1, 256)
    wide = row.expand(1000, 256)
    out = torch.empty(1000, 256)
    assert operand_bytes(torch.ops.aten.copy_.default, (out, wide), {}, out) == (1000 * 256 + 256) * FLOAT


def test_utilisation_places_a_stage_under_its_roof():
    peaks = DevicePeaks(flops_per_second=100e12, bytes_per_second=2e12, source="given")  # balance 50 FLOP/B
    decoding = utilisation(flops=1e12, operand_bytes=1e12, seconds=1.0, peaks=peaks)
    assert decoding["bound"] == "memory" and decoding["arithmetic_intensity"] == 1.0
    assert decoding["percent_of_peak_bandwidth"] == 50.0 and decoding["percent_of_peak_flops"] == 1.0
    encoding = utilisation(flops=80e12, operand_bytes=0.5e12, seconds=2.0, peaks=peaks)
    assert encoding["bound"] == "compute" and encoding["percent_of_peak_flops"] == 40.0
    assert encoding["achieved_flops_per_second"] == 40e12


def test_given_peaks_replace_measured_ones():
    measured = DevicePeaks(1e12, 1e10, "measured")
    calls = []

    def measure(device, dtype):
        calls.append((device, dtype))
        return measured

    given = device_peaks("cpu", torch.float32, tflops=500, bandwidth_gbs=3000, measure=measure)
    assert given == DevicePeaks(500e12, 3000e9, "given") and not calls
    mixed = device_peaks("cpu", torch.float32, bandwidth_gbs=3000, measure=measure)
    assert mixed == DevicePeaks(1e12, 3000e9, "measured flops, given bandwidth") and len(calls) == 1
    assert device_peaks("cpu", torch.float32, measure=measure) is measured
    with pytest.raises(ConfigError, match="--peak-tflops must be a positive number"):
        device_peaks("cpu", torch.float32, tflops=0, bandwidth_gbs=3000, measure=measure)


def test_measured_cpu_peaks_are_plausible():
    peaks = measure_peaks(torch.device("cpu"), torch.float32)
    assert peaks.source == "measured"
    assert 1e9 < peaks.flops_per_second < 1e14 and 1e8 < peaks.bytes_per_second < 1e13
    assert math.isfinite(peaks.flops_per_second / peaks.bytes_per_second)


@pytest.mark.slow
def test_bench_roofline_counts_every_stage_without_touching_the_timings(tiny_zoo):
    from capvqa.bench.run import run_benchmark

    settings = dict(models="tiny", questions=3, batch_size=2, num_captions=4, caption_tokens=5, answer_tokens=3,
                    device="cpu")
    result = run_benchmark(**settings, roofline=True, peak_tflops=1.0, peak_bandwidth_gbs=10.0)
    assert result["device_peaks"] == {"flops_per_second": 1e12, "bytes_per_second": 1e10, "source": "given"}
    assert result["counted_same_captions"] is True
    for name, stage in result["stages"].items():
        assert stage["flops_per_question"] > 0 and stage["operand_bytes_per_question"] > 0, name
        expected = 100 * stage["flops_per_question"] * 3 / stage["compute_seconds"] / 1e12
        assert stage["percent_of_peak_flops"] == pytest.approx(expected, rel=1e-3, abs=0.01)
        assert stage["bound"] in ("memory", "compute")
    total = result["work"]
    assert total["flops_per_question"] == pytest.approx(
        sum(s["flops_per_question"] for s in result["stages"].values()), abs=3)
    # the counting pass repeats exactly the timed run's work: a second bench counts the same FLOPs
    again = run_benchmark(**settings, roofline=True, peak_tflops=1.0, peak_bandwidth_gbs=10.0)
    assert [s["flops_per_question"] for s in again["stages"].values()] == [
        s["flops_per_question"] for s in result["stages"].values()]
    plain = run_benchmark(**settings)
    assert "device_peaks" not in plain and "flops_per_question" not in plain["stages"]["reader"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--peak-tflops", "5"], "add --roofline"),
    (["--roofline", "--peak-bandwidth-gbs", "0"], "--peak-bandwidth-gbs must be a positive number"),
])
@pytest.mark.slow
def test_peak_flags_are_checked_before_the_run(flags, message):
    done = subprocess.run([sys.executable, "-m", "capvqa", "bench", "pnp-vqa", "--models", "tiny", *flags],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and message in " ".join(done.stderr.split())  # rich wraps long lines
    assert "matching" not in done.stdout  # refused before any stage ran
