"""Stage results crossing ranks over the process group, so a multi-node run shares nothing but the
network ``torchrun`` already uses.

Each node keeps its own local cache (SQLite on a network filesystem is a known source of corruption, so
capvqa never needs one). Results move at two points, both collectives every rank enters:

- :func:`fetch_neighbour_inputs`, before a stage that reads the next item's results (Img2LLM's prompt):
  the next item usually belongs to another rank, so each rank asks for the neighbour inputs its cache
  lacks and the ranks holding them send them (pull: only missing entries travel).
- :func:`send_results_to_main`, after the last stage: every other rank sends the keys of its shard's
  results with the items' image hashes, and rank 0 asks for the entries its cache lacks (in rounds of
  about :data:`ROUND_ITEMS` items so memory stays flat; ranks sharing rank 0's cache, or a rerun after a
  complete run, send no entries). Rank 0 stores them in its own cache -- so a rerun on node 0 alone finds
  every result -- and keys the other nodes' items by the hashes they sent instead of reading their
  images again (a pipeline with a stage that reads the next item's results has hashed every item on
  every rank already, to map the neighbours); then it evaluates and writes the run folder as in a
  one-process run.

Entries are content-keyed, so an entry already present is kept (``INSERT OR IGNORE``). Every node must
hold the same data: rank 0 trusts the image hashes the others computed for the items they ran.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from capvqa.data.items import VQAItem
from capvqa.engine.distributed import DistributedContext
from capvqa.engine.runner import windows

if TYPE_CHECKING:
    from capvqa.engine.runner import BoundStage, PipelineRunner

log = logging.getLogger(__name__)

#: Items rank 0 receives per round of :func:`send_results_to_main`, from all senders together (a round
#: carries every stage's entries of these); each sender sends its share, at least 16 items.
ROUND_ITEMS = 1024
MIN_ROUND_ITEMS = 16
#: Keys per round of :func:`fetch_neighbour_inputs`.
ROUND_KEYS = 256


@dataclass(frozen=True)
class TransferStats:
    """What one rank sent and received in one exchange (for the log and the tests)."""

    sent_entries: int = 0
    received_entries: int = 0
    rounds: int = 0


def send_results_to_main(
    runner: PipelineRunner, shard: Iterable[VQAItem], distributed: DistributedContext
) -> TransferStats:
    """Collective: rank 0's cache receives every stage's results of the other ranks' items that it lacks
    (see the module docstring). Call after every stage has run and the skipped items are merged.

    Each round, every other rank sends the keys of a window of its items with their image hashes; rank 0
    answers with the keys its cache lacks (none when the ranks share its cache, or when an earlier run
    already brought them) and receives just those entries. No rank has to know whether its cache is rank
    0's: rank 0 asks for what it does not have."""
    counts = distributed.gather(0 if distributed.is_main else len(shard))  # type: ignore[arg-type]
    per_sender = max(MIN_ROUND_ITEMS, ROUND_ITEMS // max(1, sum(1 for count in counts if count)))
    rounds = math.ceil(max(counts) / per_sender) if counts else 0
    own_windows = windows(shard, per_sender) if not distributed.is_main else iter(())
    sent = received = 0
    for _ in range(rounds):
        hashes, names = _window_keys(runner, next(own_windows, []))
        offered = distributed.gather_to_main((hashes, sorted(names)))
        lacking: list[list[str]] | None = None
        if offered is not None:
            for rank_hashes, _ in offered:
                runner.hasher.seed(rank_hashes)
            present = runner.store.existing_keys([key for _, keys in offered for key in keys])
            lacking = [[key for key in keys if key not in present] for _, keys in offered]
        wanted = distributed.gather(lacking)[0][distributed.rank]  # rank 0's answer, to every rank
        found = runner.store.get_many(wanted) if wanted and not distributed.is_main else {}
        sent += len(found)
        payload = [(names[key], key, header, arrays) for key, (header, arrays) in found.items()]
        for entries in distributed.gather_to_main(payload) or ():
            received += _store_entries(runner, entries)
    if rounds:
        log.info("rank %d: results exchange with rank 0 in %d rounds (sent %d, received %d entries)",
                 distributed.rank, rounds, sent, received)
    return TransferStats(sent_entries=sent, received_entries=received, rounds=rounds)


def fetch_neighbour_inputs(
    runner: PipelineRunner, bound: BoundStage, shard: Iterable[VQAItem], distributed: DistributedContext
) -> TransferStats:
    """Collective: each rank receives the neighbour inputs of ``bound`` for its shard that its cache lacks,
    from the ranks that hold them. Call after ``bound``'s neighbour ring is mapped
    (:meth:`PipelineRunner.map_neighbours`)."""
    needed: dict[str, str] = {}  # key -> stage NAME it is stored under
    for window in windows(shard, ROUND_KEYS):
        for keyed in runner.keyed_window(window):
            for input_name, key in keyed.neighbour_keys.get(bound.name, {}).items():
                needed[key] = runner.stage_named(bound.inputs[input_name]).stage.NAME
    present = runner.store.existing_keys(list(needed))
    missing = sorted(set(needed) - present)
    requested = sorted(set().union(*distributed.gather(missing)))
    wanted = set(missing)
    sent = received = 0
    rounds = math.ceil(len(requested) / ROUND_KEYS)
    for start in range(0, len(requested), ROUND_KEYS):
        chunk = [key for key in requested[start : start + ROUND_KEYS] if key not in wanted]
        held = runner.store.get_many(chunk) if chunk else {}
        sent += len(held)
        offers = distributed.gather([(key, header, arrays) for key, (header, arrays) in held.items()])
        mine = {key: (header, arrays) for offer in offers for key, header, arrays in offer if key in wanted}
        received += _store_entries(runner, [(needed[key], key, *value) for key, value in mine.items()])
        wanted -= set(mine)
    if missing:
        log.info("rank %d: %d neighbour inputs of %s fetched from other ranks (%d still missing)",
                 distributed.rank, received, bound.name, len(wanted))
    return TransferStats(sent_entries=sent, received_entries=received, rounds=rounds)


def _window_keys(runner: PipelineRunner, window: list[VQAItem]) -> tuple[dict[str, str], dict[str, str]]:
    """({question id: image hash}, {key: stage NAME}) of every stage's results of the window's items
    that were not skipped."""
    keyed = runner.keyed_window(window)
    hashes = {str(k.item.question_id): k.image_hash for k in keyed}
    names = {bound.name: bound.stage.NAME for bound in runner.stages}
    return hashes, {k.keys[stage]: names[stage] for k in keyed for stage in names if stage in k.keys}


def _store_entries(runner: PipelineRunner, entries: list[tuple[str, str, bytes, bytes | None]]) -> int:
    by_stage: dict[str, list[tuple[str, bytes, bytes | None]]] = {}
    for name, key, header, arrays in entries:
        by_stage.setdefault(name, []).append((key, header, arrays))
    return sum(runner.store.put_many(name, rows) for name, rows in by_stage.items())

