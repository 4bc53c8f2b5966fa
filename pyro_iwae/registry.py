"""Models and guides by name, so that a front end can choose them with a string."""

from __future__ import annotations

from collections.abc import Callable

import torch

Builder = Callable[..., torch.nn.Module]

MODELS: dict[str, Builder] = {}
GUIDES: dict[str, Builder] = {}


def _register(table: dict[str, Builder], kind: str) -> Callable[[str], Callable]:
    def register(name: str) -> Callable[[Builder], Builder]:
        def decorate(builder: Builder) -> Builder:
            if name in table:
                raise ValueError(f"a {kind} named {name!r} is registered already")
            table[name] = builder
            return builder

        return decorate

    return register


#: ``@register_model(name)``: a builder ``(x_dim, stochastic_layers, data_mean)``.
register_model = _register(MODELS, "model")
#: ``@register_guide(name)``: a builder ``(x_dim, stochastic_layers)``.
register_guide = _register(GUIDES, "guide")


def _build(
    table: dict[str, Builder], kind: str, name: str, **config
) -> torch.nn.Module:
    if name not in table:
        raise ValueError(
            f"unknown {kind} {name!r}; registered: {', '.join(sorted(table))}"
        )
    return table[name](**config)


def build_model(name: str, **config) -> torch.nn.Module:
    """Builds the model registered as ``name`` with keyword ``config``."""
    return _build(MODELS, "model", name, **config)


def build_guide(name: str, **config) -> torch.nn.Module:
    """Builds the guide registered as ``name`` with keyword ``config``."""
    return _build(GUIDES, "guide", name, **config)
