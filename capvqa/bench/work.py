"""Count the arithmetic and the memory traffic of torch code, for roofline figures in ``capvqa bench``.

A stage's seconds say how fast it is; they do not say how close it is to what the device can do. For that
the bench needs the work itself: floating-point operations (matrix products, convolutions and attention,
with torch's own formulas) and bytes moved. ``WorkCounter`` watches every aten operation run under it,
forward and backward, on any device.

Bytes are *operand bytes*: for every operation that touches memory, what it reads plus what it writes,
each operand once (an in-place target is read and written; a lookup reads only the rows it gathers).
That is what an unfused execution keeping nothing on chip moves, and the figure that matters for
decoding, where every step reads all the decoder weights and the KV cache. Real DRAM traffic is lower
where kernels fuse or caches hold operands (so a bandwidth derived from it can exceed the device's peak)
and higher where a large product re-reads tiles: read it as an estimate, never as a measurement.
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
    _aten._scaled_dot_product_flash_attention_for_cpu_backward:
        flop_registry[_aten._scaled_dot_product_flash_attention_backward],
}

# allocation and bookkeeping: no data is read or written (``_unsafe_view`` is a view its schema hides)
_NO_TRAFFIC = {
    _aten.empty, _aten.empty_like, _aten.empty_strided, _aten.new_empty, _aten.new_empty_strided,
    _aten.lift_fresh, _aten.detach, _aten.alias, _aten.set_, _aten.resize_, _aten._unsafe_view,
}

# in-place operations that overwrite their target without reading it
_WRITE_ONLY = {_aten.copy_, _aten.fill_, _aten.zero_, _aten.normal_, _aten.uniform_, _aten.bernoulli_}

# lookups read the rows they gather, not the whole table: their first operand counts at most the output
_GATHERS = {_aten.embedding, _aten.index_select, _aten.gather, _aten.index}


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
    """What one operation reads plus what it writes (see the module docstring).

    Operations that return no tensor (sizes, strides, ``item()``) are bookkeeping and count nothing.
    """
    packet = getattr(func, "overloadpacket", func)
    if packet in _NO_TRAFFIC or is_view(func):
        return 0
    written = _distinct_tensors(tree_flatten(out)[0])
    if not written:
        return 0
    write_only = {argument.name for argument in func._schema.arguments
                  if argument.alias_info is not None and argument.alias_info.is_write
                  and (argument.name == "out" or packet in _WRITE_ONLY)}
    read_values = [value for i, value in enumerate(args)
                   if i >= len(func._schema.arguments) or func._schema.arguments[i].name not in write_only]
    read_values += [value for name, value in kwargs.items() if name not in write_only]
    read = _distinct_tensors(tree_flatten(read_values)[0])
    written_bytes = sum(tensor_bytes(t) for t in written)
    read_bytes = [tensor_bytes(t) for t in read]
    if packet in _GATHERS and read_bytes:
        read_bytes[0] = min(read_bytes[0], written_bytes)
    return sum(read_bytes) + written_bytes


def _distinct_tensors(values: list) -> list[torch.Tensor]:
    """The tensors among ``values`` that hold data, each once (the same tensor may be passed twice)."""
    seen: set[tuple] = set()
    tensors = []
    for value in values:
        if not isinstance(value, torch.Tensor) or value.device.type == "meta" or value.numel() == 0:
            continue
        key = (value.data_ptr(), tuple(value.shape), tuple(value.stride()), value.dtype)
        if key not in seen:
            seen.add(key)
            tensors.append(value)
    return tensors


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
        self._entered_at: list[tuple[int, int]] = []

    def __enter__(self) -> WorkCounter:
        self._entered_at.append((self.flops, self.bytes))
        return super().__enter__()

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        """A region that raised (a batch that ran out of memory, retried as halves) did not count."""
        flops, nbytes = self._entered_at.pop()
        if error is not None:
            self.flops, self.bytes = flops, nbytes
        super().__exit__(kind, error, traceback)

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
