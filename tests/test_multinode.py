"""Multi-node runs with nothing shared but torchrun's network: two "nodes" on this machine, launched as
`torchrun --nnodes 2 --node_rank {0,1} --master_addr 127.0.0.1`, each with a cache directory of its own.

Rank 1's results reach rank 0 over the process group (capvqa/engine/result_exchange.py), rank 0 writes
the run folder, and the predictions equal a one-process run; a node killed mid-run resumes from its own
cache when the job is launched again; a stage reading the next item's results gets the other node's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from record_matching import assert_records_match

from capvqa.engine.store import CacheStore

COMMON = ["run", "pnp-vqa", "--dataset", "sample", "--models", "tiny", "--limit", "8", "--quiet",
          "--batch-size", "2", "--set", "captioning.num_captions=3", "--set", "captioning.num_patches=4"]


class ThreadGroup:
    """A process group of threads: the collectives capvqa's engine calls, for exchanges in one process."""

    def __init__(self, size: int) -> None:
        self.size, self.slots = size, [None] * size
        self.meeting = threading.Barrier(size, timeout=60)

    def member(self, rank: int) -> ThreadRank:
        return ThreadRank(self, rank)


@dataclass
class ThreadRank:
    group: ThreadGroup
    rank: int

    active = True

    @property
    def world_size(self) -> int:
        return self.group.size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        self.group.meeting.wait()

    def gather(self, value: Any) -> list[Any]:
        self.group.slots[self.rank] = value
        self.group.meeting.wait()
        gathered = list(self.group.slots)
        self.group.meeting.wait()
        return gathered

    def gather_to_main(self, value: Any) -> list[Any] | None:
        gathered = self.gather(value)
        return gathered if self.is_main else None


def test_exchanges_in_many_rounds_give_every_rank_what_it_lacks(tmp_path, monkeypatch):
    """Three ranks with caches of their own, exchanging in rounds of a few items and keys: the
    neighbour-reading stage gets every next item's tag from whichever rank made it, and rank 0's cache
    ends up holding every result, keyed by the hashes the others sent."""
    import test_neighbour_inputs as neighbours

    from capvqa.engine import result_exchange
    from capvqa.engine.distributed import Shard
    from capvqa.engine.pipeline import Pipeline
    from capvqa.engine.registry import register_stage, unregister_stage
    from capvqa.engine.runner import PipelineRunner
    from capvqa.engine.runtime import make_runtime

    monkeypatch.setattr(result_exchange, "ROUND_ITEMS", 6)
    monkeypatch.setattr(result_exchange, "MIN_ROUND_ITEMS", 1)
    monkeypatch.setattr(result_exchange, "ROUND_KEYS", 3)
    names = [register_stage(neighbours.TagStage, "NeighbourTag"), register_stage(neighbours.NextStage, "NeighbourNext")]
    config = tmp_path / "neighbours.yaml"
    config.write_text(yaml.safe_dump({
        "name": "neighbours", "models": {},
        "stages": {"tag": {"type": "NeighbourTag"}, "next": {"type": "NeighbourNext", "inputs": {"tag": "tag"}}},
        "answer": "next"}))
    ids = list(range(1, 27))
    data = neighbours.items(ids)
    group = ThreadGroup(3)
    runners = [PipelineRunner(Pipeline.from_yaml(config).build_stages(), CacheStore(tmp_path / f"c{rank}"),
                              make_runtime("cpu")) for rank in range(3)]
    errors: list[BaseException] = []
    answers: dict[int, str] = {}
    again: dict[int, int] = {}

    def rank_main(rank: int) -> None:
        try:
            Pipeline._run_stages(runners[rank], data, group.member(rank))
            # a second exchange moves no entry: rank 0 asks only for what it lacks
            again[rank] = result_exchange.send_results_to_main(runners[rank], Shard(data, rank, 3),
                                                               group.member(rank)).sent_entries
            if rank == 0:  # SQLite connections stay in the thread that opened them
                answers.update({item.question_id: outputs["next"].answer
                                for item, outputs in runners[0].results(data)})
        except BaseException as error:  # noqa: BLE001  (reported by the main thread)
            errors.append(error)
            group.meeting.abort()
        finally:
            runners[rank].store.close()

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(3)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        for name in names:
            unregister_stage(name)
    assert not errors, errors
    assert answers == neighbours.expected(ids)
    assert again == {0: 0, 1: 0, 2: 0}
    usage = {u.stage: u.entries for u in CacheStore(tmp_path / "c0").usage()}
    assert usage == {"test_neighbour_tag": 26, "test_neighbour_next": 26}
    # ranks 1 and 2 computed their own shares and fetched only the neighbours' tags they lacked
    assert {u.stage: u.entries for u in CacheStore(tmp_path / "c1").usage()}["test_neighbour_next"] == 9


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def _node(rank: int, port: int, command: list[str], *, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
         "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), *command],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


def _wait(node: subprocess.Popen, timeout: float = 420) -> tuple[int, str]:
    try:
        output, _ = node.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(node.pid, signal.SIGKILL)
        output, _ = node.communicate()
        pytest.fail(f"a node did not finish within {timeout} s:\n{output[-3000:]}")
    return node.returncode, output


def _run_pnp_two_nodes(tmp_path: Path, tag: str, logs: dict[int, Path] | None = None) -> list[tuple[int, str]]:
    port = _free_port()
    nodes = [
        _node(rank, port, ["-m", "capvqa", *COMMON, "--cache-dir", str(tmp_path / f"node{rank}-cache"),
                           "--out", str(tmp_path / f"node{rank}-{tag}")],
              env=_env(**({"CAPVQA_COMMIT_LOG": str(logs[rank])} if logs else {})))
        for rank in (0, 1)
    ]
    return [_wait(node) for node in nodes]


def _records(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]


def _single_run(tmp_path: Path) -> Path:
    done = subprocess.run([sys.executable, "-m", "capvqa", *COMMON, "--cache-dir", str(tmp_path / "single-cache"),
                           "--out", str(tmp_path / "single")], capture_output=True, text=True, timeout=420,
                          env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / "single"


def _committed(log: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            counts[entry["stage"]] = counts.get(entry["stage"], 0) + len(entry["keys"])
    return counts


@pytest.mark.slow
def test_two_nodes_with_their_own_caches_equal_one_process(tmp_path, tiny_zoo):
    logs = {rank: tmp_path / f"commits{rank}.jsonl" for rank in (0, 1)}
    (status0, output0), (status1, output1) = _run_pnp_two_nodes(tmp_path, "run", logs)
    assert status0 == 0, output0[-3000:]
    assert status1 == 0, output1[-3000:]
    single = _single_run(tmp_path)

    assert json.loads((tmp_path / "node0-run" / "predictions.json").read_text()) == \
        json.loads((single / "predictions.json").read_text())
    assert_records_match(_records(tmp_path / "node0-run"), _records(single))
    assert not (tmp_path / "node1-run").exists()  # only rank 0 writes the run folder
    # each node computed its own half, and rank 0's cache now holds every result: a rerun there alone
    # (the fallback when a multi-node job cannot be launched again) recomputes nothing
    assert _committed(logs[0]) == _committed(logs[1]) == {"matching": 4, "captioning": 4, "reader": 4}
    node0, node1 = (CacheStore(tmp_path / f"node{rank}-cache") for rank in (0, 1))
    assert sum(u.entries for u in node0.usage()) == 24 and sum(u.entries for u in node1.usage()) == 12
    alone = subprocess.run([sys.executable, "-m", "capvqa", *COMMON, "--cache-dir", str(tmp_path / "node0-cache"),
                            "--out", str(tmp_path / "alone")], capture_output=True, text=True, timeout=420, env=_env())
    assert alone.returncode == 0, alone.stderr[-3000:]
    timings = json.loads((tmp_path / "alone" / "timings.json").read_text())
    assert all(stage["computed"] == 0 for stage in timings["stages"].values())


SLOW_CAPTIONING = """
import sys, time
from capvqa.cli import main
from capvqa.stages.patch_captioning import PatchCaptioning

original = PatchCaptioning.run

def slow_run(self, batch):  # one second per batch: node 1 is surely killed inside this stage
    time.sleep(1.0)
    return original(self, batch)

PatchCaptioning.run = slow_run
sys.argv = ["capvqa", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_a_node_killed_mid_run_resumes_from_its_own_cache(tmp_path, tiny_zoo):
    first_logs = {rank: tmp_path / f"first{rank}.jsonl" for rank in (0, 1)}
    slow = tmp_path / "slow_captioning.py"
    slow.write_text(SLOW_CAPTIONING)
    port = _free_port()
    nodes = [
        _node(rank, port, [str(slow), *COMMON, "--batch-size", "1", "--cache-dir", str(tmp_path / f"node{rank}-cache"),
                           "--out", str(tmp_path / f"node{rank}-run")],
              env=_env(CAPVQA_COMMIT_LOG=str(first_logs[rank])))
        for rank in (0, 1)
    ]
    deadline = time.monotonic() + 300
    while "captioning" not in _committed(first_logs[1]):  # node 1 finished matching, is captioning
        if time.monotonic() > deadline or nodes[1].poll() is not None:
            for node in nodes:
                os.killpg(node.pid, signal.SIGKILL)
            pytest.fail("node 1 never reached the captioning stage:\n" + nodes[1].communicate()[0][-3000:])
        time.sleep(0.05)
    # the worker runs in a session of its own (torchrun starts it so): kill it by the pid it logged,
    # then its launcher
    worker = json.loads(first_logs[1].read_text().splitlines()[0])["pid"]
    os.kill(worker, signal.SIGKILL)
    os.killpg(nodes[1].pid, signal.SIGKILL)
    nodes[1].communicate()
    try:  # rank 0 notices the lost peer at its next collective; it must not be left running
        nodes[0].communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(nodes[0].pid, signal.SIGKILL)
        nodes[0].communicate()
    before = _committed(first_logs[1])
    assert before["matching"] == 4 and 1 <= before["captioning"] < 4 and before.get("reader", 0) == 0

    second_logs = {rank: tmp_path / f"second{rank}.jsonl" for rank in (0, 1)}
    (status0, output0), (status1, output1) = _run_pnp_two_nodes(tmp_path, "run", second_logs)
    assert status0 == 0, output0[-3000:]
    assert status1 == 0, output1[-3000:]
    resumed = _committed(second_logs[1])
    assert "matching" not in resumed  # node 1's finished stage came from its own cache
    assert resumed.get("captioning", 0) == 4 - before["captioning"] and resumed["reader"] == 4
    single = _single_run(tmp_path)
    assert json.loads((tmp_path / "node0-run" / "predictions.json").read_text()) == \
        json.loads((single / "predictions.json").read_text())
    assert_records_match(_records(tmp_path / "node0-run"), _records(single))


@pytest.mark.slow
def test_a_stage_reading_the_next_item_gets_the_other_nodes_results(tmp_path):
    """The fake tag/next stages of tests/test_neighbour_inputs.py on two nodes with separate caches: every
    item's next item is on the other node, so without the neighbour exchange no item could be answered."""
    sys.path.insert(0, str(Path(__file__).parent))
    import test_neighbour_inputs as neighbours

    config = tmp_path / "neighbours.yaml"
    config.write_text(yaml.safe_dump({
        "name": "neighbours", "models": {},
        "stages": {"tag": {"type": "NeighbourTag"}, "next": {"type": "NeighbourNext", "inputs": {"tag": "tag"}}},
        "answer": "next"}))
    script = tmp_path / "node.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_neighbour_inputs as t
        from capvqa import Pipeline, register_stage

        register_stage(t.TagStage, "NeighbourTag")
        register_stage(t.NextStage, "NeighbourNext")
        node = os.environ["GROUP_RANK"]
        Pipeline.from_yaml({str(config)!r}).run(t.items(list(range(1, 8))),
                                                cache_dir={str(tmp_path)!r} + "/cache" + node,
                                                out_dir={str(tmp_path)!r} + "/out" + node)
    """))
    port = _free_port()
    env = _env(PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    results = [_wait(node) for node in [_node(rank, port, [str(script)], env=env) for rank in (0, 1)]]
    for status, output in results:
        assert status == 0, output[-3000:]
    predictions = json.loads((tmp_path / "out0" / "predictions.json").read_text())
    assert {int(p["question_id"]): p["answer"] for p in predictions} == neighbours.expected(list(range(1, 8)))
    assert not (tmp_path / "out1").exists()

