"""Count the arithmetic and the memory traffic of torch code, for roofline figures in ``capvqa bench``.

A stage's seconds say how fast it is; they do not say how close it is to what the device can do. For that
the bench needs the work itself: floating-point operations (matrix products, convolutions and attention,
with torch's own formulas) and bytes moved. ``WorkCounter`` watches every aten operation run under it,
forward and backward, on any device.

Bytes are *operand bytes*: for every operation that touches memory, what it reads plus what it writes,
as if each operand went to and from device memory once. That is what an unfused execution moves, and the
figure that matters for decoding, where every step reads all the decoder weights and the KV cache. It is
an upper bound of real DRAM traffic where caches or kernel fusion keep operands on chip, so a bandwidth
figure derived from it can exceed the device's peak; read it as an estimate, never as a measurement.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

_aten = torch.ops.aten

# fused attention kernels torch's table leaves out; their cost is the one of the flash kernel
_EXTRA_FLOP_FORMULAS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: flop_registry[_aten._scaled_dot_product_flash_attention],
}

# allocation and bookkeeping: no data is read or written
_NO_TRAFFIC = {
    _aten.empty, _aten.empty_like, _aten.empty_strided, _aten.new_empty, _aten.new_empty_strided,
    _aten.lift_fresh, _aten.detach, _aten.alias, _aten.set_, _aten.resize_,
}


def flop_formula(func: Any) -> Any:
    """Torch's flop formula for an aten operation (overload or packet), or None where it does none."""
    packet = getattr(func, "overloadpacket", func)
    return flop_registry.get(packet) or _EXTRA_FLOP_FORMULAS.get(packet)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes an operation reads or writes for this tensor: its elements, but never more than its storage
    (an expanded tensor repeats elements it reads once)."""
    elements = tensor.numel() * tensor.element_size()
    try:
        return min(elements, tensor.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):  # tensors without storage (meta, some subclasses)
        return elements


def is_view(func: Any) -> bool:
    """Operations whose result aliases an input without writing it (view, transpose, slice...)."""
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def operand_bytes(func: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """What one operation reads plus what it writes; an in-place result is counted once, as a write.
    Operations that return no tensor (sizes, strides, ``item()``) are bookkeeping and count nothing."""
    if getattr(func, "overloadpacket", func) in _NO_TRAFFIC or is_view(func):
        return 0
    if not any(isinstance(value, torch.Tensor) for value in tree_flatten(out)[0]):
        return 0
    seen: set[tuple] = set()
    total = 0
    for value in tree_flatten((args, kwargs))[0] + tree_flatten(out)[0]:
        if not isinstance(value, torch.Tensor) or value.device.type == "meta" or value.numel() == 0:
            continue
        key = (value.data_ptr(), tuple(value.shape), tuple(value.stride()), value.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += tensor_bytes(value)
    return total


class WorkCounter(TorchDispatchMode):
    """``with WorkCounter() as work: ...`` then ``work.flops`` and ``work.bytes`` (operand bytes).

    Counting costs Python time per operation, so timings are never taken under it: the bench counts in a
    separate pass over the same questions. Under ``torch.inference_mode`` composite operations such as
    ``linear`` arrive whole; like torch's own FlopCounterMode, the counter decomposes any operation it
    has no formula for, so that the matrix products inside are seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self.bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        formula = flop_formula(func)
        if formula is None and func is not torch.ops.prim.device.default:
            with self:
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        out = func(*args, **kwargs)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
        self.bytes += operand_bytes(func, args, kwargs, out)
        return out
