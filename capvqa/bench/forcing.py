"""What ``capvqa bench`` forces on the stages it measures, so that runs are comparable.

Random weights would decide how long a generation runs and how many caption candidates Img2LLM's ITM
filter keeps; real weights decide both from the image. The bench takes both decisions out of the
models' hands, on the stage objects of its own run only (no config, stage code or cache key changes):

- :func:`force_generation_lengths`: every ``generate`` call of a model runs to its maximum length
  (``min_new_tokens = max_new_tokens``, ``min_length = max_length``), so end-of-sequence never stops a row
  early; the stage asks for the length the bench set.
- :func:`force_filter_pass_share`: the in-loop ITM filter of Img2LLM
  (docs/methods.md#captions-and-the-itm-filter) still scores every candidate (its cost is measured),
  but the candidates that pass are a fixed share of those scored, spread evenly in the order scored:
  candidate j of a question passes when floor((j+1)·share) > floor(j·share). With share 0.5 every
  second candidate passes, so a question needs 200 candidates for its 100 captions (two rounds).
"""

from __future__ import annotations

import functools
import math
from typing import Any


def force_generation_lengths(stage: Any, model_of: Any) -> None:
    """After ``stage.setup``, make ``model_of(stage).generate`` run every row to its maximum length."""
    setup = stage.setup

    @functools.wraps(setup)
    def forced_setup(runtime: Any) -> None:
        setup(runtime)
        model = model_of(stage)
        generate = model.generate

        @functools.wraps(generate)
        def full_length(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("max_new_tokens") is not None:
                kwargs["min_new_tokens"] = kwargs["max_new_tokens"]
            if kwargs.get("max_length") is not None:
                kwargs["min_length"] = kwargs["max_length"]
            return generate(*args, **kwargs)

        model.generate = full_length

    stage.setup = forced_setup


def passes(index: int, share: float) -> bool:
    """Whether candidate ``index`` (0-based, in scoring order) passes at pass share ``share``."""
    return math.floor((index + 1) * share + 1e-9) > math.floor(index * share + 1e-9)


def draws_for_share(num_captions: int, share: float) -> int:
    """Candidates a question draws to keep ``num_captions`` at pass share ``share``: whole rounds of
    ``num_captions`` candidates, as the caption loop draws them."""
    needed = next(k for k in range(math.ceil(num_captions / share) - 1, 10**9)
                  if sum(passes(j, share) for j in range(k)) >= num_captions)
    return num_captions * math.ceil(needed / num_captions)


def force_filter_pass_share(stage: Any, share: float) -> None:
    """Make a :class:`~capvqa.stages.filtered_patch_captioning.FilteredPatchCaptioning` stage keep a fixed
    ``share`` of each question's candidates: probabilities are computed as always, then replaced by 1.0
    (pass) or 0.0 (fail) in the fixed pattern of :func:`passes` over the question's own candidates.

    The probabilities of a chunk come without their questions, so the caption loop is followed as it
    runs (capvqa/stages/filtered_patch_captioning.py ``run``): each round, every question that has fewer
    than ``num_captions`` captions draws ``min(num_captions, max_draws - draws)`` candidates, question by
    question. The state restarts with every ``run``, so the timed and the counting pass make the same
    decisions. (A passing candidate that repeats a kept caption is not kept; with random captions of
    pseudo-words that does not happen, and it would shift only the attribution, not the determinism.)
    """
    cfg = stage.config
    state: dict[str, Any] = {}
    run, match = stage.run, stage.match_probabilities

    @functools.wraps(run)
    def counted_run(batch: Any) -> Any:
        state.update(draws=[0] * len(batch), kept=[0] * len(batch), round=[], left=0)
        return run(batch)

    def next_row() -> int:
        if not state["round"]:  # a new round: every unfinished question, in order
            state["round"] = [(i, min(cfg.num_captions, cfg.max_draws - state["draws"][i]))
                              for i in range(len(state["draws"]))
                              if state["kept"][i] < cfg.num_captions and state["draws"][i] < cfg.max_draws]
            state["left"] = state["round"][0][1]
        item = state["round"][0][0]
        state["left"] -= 1
        if state["left"] == 0:
            state["round"].pop(0)
            state["left"] = state["round"][0][1] if state["round"] else 0
        return item

    @functools.wraps(match)
    def fixed_share(chunk: Any) -> list[float]:
        probabilities = match(chunk)
        decisions = []
        for _ in probabilities:
            item = next_row()
            passed = passes(state["draws"][item], share)
            state["draws"][item] += 1
            state["kept"][item] += int(passed and state["kept"][item] < cfg.num_captions)
            decisions.append(1.0 if passed else 0.0)
        return decisions

    stage.run, stage.match_probabilities = counted_run, fixed_share
