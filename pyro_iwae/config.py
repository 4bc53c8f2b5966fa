"""The settings of a run: :class:`RunConfig`, checked when it is made, saved as
``config.json`` in the run directory.

The rules of which settings go together live here, in :data:`_APPLIES_WITH`
and :meth:`RunConfig.validate`, so that the Python API and the command line
refuse the same settings with the same messages.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pyro.infer import ELBO

from .checkpoints import RunError, write_json
from .data import BINARIZATIONS, DATASETS, Dataset, load_dataset
from .errors import one_line
from .guides import ZOO
from .likelihoods import check_likelihood
from .models import architecture
from .networks import ACTIVATIONS
from .registry import BuilderError, resolve
from .schedules import (
    IW_OBJECTIVES,
    ConfigError,
    Schedule,
    make_objective,
    make_schedule,
)

__all__ = ["CONFIG_FILE", "RunConfig"]

CONFIG_FILE = "config.json"

#: Settings that take effect only with some values of another setting:
#: field -> (that setting, those values, what to do instead). ``{field}`` in
#: the last names a setting (see :class:`~pyro_iwae.ConfigError`).
_APPLIES_WITH: dict[str, tuple[str, tuple[str, ...], str]] = {
    "epochs": ("schedule", ("constant",), "use {stages} with {schedule} paper"),
    "stages": ("schedule", ("paper",), "add {schedule} paper, or use {epochs}"),
    "estimator": ("objective", IW_OBJECTIVES, "drop it"),
    "num_groups": ("objective", ("miwae", "piwae"), "drop it"),
    "beta": ("objective", ("ciwae",), "drop it"),
    "alpha": ("objective", ("renyi",), "drop it"),
    "sigma": ("likelihood", ("gaussian",), "drop it"),
    "compile": ("objective", IW_OBJECTIVES, "drop it"),
}

#: The architecture settings passed to model and guide builders (the likelihood
#: and its sigma to models only) where they differ from their defaults.
ARCHITECTURE_SETTINGS = ("hidden", "activation", "latent_dim")
LIKELIHOOD_SETTINGS = ("likelihood", "sigma")


@dataclasses.dataclass
class RunConfig:
    """Everything needed to rebuild a run's model, guide, data and training.

    Saved as ``config.json`` in the run directory. ``dataset`` is a built-in
    name or the path of a data file (see :func:`pyro_iwae.data.load_dataset`,
    with ``binarize``, None for the default: ``"dynamic"`` for the built-in
    image sets with the Bernoulli likelihood, ``"none"`` otherwise, and
    ``test_fraction``). ``model`` and ``guide`` are registry names, import
    paths or entry points (see :func:`pyro_iwae.registry.resolve`), built with
    ``likelihood`` (and ``sigma``: None learns it), ``hidden`` (None: the
    paper's), ``activation`` and ``latent_dim`` (None: the paper's) where these
    differ from their defaults. ``epochs`` applies to the
    ``constant`` schedule, ``stages`` (None: all 8) to the ``paper`` schedule,
    whose first stage runs at ``lr``. ``train_limit`` keeps the first training
    points (None: all); ``test_limit`` test points give the per-epoch test bound.
    ``device`` is where the run was trained (``"cpu"``, ``"cuda"``).

    Made, the config is checked (see :meth:`validate`).

    :raises ConfigError: for settings that do not go together.
    :raises ValueError: for a schedule or objective that cannot be built.
    """

    dataset: str = "mnist-mini"
    data_dir: str | None = None
    stochastic_layers: int = 1
    model: str = "paper"
    guide: str = "paper"
    likelihood: str = "bernoulli"
    sigma: float | None = None
    hidden: list[int] | None = None
    activation: str = "tanh"
    latent_dim: int | None = None
    binarize: str | None = None
    test_fraction: float = 0.1
    objective: str = "iwae"
    estimator: str = "iwae"
    num_particles: int = 5
    alpha: float = 0.0
    num_groups: int = 1
    beta: float = 0.5
    schedule: str = "constant"
    stages: int | None = None
    epochs: int = 5
    batch_size: int = 100
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    x_dim: int = 784
    train_limit: int | None = None
    test_limit: int = 1000
    checkpoint_every: int | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        if self.hidden is not None and not isinstance(self.hidden, list):
            self.hidden = list(self.hidden)  # as config.json gives it back
        self.validate()

    def validate(self, given: Iterable[str] = ()) -> None:
        """Checks that the settings go together and build a schedule and objective.

        A setting that takes no effect with this schedule and objective (such as
        ``epochs`` with the ``paper`` schedule, or ``beta`` with any objective but
        ``ciwae``) must keep its default; one named in ``given`` (the settings a
        user gave, such as the command line's options) may not be set at all.

        :raises ConfigError: for settings that do not go together.
        :raises ValueError: for a schedule or objective that cannot be built.
        """
        given, defaults = set(given), _defaults()
        for field in self.unused_settings():
            if field in given or getattr(self, field) != defaults[field]:
                setting, values, instead = _APPLIES_WITH[field]
                raise ConfigError(
                    f"{{{field}}} applies to {{{setting}}} {_or(values)}; {instead}"
                )
        self.make_schedule()
        self.make_objective()
        check_likelihood(self.likelihood, self.sigma)
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; choose one of: "
                f"{', '.join(ACTIVATIONS)}"
            )
        if self.model == "paper" or self.guide in ZOO:
            architecture(self.stochastic_layers, self.hidden, self.latent_dim)
        elif not isinstance(self.stochastic_layers, int) or self.stochastic_layers < 1:
            raise ValueError(
                f"stochastic_layers must be an integer >= 1, got "
                f"{self.stochastic_layers!r}"
            )
        if self.binarize is not None and self.binarize not in BINARIZATIONS:
            raise ValueError(
                f"binarize must be one of {', '.join(BINARIZATIONS)}, got "
                f"{self.binarize!r}"
            )
        if not 0 < self.test_fraction < 1:
            raise ValueError(
                f"test_fraction must lie in (0, 1), got {self.test_fraction}"
            )
        resolve("model", self.model)
        resolve("guide", self.guide)

    @property
    def binarization(self) -> str:
        """``binarize``, or its default: ``"dynamic"`` for the built-in image
        sets with the Bernoulli likelihood, ``"none"`` otherwise."""
        if self.binarize is not None:
            return self.binarize
        builtin = self.dataset in DATASETS and self.likelihood == "bernoulli"
        return "dynamic" if builtin else "none"

    def builder_settings(self, kind: str) -> dict[str, Any]:
        """The architecture settings for the ``kind`` (model or guide) builder:
        those that differ from their defaults."""
        names = ARCHITECTURE_SETTINGS + (LIKELIHOOD_SETTINGS if kind == "model" else ())
        defaults = _defaults()
        return {
            name: tuple(value) if isinstance(value, list) else value
            for name in names
            if (value := getattr(self, name)) != defaults[name]
        }

    def unused_settings(self) -> list[str]:
        """The settings that take no effect with this schedule and objective."""
        return _unused(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """The config of ``values``; unknown keys raise :class:`RunError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise RunError(
                f"unknown run settings {', '.join(unknown)}; the run was written by "
                "another pyro-iwae version: use that version or start a new run"
            )
        return cls(**values)

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> RunConfig:
        """Reads ``config.json`` of ``run_dir``.

        Settings there that take no effect (pyro-iwae 0.1.0 saved the command
        line's 40 epochs with the paper schedule) are read as their defaults.

        :raises RunError: if the directory or its config is missing or broken.
        """
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise RunError(
                f"run directory {run_dir} does not exist; pass the directory of a "
                "run written by fit"
            )
        path = run_dir / CONFIG_FILE
        if not path.is_file():
            raise RunError(
                f"{run_dir} is not a run directory (no {CONFIG_FILE}); pass the "
                "directory of a run written by fit"
            )
        try:
            values = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RunError(
                f"cannot read {path} ({one_line(e)}); restore it or start a new run"
            ) from e
        if not isinstance(values, dict):
            raise RunError(
                f"{path} is not a JSON object; restore it or start a new run"
            )
        unused = _unused({**_defaults(), **values})
        try:
            return cls.from_dict({k: v for k, v in values.items() if k not in unused})
        except BuilderError as e:
            raise RunError(f"{path}: {one_line(e)}") from e
        except ValueError as e:
            raise RunError(
                f"{path} holds settings that do not go together ({one_line(e)}); "
                "restore it or start a new run"
            ) from e

    def save(self, run_dir: str | os.PathLike) -> Path:
        """Writes ``config.json`` into ``run_dir`` (created if needed); returns it."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / CONFIG_FILE
        write_json(path, self.to_dict())
        return path

    def make_schedule(self) -> Schedule:
        """The training schedule, a list of (epochs, lr)."""
        return make_schedule(
            self.schedule, epochs=self.epochs, stages=self.stages, lr=self.lr
        )

    def make_objective(self) -> ELBO:
        """The training objective (see :func:`~pyro_iwae.make_objective`)."""
        return make_objective(
            self.objective,
            self.num_particles,
            self.estimator,
            self.alpha,
            self.num_groups,
            self.beta,
            self.compile,
        )

    def load_data(self, data_dir: str | os.PathLike | None = None) -> Dataset:
        """The data set on the CPU, training set cut to ``train_limit``.

        :param data_dir: overrides ``self.data_dir``.
        :raises pyro_iwae.data.DataError: if the data cannot be found or read.
        """
        data = load_dataset(
            self.dataset,
            data_dir or self.data_dir,
            binarize=self.binarization,
            test_fraction=self.test_fraction,
        )
        if self.train_limit is not None:
            data = dataclasses.replace(data, train=data.train[: self.train_limit])
        return data


def _unused(values: dict[str, Any]) -> list[str]:
    """The fields of :data:`_APPLIES_WITH` that take no effect with ``values``."""
    return [
        field
        for field, (setting, applies, _) in _APPLIES_WITH.items()
        if values[setting] not in applies
    ]


def _defaults() -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(RunConfig)}


def _or(values: tuple[str, ...]) -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    return " or ".join(filter(None, (", ".join(values[:-1]), values[-1])))
