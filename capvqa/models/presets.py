"""Model presets that swap every model role of a pipeline at once (``--models NAME``).

``hub`` keeps the hub ids the pipeline config names. ``tiny`` points every role at the offline tiny
zoo: random-weight models with the real architectures' structure, built locally and loaded back through
the normal ``from_pretrained`` path. Tiny-model answers are meaningless; they exist so the whole system
runs and is tested without downloads.
"""

from __future__ import annotations

from capvqa.errors import ConfigError

MODEL_PRESETS = ("hub", "tiny")


def apply_models_preset(preset: str, models: dict[str, str]) -> dict[str, str]:
    if preset == "hub":
        return dict(models)
    if preset == "tiny":
        from capvqa.models.tiny_zoo import ensure_tiny_zoo

        zoo = ensure_tiny_zoo()
        missing = sorted(set(models) - set(zoo))
        if missing:
            raise ConfigError(f"the tiny zoo has no model for roles {missing}; it has {sorted(zoo)}")
        return {role: str(zoo[role]) for role in models}
    raise ConfigError(f"unknown --models preset {preset!r}; valid: {list(MODEL_PRESETS)}")
