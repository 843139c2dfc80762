"""PICa's few-shot prompts: captioned training examples, then the captioned query (SPEC §3).

The text is exactly the original code's (``microsoft/PICa``, ``gpt3_api_okvqa.py``)::

    Please answer the question according to the above context.
    ===
    Context: {example caption}
    ===
    Q: {example question}
    A: {example answer}

    ===
    ... (n_shot examples)
    Context: {query caption}[. {tag}, {tag}, ...]
    ===
    Q: {question}
    A:

With tags on, the query context is the caption, ``". "`` and the comma-joined tag names -- as the
original builds ``caption + '. ' + ', '.join(tags)``; examples carry their caption alone. With
``n_ensemble`` > 1, prompt r takes the ranked examples [r*n_shot, (r+1)*n_shot); the answer stage keeps
the prompt whose answer has the highest summed log-probability. When the pool gave fewer examples than
``n_shot * n_ensemble``, the last prompts are shorter (never padded with repeats).

The text building is pure (:func:`pica_prompt`, :func:`query_context`); the stage only reads its inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from capvqa.engine.runtime import Runtime
from capvqa.engine.stage import StageInput, non_semantic
from capvqa.errors import ConfigError

PICA_HEADER = "Please answer the question according to the above context.\n===\n"


# ------------------------------------------------------------------------------------ pure helpers


def query_context(caption: str, tags: Sequence[str] = ()) -> str:
    """The query's context line: the caption, plus ``". "`` and the comma-joined tags when there are any."""
    return f"{caption}. {', '.join(tags)}" if tags else caption


def example_block(caption: str, question: str, answer: str) -> str:
    return f"Context: {caption}\n===\nQ: {question}\nA: {answer}\n\n===\n"


def pica_prompt(context: str, question: str, examples: Sequence[Mapping[str, Any]]) -> str:
    """One PICa prompt: header, each example (``caption``, ``question``, ``answer``), then the query."""
    blocks = "".join(example_block(e["caption"], e["question"], e["answer"]) for e in examples)
    return f"{PICA_HEADER}{blocks}Context: {context}\n===\nQ: {question}\nA:"


def ensemble_slices(examples: Sequence[Any], n_shot: int, n_ensemble: int) -> list[list[Any]]:
    """Prompt r's examples: ranks [r*n_shot, (r+1)*n_shot) of the ranked list."""
    return [list(examples[r * n_shot : (r + 1) * n_shot]) for r in range(n_ensemble)]


def caption_text(record: Any) -> str:
    """The caption carried by an upstream record: ``ImageCaption.caption``, or the first of a
    ``Captions.captions`` list (so question-guided captions can stand in)."""
    caption = getattr(record, "caption", None)
    if isinstance(caption, str):
        return caption
    captions = getattr(record, "captions", None)
    if isinstance(captions, list) and captions:
        return str(captions[0])
    raise TypeError(
        f"the 'caption' input must carry .caption or a non-empty .captions, got {type(record).__name__}"
    )


# ------------------------------------------------------------------------------------------ stage


@dataclass(frozen=True)
class PicaPromptConfig:
    n_shot: int = 16
    n_ensemble: int = 1
    use_tags: bool = False  # needs a "tags" input (e.g. the clip_tags stage)
    batch_size: int = non_semantic(256)

    def __post_init__(self) -> None:
        if self.n_shot < 0 or self.n_ensemble < 1:
            raise ConfigError(
                f"need n_shot >= 0 and n_ensemble >= 1, got {self.n_shot} and {self.n_ensemble}"
            )


@dataclass(frozen=True)
class PicaPrompts:
    """``n_ensemble`` prompts for one question (the LLM answer stage reads ``prompts``), and how many
    in-context examples they hold in total."""

    prompts: list[str]
    num_examples: int


class PicaPrompt:
    NAME: ClassVar[str] = "pica_prompt"
    VERSION: ClassVar[str] = "1"
    INPUTS: ClassVar[tuple[str, ...]] = ("caption", "examples")  # plus "tags" when use_tags is on
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ()
    Config = PicaPromptConfig
    Output = PicaPrompts

    def __init__(self, config: PicaPromptConfig | None = None, **overrides: Any) -> None:
        self.config = config or PicaPromptConfig(**overrides)

    def setup(self, runtime: Runtime) -> None:
        pass  # no model

    def run(self, batch: Sequence[StageInput]) -> list[PicaPrompts]:
        return [self.prompts_for(entry) for entry in batch]

    def prompts_for(self, entry: StageInput) -> PicaPrompts:
        cfg = self.config
        tags: list[str] = []
        if cfg.use_tags:
            record = entry.upstream.get("tags")
            if record is None:
                raise ConfigError(
                    "pica_prompt has use_tags on but no 'tags' input; wire a clip_tags stage as "
                    "inputs: {tags: ...} or set use_tags to false"
                )
            tags = list(record.tags)
        context = query_context(caption_text(entry.upstream["caption"]), tags)
        selected = entry.upstream["examples"]
        selection = (getattr(selected, "n_shot", None), getattr(selected, "n_ensemble", None))
        if None not in selection and selection != (cfg.n_shot, cfg.n_ensemble):
            raise ConfigError(
                f"pica_prompt slices n_shot={cfg.n_shot} x n_ensemble={cfg.n_ensemble} but the examples were "
                f"selected for n_shot={selection[0]} x n_ensemble={selection[1]}; set both stages alike "
                "(e.g. --set examples.n_ensemble=5 --set prompt.n_ensemble=5)"
            )
        slices = ensemble_slices(selected.examples, cfg.n_shot, cfg.n_ensemble)
        return PicaPrompts(
            prompts=[pica_prompt(context, entry.item.question, examples) for examples in slices],
            num_examples=sum(len(examples) for examples in slices),
        )

    def cleanup(self) -> None:
        pass
