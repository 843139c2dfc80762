"""Stages that read the next item's upstream result (``NEIGHBOUR_INPUTS``, capvqa/engine/stage.py).

The neighbour is the next item of the run in dataset order, wrapping, passing over skipped items; it is
the same whatever the batch size, the runner's windows, the shard or a resumption, and its key is part of
the reading stage's cache key. A fake pair of stages shows it item by item; Img2LLM shows it on the tiny zoo.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from PIL import Image

from capvqa import Pipeline, open_dataset
from capvqa.data.images import load_image
from capvqa.data.items import ImageRef, VQAItem
from capvqa.engine import runner as runner_module
from capvqa.engine.distributed import Shard
from capvqa.engine.keys import stage_item_key
from capvqa.engine.registry import register_stage, stage_contract_problems, unregister_stage
from capvqa.engine.runner import BoundStage, PipelineRunner
from capvqa.engine.runtime import make_runtime
from capvqa.engine.stage import non_semantic
from capvqa.engine.store import CacheStore
from capvqa.errors import ConfigError, DataError

# --------------------------------------------------------------------------------------------------
# A fake pair of stages: "tag" names each item, "next" answers "own tag->next item's tag"


@dataclass(frozen=True)
class TagConfig:
    salt: str = ""
    batch_size: int = non_semantic(2)


@dataclass(frozen=True)
class Tag:
    tag: str


class TagStage:
    """Decodes each image (a corrupt one is skipped under on_bad_image=skip) and tags the item by its id."""

    NAME: ClassVar[str] = "test_neighbour_tag"
    VERSION: ClassVar[str] = "1"
    INPUTS: ClassVar[tuple[str, ...]] = ()
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ()
    Config = TagConfig
    Output = Tag

    def __init__(self, config: TagConfig | None = None) -> None:
        self.config = config or TagConfig()

    def setup(self, runtime) -> None:
        pass

    def run(self, batch):
        for entry in batch:
            load_image(entry.item.image, expected_sha256=entry.content_sha256)
        return [Tag(tag=f"{entry.item.question_id}{self.config.salt}") for entry in batch]

    def cleanup(self) -> None:
        pass


@dataclass(frozen=True)
class NextConfig:
    batch_size: int = non_semantic(2)


@dataclass(frozen=True)
class Next:
    answer: str


class NextStage:
    NAME: ClassVar[str] = "test_neighbour_next"
    VERSION: ClassVar[str] = "1"
    INPUTS: ClassVar[tuple[str, ...]] = ("tag",)
    NEIGHBOUR_INPUTS: ClassVar[tuple[str, ...]] = ("tag",)
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ()
    Config = NextConfig
    Output = Next
    fail_on_batch: ClassVar[int | None] = None  # a test's simulated crash
    batches: ClassVar[int] = 0

    def __init__(self, config: NextConfig | None = None) -> None:
        self.config = config or NextConfig()

    def setup(self, runtime) -> None:
        pass

    def run(self, batch):
        NextStage.batches += 1
        if NextStage.fail_on_batch is not None and NextStage.batches >= NextStage.fail_on_batch:
            raise KeyboardInterrupt("simulated interruption")
        return [Next(answer=f"{e.upstream['tag'].tag}->{e.neighbours['tag'].tag}") for e in batch]

    def cleanup(self) -> None:
        pass


@pytest.fixture
def config_path(tmp_path):
    names = [register_stage(TagStage, "NeighbourTag"), register_stage(NextStage, "NeighbourNext")]
    NextStage.fail_on_batch, NextStage.batches = None, 0
    path = tmp_path / "neighbours.yaml"
    path.write_text(yaml.safe_dump({
        "name": "neighbours", "models": {},
        "stages": {"tag": {"type": "NeighbourTag"}, "next": {"type": "NeighbourNext", "inputs": {"tag": "tag"}}},
        "answer": "next"}))
    yield path
    for name in names:
        unregister_stage(name)
    NextStage.fail_on_batch = None


def png(value: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (4, 4), (value % 256, value // 256, 7)).save(out, format="PNG")
    return out.getvalue()


def items(ids, bad: dict | None = None) -> list[VQAItem]:
    bad = bad or {}
    return [VQAItem(question_id=i, image_id=i, question=f"what is {i}?", image=bad.get(i, ImageRef(data=png(i))))
            for i in ids]


def run(config_path, data, cache, **options):
    batch_size = options.pop("batch_size", None)
    return Pipeline.from_yaml(config_path, batch_size=batch_size).run(data, cache_dir=cache, **options)


def next_stats(result):
    return next(s for s in result.stage_stats if s.name == "next")


def expected(ids):
    return {i: f"{i}->{ids[(n + 1) % len(ids)]}" for n, i in enumerate(ids)}


# --------------------------------------------------------------------------------------------------


def test_the_neighbour_is_the_next_item_wrapping_at_the_end(config_path, tmp_path):
    ids = [5, 3, 9, 1, 4]  # dataset order, not id order
    result = run(config_path, items(ids), tmp_path / "c")
    assert result.predictions == expected(ids) and result.predictions[4] == "4->5"


def test_a_one_item_run_is_its_own_neighbour(config_path, tmp_path):
    assert run(config_path, items([7]), tmp_path / "c").predictions == {7: "7->7"}


def test_batch_size_and_windows_do_not_change_the_neighbour(config_path, tmp_path, monkeypatch):
    ids = list(range(1, 12))
    wide = run(config_path, items(ids), tmp_path / "wide", batch_size=8)
    monkeypatch.setattr(runner_module, "WINDOW_BATCHES", 1)  # windows of one or two items
    for batch_size in (1, 2):
        narrow = run(config_path, items(ids), tmp_path / f"narrow{batch_size}", batch_size=batch_size)
        assert narrow.predictions == wide.predictions == expected(ids)
        assert next_stats(narrow).computed == len(ids)


def test_a_changed_neighbour_recomputes_the_item_and_nothing_else(config_path, tmp_path):
    cache = tmp_path / "c"
    assert run(config_path, items([1, 2, 3]), cache).predictions == expected([1, 2, 3])
    changed = run(config_path, items([1, 2, 4]), cache)  # 2's neighbour is now 4; 1's is still 2
    assert changed.predictions == expected([1, 2, 4])
    assert (next_stats(changed).computed, next_stats(changed).cached) == (2, 1)  # items 2 and 4
    tag = next(s for s in changed.stage_stats if s.name == "tag")
    assert (tag.computed, tag.cached) == (1, 2)
    again = run(config_path, items([1, 2, 3]), cache)  # every earlier result is still keyed as it was
    assert next_stats(again).computed == 0 and again.predictions == expected([1, 2, 3])


def test_the_key_holds_the_neighbours_upstream_key(config_path, tmp_path):
    """A reading stage's key = its own inputs' keys plus the next item's key of each neighbour input, so a
    changed upstream result of the next item (here every tag, through a setting) changes the key."""
    data = items([1, 2])
    keys = {}
    for overrides in ([], ["tag.salt=x"]):
        bound = Pipeline.from_yaml(config_path, overrides=overrides).build_stages()
        with closing(CacheStore(tmp_path / "c")) as store:
            runner = PipelineRunner(bound, store, make_runtime("cpu"))
            runner._rings["next"] = runner.neighbour_ring(data)
            first, second = runner.keyed(data[0]), runner.keyed(data[1])
        assert runner._rings["next"].next_of("1") == ("2", second.item_key)
        assert first.neighbour_keys == {"next": {"tag": second.keys["tag"]}}
        assert first.keys["next"] == stage_item_key(bound[1].fingerprint, first.item_key,
                                                    {"tag": first.keys["tag"], "tag@next": second.keys["tag"]})
        keys[tuple(overrides)] = first.keys["next"]
    assert len(set(keys.values())) == 2


def test_resume_after_an_interruption_sees_the_same_neighbours(config_path, tmp_path):
    ids = list(range(1, 8))
    NextStage.fail_on_batch = 3  # batches of one: items 1 and 2 are committed, then the run stops
    with pytest.raises(KeyboardInterrupt):
        run(config_path, items(ids), tmp_path / "c", batch_size=1)
    NextStage.fail_on_batch = None
    resumed = run(config_path, items(ids), tmp_path / "c", batch_size=1)
    assert (next_stats(resumed).computed, next_stats(resumed).cached) == (5, 2)
    assert resumed.predictions == expected(ids)


def test_skipped_items_are_passed_over(config_path, tmp_path):
    """A missing file (skipped when hashed) and a corrupt image (skipped by the tag stage) are not anyone's
    neighbour: 2's is 5. The same on a rerun."""
    bad = {3: ImageRef(path=tmp_path / "missing.png"), 4: ImageRef(data=b"not an image")}
    for _ in range(2):
        result = run(config_path, items([1, 2, 3, 4, 5], bad), tmp_path / "c", on_bad_image="skip")
        assert result.predictions == {1: "1->2", 2: "2->5", 5: "5->1"}
        assert sorted(s.question_id for s in result.skipped) == [3, 4]


def test_duplicate_question_ids_are_refused_before_any_stage_runs(config_path, tmp_path):
    data = items([1, 2]) + items([1])
    with pytest.raises(DataError, match="question id 1 occurs twice"):
        run(config_path, data, tmp_path / "c")
    with closing(CacheStore(tmp_path / "c")) as store:
        assert store.usage() == []  # the stage before the neighbour reader did not run either


def test_shards_see_the_neighbours_of_the_whole_run(config_path, tmp_path):
    """Two ranks, simulated in one process on one cache (as torchrun's ranks share it): each maps the
    neighbours over all items, so an item at a shard's end reads the other shard's next item."""
    ids = list(range(1, 8))
    data = items(ids)
    runtime = make_runtime("cpu")
    with closing(CacheStore(tmp_path / "c")) as store:
        pipeline = Pipeline.from_yaml(config_path)
        ranks = [PipelineRunner(pipeline.build_stages(), store, runtime) for _ in range(2)]
        for position in range(2):  # stage-major, every rank finishing a stage before the next starts
            for rank, runner in enumerate(ranks):
                runner.run_stage(runner.stages[position], Shard(data, rank, 2), dataset=data)
        fresh = PipelineRunner(pipeline.build_stages(), store, runtime)
        answers = {item.question_id: outputs["next"].answer for item, outputs in fresh.results(data)}
    assert answers == expected(ids)


@pytest.mark.slow
def test_torchrun_ranks_wait_for_each_other_and_agree(config_path, tmp_path):
    """Real torchrun, two ranks: rank 0 tags slowly, so rank 1 would read missing neighbours without the
    barrier before the neighbour-reading stage."""
    script = tmp_path / "ddp_neighbours.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_neighbour_inputs as t
        from capvqa import Pipeline, register_stage

        class SlowTag(t.TagStage):
            def run(self, batch):
                if os.environ["RANK"] == "0":
                    time.sleep(1.5)
                return super().run(batch)

        register_stage(SlowTag, "NeighbourTag")
        register_stage(t.NextStage, "NeighbourNext")
        Pipeline.from_yaml({str(config_path)!r}).run(t.items(list(range(1, 8))), cache_dir={str(tmp_path / "c")!r},
                                                    out_dir={str(tmp_path / "out")!r})
    """))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert {int(p["question_id"]): p["answer"] for p in predictions} == expected(list(range(1, 8)))


# --------------------------------------------------------------------------------------------------
# The contract


def test_the_contract_checks_neighbour_inputs():
    class Undeclared(NextStage):
        NEIGHBOUR_INPUTS = ("captions",)

    class NotATuple(NextStage):
        NEIGHBOUR_INPUTS = ["tag"]

    assert any("not in INPUTS" in p for p in stage_contract_problems(Undeclared))
    assert any("tuple" in p for p in stage_contract_problems(NotATuple))
    assert stage_contract_problems(NextStage) == []

    class Narrowing(NextStage):
        def __init__(self, config=None):
            super().__init__(config)
            self.NEIGHBOUR_INPUTS = ()

    assert BoundStage.create("next", Narrowing(), {"tag": "tag"}).neighbour_inputs == ()
    widening = NextStage()
    widening.NEIGHBOUR_INPUTS = ("tag", "other")
    with pytest.raises(ConfigError, match="not in INPUTS"):
        BoundStage.create("next", widening, {"tag": "tag"})
    with pytest.raises(ConfigError, match="may not contain '@'"):
        BoundStage.create("next", NextStage(), {"tag": "tag", "tag@next": "tag"})


def test_stages_without_neighbours_keep_their_keys(tiny_zoo, tmp_path):
    """No neighbour entry enters a key unless a stage reads neighbours: pnp-vqa's keys, and Img2LLM's with
    the paper variant, are the plain chain."""
    data = list(open_dataset("sample", limit=2))
    for name, overrides in (("pnp-vqa", []), ("img2llm", ["prompt.variant=paper"]), ("img2llm", ["task=okvqa"])):
        bound = Pipeline.from_yaml(name, overrides, models="tiny").build_stages()
        assert all(b.neighbour_inputs == () for b in bound)
        with closing(CacheStore(tmp_path / "c")) as store:
            keyed = PipelineRunner(bound, store, make_runtime("cpu")).keyed(data[0])
        chain: dict[str, str] = {}
        for b in bound:
            chain[b.name] = stage_item_key(b.fingerprint, keyed.item_key, {i: chain[s] for i, s in b.inputs.items()})
        assert keyed.keys == chain and keyed.neighbour_keys == {}


# --------------------------------------------------------------------------------------------------
# Img2LLM's authors prompt on the tiny zoo

# Settings that make the tiny zoo's random-weight models quick and leave every part of the prompt in it:
# threshold 0 keeps every caption (the centred tiny ITM keeps about half at 0.5); the tiny QG model writes
# 30 tokens of "<unused256>", about 320 OPT tokens per question, so max_length 8 leaves room for synthetic
# pairs next to the yes/no block in the tiny OPT's 2048 positions; three context captions and two answers
# keep the run short. The issue's exact command, without them, is checked by the test after this one.
TINY_IMG2LLM = ["caption_filter.threshold=0.0", "question_generation.max_length=8", "answer_extraction.num_answers=2",
                "prompt.num_context_captions=3"]


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]


def assert_authors_prompts(run_folder: Path, *, pairs_fit: bool = True) -> None:
    """Every prompt: the instruction as its own segment, then "Contexts:" and a caption as the script
    writes it, then the next item's yes-question answered "no", this item's answered "yes", the toilet,
    and only then the synthetic pairs."""
    from capvqa.stages.img2llm_prompt import (
        INSTRUCTION,
        authors_caption,
        authors_pairs,
        authors_question,
        lavis_pairs,
    )

    lines = records(run_folder)
    assert len(lines) > 1
    with_pairs = 0
    for index, line in enumerate(lines):
        stages = line["stages"]
        following = lines[(index + 1) % len(lines)]["stages"]
        prompt = stages["prompt"]["prompts"][0]
        (segments,) = stages["prompt"]["segments"]
        assert segments[0] == INSTRUCTION and "".join(segments) == prompt
        assert prompt.startswith(INSTRUCTION + "Contexts:")
        captions = stages["caption_filter"]["captions"]
        assert captions and stages["prompt"]["num_context_captions"] > 0
        # the first visit is the last answer ("yes"): its first caption, caption 0 when none mentions it
        # the pairs as LAVIS hands them to the script: the "yes" pair last
        questions, answers = lavis_pairs(stages["question_generation"]["questions"],
                                         stages["question_generation"]["answers"])
        next_questions, _ = lavis_pairs(following["question_generation"]["questions"],
                                        following["question_generation"]["answers"])
        first_caption = captions[(stages["answer_extraction"]["answer_captions"].get(answers[-1]) or [0])[0]]
        assert segments[1].startswith("Contexts:" + authors_caption(first_caption))
        block = ("Question:" + authors_question(next_questions[-1]) + "\nAnswer:no\n"
                 + "Question:" + authors_question(questions[-1]) + "\nAnswer:yes\n"
                 + "Question:Is this a toilet?\nAnswer:no\n")
        context_end = segments[1].index("\n") + 1
        assert segments[1][context_end:].startswith(block), segments[1][:600]
        pairs = authors_pairs(questions, answers, slots=30, max_answer_words=5)
        if stages["prompt"]["num_exemplars"] > 3:  # synthetic pairs kept: they follow the block
            assert segments[1][context_end + len(block):].startswith(pairs[0])
            with_pairs += 1
        assert prompt.endswith(f"Question:{line['question'].lower().strip()}\nAnswer:")
    assert with_pairs > 0 or not pairs_fit


@pytest.mark.slow
def test_img2llm_on_the_tiny_zoo_shows_the_next_items_yes_question(tiny_zoo, tmp_path):
    data = open_dataset("sample", limit=3)
    result = Pipeline.from_yaml("img2llm", TINY_IMG2LLM, models="tiny").run(
        data, cache_dir=tmp_path / "c", out_dir=tmp_path / "run")
    assert len(result.predictions) == 3
    assert_authors_prompts(tmp_path / "run")
    # a shorter run: the last item's neighbour is another item, so its prompt (and answer) are recomputed,
    # the others' are cached
    shorter = Pipeline.from_yaml("img2llm", TINY_IMG2LLM, models="tiny").run(
        open_dataset("sample", limit=2), cache_dir=tmp_path / "c", out_dir=tmp_path / "run2")
    prompt = next(s for s in shorter.stage_stats if s.name == "prompt")
    assert (prompt.computed, prompt.cached) == (1, 1)
    assert_authors_prompts(tmp_path / "run2")


@pytest.mark.slow
def test_acceptance_cli_run_writes_the_authors_prompts(tiny_zoo, tmp_path):
    """The issue's acceptance command (`capvqa run img2llm --dataset sample --models tiny --limit 6 --out
    R`), with the tiny-zoo settings above."""
    settings = [arg for override in TINY_IMG2LLM for arg in ("--set", override)]
    done = subprocess.run(
        [sys.executable, "-m", "capvqa", "run", "img2llm", "--dataset", "sample", "--models", "tiny", "--limit", "6",
         *settings, "--quiet", "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "R")],
        capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(records(tmp_path / "R")) == 6
    assert_authors_prompts(tmp_path / "R")


@pytest.mark.slow
def test_the_issues_exact_command(tiny_zoo, tmp_path):
    """`capvqa run img2llm --dataset sample --models tiny --limit 6 --out R`, as written: the prompts
    begin with the instruction, "Contexts:" and a capitalised caption, the next item's yes-question
    answered "no" is the first exemplar, and the toilet exemplar comes before any synthetic pair."""
    done = subprocess.run(
        [sys.executable, "-m", "capvqa", "run", "img2llm", "--dataset", "sample", "--models", "tiny", "--limit", "6",
         "--out", str(tmp_path / "R"), "--quiet", "--cache-dir", str(tmp_path / "c")],
        capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(records(tmp_path / "R")) == 6
    assert_authors_prompts(tmp_path / "R", pairs_fit=False)  # the tiny QG's long questions: pairs dropped to fit
