"""``capvqa config show|validate``: a pipeline config as it will run, checked, without loading anything.

Both resolve the config exactly as ``capvqa run`` does (``extends:`` merged, the models preset and the
``--set`` overrides applied, stages in execution order, every parameter bound to its stage's config and
the stages checked together), and neither loads a model or a dataset.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True)

PipelineArgument = Annotated[
    str, typer.Argument(help="Pipeline name (pipelines/NAME.yaml), a path to a .yaml config, or a run folder.")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key: stage.param=value, models.ROLE=ID, seed=N, task=T."),
]
ModelsOption = Annotated[
    str | None, typer.Option(help="Model preset for every role: hub (config's ids) or tiny (offline tiny models).")
]


@app.command("show")
def show(pipeline: PipelineArgument, set_: SetOption = None, models: ModelsOption = None) -> None:
    """Print the resolved config as YAML, loadable again (capvqa run FILE, capvqa config show FILE)."""
    import yaml

    from capvqa.engine.config import load_spec

    spec = load_spec(pipeline, tuple(set_ or ()), models_preset=models)
    sys.stdout.write(yaml.safe_dump(spec.to_dict(), sort_keys=False, allow_unicode=True))


@app.command("validate")
def validate(pipeline: PipelineArgument, set_: SetOption = None, models: ModelsOption = None) -> None:
    """Check the config (every stage parameter bound and typed, the stages checked together): "ok" and a
    one-line summary, or the problem and exit status 2."""
    from capvqa.cli.console import print_text
    from capvqa.engine.config import load_spec

    spec = load_spec(pipeline, tuple(set_ or ()), models_preset=models)
    print_text(f"ok: {summary(spec)}")


def summary(spec) -> str:
    """One line: name, method, stage order, answer stage, task, seed and models."""
    method = f" ({spec.method})" if spec.method else ""
    stages = " -> ".join(stage.name for stage in spec.stages)
    models = ", ".join(f"{role}={model}" for role, model in spec.models.items()) or "none"
    preset = f" (preset {spec.models_preset})" if spec.models_preset else ""
    return (
        f"{spec.name}{method}: {len(spec.stages)} stages {stages}; answer from {spec.answer}; "
        f"task {spec.task}; seed {spec.seed}; models{preset}: {models}"
    )
