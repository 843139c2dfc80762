"""What the device can do at best, measured on the spot, and how close a stage comes to it.

Datasheet peaks are often out of reach (boost clocks, sparsity, dtypes the code does not use), and CPUs
have none that fit a 2-thread run; so the bench measures two ceilings itself, in the run's dtype and
threads: a large matrix product (FLOP/s) and a large copy (bytes/s, read plus write). A user can give
datasheet figures instead (``--peak-tflops``, ``--peak-bandwidth-gbs``); the JSON says which it was.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from capvqa.errors import ConfigError


@dataclass(frozen=True)
class DevicePeaks:
    flops_per_second: float
    bytes_per_second: float
    source: str  # "measured", "given", or which of the two was given

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _synchronize(device: Any) -> None:
    """Wait for queued kernels: GPU calls return before the work is done."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _seconds_per_call(fn: Any, device: Any, repeats: int) -> float:
    fn()  # warm-up: kernel selection, allocation
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    _synchronize(device)
    return (time.perf_counter() - started) / repeats


def matmul_flops_per_second(device: Any, dtype: Any) -> float:
    """A large square matrix product: the arithmetic ceiling that real kernels reach."""
    import torch

    n, repeats = (8192, 20) if device.type != "cpu" else (2048, 4)
    with torch.inference_mode():
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        return 2 * n**3 / _seconds_per_call(lambda: torch.mm(a, b), device, repeats)


def copy_bytes_per_second(device: Any, dtype: Any) -> float:
    """A large copy, counted as read plus write: the memory-bandwidth ceiling."""
    import torch

    size, repeats = (1 << 30, 20) if device.type != "cpu" else (1 << 27, 4)
    with torch.inference_mode():
        source = torch.ones(size // torch.empty(0, dtype=dtype).element_size(), device=device, dtype=dtype)
        target = torch.empty_like(source)
        return 2 * size / _seconds_per_call(lambda: target.copy_(source), device, repeats)


def measure_peaks(device: Any, dtype: Any) -> DevicePeaks:
    """The best matrix-product rate and copy bandwidth this process gets on ``device`` in ``dtype``."""
    return DevicePeaks(matmul_flops_per_second(device, dtype), copy_bytes_per_second(device, dtype), "measured")


def check_given_peaks(tflops: float | None, bandwidth_gbs: float | None) -> None:
    """Refuse a zero or negative peak before a long run, not after it."""
    for flag, value in (("--peak-tflops", tflops), ("--peak-bandwidth-gbs", bandwidth_gbs)):
        if value is not None and not value > 0:
            raise ConfigError(f"{flag} must be a positive number, got {value}; leave it out to measure the peak")


def device_peaks(device: Any, dtype: Any, tflops: float | None = None, bandwidth_gbs: float | None = None,
                 measure: Any = measure_peaks) -> DevicePeaks:
    """Datasheet figures where the user gave them, the ones ``measure(device, dtype)`` finds for the rest."""
    check_given_peaks(tflops, bandwidth_gbs)
    if tflops is not None and bandwidth_gbs is not None:
        return DevicePeaks(tflops * 1e12, bandwidth_gbs * 1e9, "given")
    measured = measure(device, dtype)
    if tflops is None and bandwidth_gbs is None:
        return measured
    return DevicePeaks(
        flops_per_second=tflops * 1e12 if tflops is not None else measured.flops_per_second,
        bytes_per_second=bandwidth_gbs * 1e9 if bandwidth_gbs is not None else measured.bytes_per_second,
        source="given flops, measured bandwidth" if tflops is not None else "measured flops, given bandwidth",
    )


def utilisation(flops: float, operand_bytes: float, seconds: float, peaks: DevicePeaks) -> dict[str, Any]:
    """Roofline figures of one stage: intensity, achieved rates, their share of the peaks, the bounding roof.

    The bound is the roof the stage's arithmetic intensity (FLOPs per operand byte) sits under: below the
    device's balance point (peak FLOP/s over peak bytes/s) a stage cannot be faster than its traffic
    allows, above it not faster than its arithmetic.
    """
    intensity = flops / operand_bytes if operand_bytes else float("inf")
    balance = peaks.flops_per_second / peaks.bytes_per_second
    figures: dict[str, Any] = {
        "arithmetic_intensity": round(intensity, 2) if operand_bytes else None,
        "bound": "memory" if intensity < balance else "compute",
    }
    if seconds > 0:
        figures["achieved_flops_per_second"] = round(flops / seconds, 1)
        figures["achieved_operand_bytes_per_second"] = round(operand_bytes / seconds, 1)
        figures["percent_of_peak_flops"] = round(100 * flops / seconds / peaks.flops_per_second, 2)
        figures["percent_of_peak_bandwidth"] = round(100 * operand_bytes / seconds / peaks.bytes_per_second, 2)
    return figures
