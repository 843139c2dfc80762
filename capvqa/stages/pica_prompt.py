"""PICa's few-shot prompts: captioned training examples, then the query (docs/methods.md#the-pica-prompt).

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

The stage has no setting of its own that changes the text; everything follows from its inputs, so no
setting has to be stated twice:

- ``n_shot`` and ``n_ensemble`` are read from the ``examples`` record
  (:class:`~capvqa.stages.example_selection.InContextExamples`), i.e. set once on the selection stage
  (``--set examples.n_shot=8``);
- tags are used exactly when a ``tags`` input is wired (``inputs: {caption: ..., examples: ..., tags:
  ...}`` as in ``pica-full``): the query context is then the caption, ``". "`` and the comma-joined tag
  names -- as the original builds ``caption + '. ' + ', '.join(tags)``, so an image without any tag
  still gets the ``". "`` (context ``"a dog. "``); examples carry their caption alone.

With ``n_ensemble`` > 1, prompt r takes the ranked examples [r*n_shot, (r+1)*n_shot); the answer stage
keeps the prompt whose answer has the highest summed log-probability. When the pool gave fewer examples
than ``n_shot * n_ensemble``, the last prompts are shorter (never padded with repeats).

Run configs saved before this (``config.yaml`` with ``prompt.n_shot``, ``prompt.n_ensemble`` or
``prompt.use_tags``) are rejected when loaded, naming those keys: delete them (the selection's
``n_shot``/``n_ensemble`` in the same file are what the prompts used, and ``use_tags: true`` went with a
wired ``tags`` input).

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


def query_context(caption: str, tags: Sequence[str] | None = None) -> str:
    """The query's context line: the caption alone without tags (None: no ``tags`` input wired), else the
    caption, ``". "`` and the comma-joined tags -- also for an empty list, which gives ``caption + ". "``
    exactly as the original's ``caption + '. ' + ', '.join(tags)`` does."""
    return caption if tags is None else f"{caption}. {', '.join(tags)}"


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
    """No semantic setting: shots and ensemble come from the ``examples`` record, tags from the wiring."""

    batch_size: int = non_semantic(256)


@dataclass(frozen=True)
class PicaPrompts:
    """``n_ensemble`` prompts for one question (the LLM answer stage reads ``prompts``), and how many
    in-context examples they hold in total."""

    prompts: list[str]
    num_examples: int


class PicaPrompt:
    NAME: ClassVar[str] = "pica_prompt"
    # 2: with tags wired, an image without tags gets caption + ". " (the reference's), not the caption alone
    VERSION: ClassVar[str] = "2"
    INPUTS: ClassVar[tuple[str, ...]] = ("caption", "examples")
    OPTIONAL_INPUTS: ClassVar[tuple[str, ...]] = ("tags",)  # wired: the query context carries the tags
    # checked when the config loads: the slicing comes from the examples record, so it must carry it
    INPUT_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "examples": ("examples", "n_shot", "n_ensemble"),
        "tags": ("tags",),
    }
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
        unknown = sorted(set(entry.upstream) - {*self.INPUTS, *self.OPTIONAL_INPUTS})
        if unknown:
            raise ConfigError(
                f"{self.NAME} reads the inputs {list(self.INPUTS)} and optionally "
                f"{list(self.OPTIONAL_INPUTS)}, but is wired to {unknown}; rename or remove them in the stage's "
                "inputs"
            )
        tags_record = entry.upstream.get("tags")
        tags = list(tags_record.tags) if tags_record is not None else None
        context = query_context(caption_text(entry.upstream["caption"]), tags)
        selected = entry.upstream["examples"]
        slices = ensemble_slices(selected.examples, selected.n_shot, selected.n_ensemble)
        return PicaPrompts(
            prompts=[pica_prompt(context, entry.item.question, examples) for examples in slices],
            num_examples=sum(len(examples) for examples in slices),
        )

    def cleanup(self) -> None:
        pass
