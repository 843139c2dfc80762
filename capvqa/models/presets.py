"""Model presets that swap every model role of a pipeline at once (``--models NAME``).

``hub`` keeps the hub ids the pipeline config names. ``tiny`` points every role at the offline tiny
zoo: random-weight models with the real architectures' structure, built locally and loaded back through
the normal ``from_pretrained`` path. Tiny-model answers are meaningless; they exist so the whole system
runs and is tested without downloads.
"""

from __future__ import annotations

from capvqa.errors import ConfigError

MODEL_PRESETS = ("hub", "tiny")

# pipeline roles that the tiny zoo serves under another name
TINY_ROLE_ALIASES = {"llm": "causal_lm"}


def apply_models_preset(preset: str, models: dict[str, str]) -> dict[str, str]:
    if preset == "hub":
        return dict(models)
    if preset == "tiny":
        from capvqa.synthetic.tiny_zoo import ensure_tiny_zoo

        zoo = ensure_tiny_zoo()
        zoo_role = {role: TINY_ROLE_ALIASES.get(role, role) for role in models}
        missing = sorted(role for role, name in zoo_role.items() if name not in zoo)
        if missing:
            raise ConfigError(f"the tiny zoo has no model for roles {missing}; it has {sorted(zoo)}")
        return {role: str(zoo[zoo_role[role]]) for role in models}
    raise ConfigError(f"unknown --models preset {preset!r}; valid: {list(MODEL_PRESETS)}")
