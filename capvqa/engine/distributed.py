"""Data-parallel runs under ``torchrun`` (or any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK).

Each rank runs every stage on its shard of the items (the k-th run of consecutive items about one image
goes to rank k mod world size, a deterministic split: :class:`Shard`), writing into its node's cache. Since an item's result depends only on (seed,
item, config), the union equals a single-process run -- up to floating-point rounding: a rank batches an
item with other items than a single process does, so its float results (relevance maps, logits) may
differ in the last bits (within 1e-5 relative, tested), and rarely a sampled patch set or caption token
follows (rates in :mod:`capvqa.ops.patch_sampling` and :mod:`capvqa.ops.seeded_sampling`). When all
ranks are done, the other nodes send their results to rank 0 over the process group
(:mod:`capvqa.engine.result_exchange`), which reads every result back from its cache, evaluates and
writes the run folder; other ranks write nothing.

Ranks on one machine share a local cache directory; each machine keeps its own (nothing but the network
torchrun uses is shared). A node killed mid-run resumes from its own cache when the job is restarted.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from capvqa.data.items import VQAItem


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> DistributedContext:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(rank=int(os.environ["RANK"]), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device_request(self, requested: str | None) -> str | None:
        """Each rank takes its own GPU: ``cuda`` / ``auto`` become ``cuda:LOCAL_RANK``."""
        import torch

        if not self.active:
            return requested
        if requested in (None, "", "auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return requested

    def init(self) -> None:
        import torch
        import torch.distributed as dist

        if self.active and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend=backend)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable objects travel between our own processes only)."""
        if not self.active:
            return [value]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def gather_to_main(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` on rank 0 (``None`` elsewhere): one copy travels, not one per rank."""
        if not self.active:
            return [value]
        import torch.distributed as dist

        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def shutdown(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


class Shard:
    """The items of one rank, re-iterable and sized like the dataset it views.

    Items are dealt in runs of consecutive items about the same image (VQAv2 and OK-VQA list an image's
    questions together, about 5.4 per image on VQAv2): run k goes to rank k mod world size. An image's
    questions thus stay on one rank, which encodes the image once for all of them
    (:mod:`capvqa.data.image_memo`); dealing single items round-robin would make every rank encode most
    images. Every rank computes the same deal from the dataset order alone.
    """

    def __init__(self, items: Iterable[VQAItem], rank: int, world_size: int) -> None:
        self.items, self.rank, self.world_size = items, rank, world_size
        self.name = getattr(items, "name", None)
        self._length: int | None = None

    def __iter__(self) -> Iterator[VQAItem]:
        run, previous = -1, object()
        for item in self.items:
            if item.image_id != previous:
                run, previous = run + 1, item.image_id
            if run % self.world_size == self.rank:
                yield item

    def __len__(self) -> int:
        if self._length is None:  # one pass over the records (no image is read)
            self._length = sum(1 for _ in self)
        return self._length
