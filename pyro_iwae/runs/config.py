"""The settings of a run: :class:`RunConfig`, checked when it is made, saved as
``config.json`` in the run directory.

The rules of which settings go together live here, in :data:`_APPLIES_WITH`
and :meth:`RunConfig.validate`, and each field declares its option, help,
defaults and allowed values once (see :mod:`pyro_iwae.runs.settings`), so that the
Python API and the command line, whose fit options are made from these
declarations, refuse the same settings with the same messages.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pyro.infer import ELBO

from ..data import (
    BINARIZATIONS,
    DATASETS,
    Dataset,
    file_width,
    is_data_file,
    load_dataset,
)
from ..errors import ConfigError, one_line
from ..infer.objectives import ESTIMATORS
from ..nn.guides import ZOO
from ..nn.likelihoods import LIKELIHOODS, check_likelihood
from ..nn.models import ARCHITECTURES, architecture
from ..nn.networks import ACTIVATIONS
from ..nn.registry import BuilderError, resolve
from .checkpoints import RunError, write_json
from .schedules import (
    IW_OBJECTIVES,
    OBJECTIVES,
    SCHEDULES,
    Schedule,
    make_objective,
    make_schedule,
)
from .settings import (
    NO_DEFAULT,
    absolute_paths,
    check_applies,
    check_held_out,
    check_values,
    declared,
    normalize_switches,
    own_test_set,
    setting,
    unused,
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
    paths or entry points (see :func:`pyro_iwae.nn.registry.resolve`), built with
    ``likelihood`` (and ``sigma``: None learns it), ``hidden`` (None: the
    paper's), ``activation`` and ``latent_dim`` (None: the paper's) where these
    differ from their defaults. ``epochs`` applies to the
    ``constant`` schedule, ``stages`` (None: all 8) to the ``paper`` schedule,
    whose first stage runs at ``lr``. ``train_limit`` keeps the first training
    points (None: all); ``test_limit`` test points give the per-epoch test bound.
    ``device`` is where the run was trained (``"cpu"``, ``"cuda"``).

    Made, a data file's path (``dataset``) and ``data_dir`` are made absolute
    from the working directory (a built-in data set's name stays a name), so
    that a run's ``config.json`` finds them from any other; then the config
    is checked (see :meth:`validate`).

    :raises ConfigError: for settings that do not go together.
    :raises ValueError: for a schedule or objective that cannot be built.
    """

    dataset: str = setting(
        "mnist-mini",
        f"Data set: {', '.join(DATASETS)} (mnist-mini, 10,000 / 2,000 MNIST images, "
        "ships with the package), or the path of your own .npy, .npz (arrays train "
        "and optionally test) or .pt file of shape [N, ...], used as given.",
        metavar="NAME|PATH",
        kind="dataset",
    )
    data_dir: str | None = setting(
        None,
        "Folder holding the data (MNIST/raw, FashionMNIST/raw or chardata.mat); "
        "mnist-mini is embedded and needs none.",
        default_text="$PYRO_IWAE_DATA, else ~/.cache/pyro-iwae",
        kind="folder",
    )
    stochastic_layers: int = setting(
        1,
        "Stochastic layers: of the paper's architecture 1 (latent 50) or 2 "
        "(latents 100 and 50); of {model} sbn any number of 200 binary units each "
        "(3: the VIMCO paper's 200-200-200).",
        flag="--layers",
        low=1,
    )
    model: str = setting(
        "paper",
        "Model: paper, sbn (sigmoid belief network: {stochastic_layers} layers of "
        "200 binary units; train it with {guide} sbn), an import path such as "
        "mypackage.models:build_model, or an entry point of group pyro_iwae.nn.models.",
        metavar="NAME|MODULE:BUILDER",
    )
    guide: str = setting(
        "paper",
        "Guide: paper (diagonal Gaussian), lowrank (low-rank-plus-diagonal "
        "Gaussian), iaf (inverse autoregressive flows), coupling (affine coupling "
        "flows), sbn (binary units; needs {estimator} vimco), an import path such "
        "as mypackage.guides:build_guide, or an entry point of group "
        "pyro_iwae.nn.guides.",
        metavar="NAME|MODULE:BUILDER",
    )
    likelihood: str = setting(
        "bernoulli",
        "p(x|z): bernoulli (0/1 values), gaussian (real values; {sigma}), or "
        "continuous-bernoulli (values in [0, 1]); all normalised densities in nats.",
        choices=tuple(LIKELIHOODS),
    )
    sigma: float | None = setting(
        None,
        "Fixed standard deviation of {likelihood} gaussian.",
        low=0,
        open=(True, False),
        default_text="learned, one per dimension",
    )
    hidden: list[int] | None = setting(
        None,
        "Hidden layer sizes between x and z1, in encoder and decoder, such as "
        "200,200 or 500; '' for none.",
        metavar="SIZES",
        default_text="the paper's: 200,200",
        kind="sizes",
    )
    activation: str = setting(
        "tanh", "Hidden units of the networks.", choices=tuple(ACTIVATIONS)
    )
    latent_dim: int | None = setting(
        None,
        "Size of the top latent layer (z1; z2 with {stochastic_layers} 2).",
        low=1,
        default_text="the paper's: 50",
    )
    binarize: str | None = setting(
        None,
        "dynamic: training values in [0, 1] binarised afresh for every "
        "mini-batch, test values once (seed 0); static: all once; none: as given.",
        choices=BINARIZATIONS,
        default_text="dynamic for the built-in image sets with {likelihood} "
        "bernoulli, none otherwise",
    )
    test_fraction: float = setting(
        0.1,
        "Share of the points of a {dataset} file without a test set held out (at "
        "random, seed 0) as its test set.",
        low=0,
        high=1,
        open=(True, True),
    )
    objective: str = setting(
        "iwae",
        "iwae: the importance-weighted bound; vae: the ELBO averaged over k "
        "samples (the paper's 'VAE, k'); renyi: Pyro's RenyiELBO of order "
        "{alpha}; miwae, piwae: Rainforth et al.'s bounds on {num_groups} M groups "
        "of k particles; ciwae: {beta} ELBO + (1 - {beta}) IWAE.",
        choices=OBJECTIVES,
    )
    estimator: str = setting(
        "iwae",
        "Guide gradient of {objective} iwae, miwae, piwae or ciwae: iwae (plain), "
        "stl (sticking the landing), dreg (doubly reparameterised), vimco "
        "(score-function gradient with leave-one-out baselines for discrete guide "
        "sites, k >= 2) or reinforce (the same without baselines: a variance "
        "reference only).",
        choices=ESTIMATORS,
    )
    num_particles: int = setting(
        5,
        "k, importance samples per data point.",
        flag="--particles",
        short="-k",
        low=1,
    )
    alpha: float = setting(
        0.0, "Order of {objective} renyi (not 1); 0 is the IWAE bound."
    )
    num_groups: int = setting(
        1,
        "M, groups of k particles of {objective} miwae or piwae.",
        flag="--groups",
        low=1,
    )
    beta: float = setting(
        0.5, "Weight of the ELBO in {objective} ciwae.", low=0, high=1
    )
    schedule: str = setting(
        "constant",
        "constant: {epochs} at {lr}; paper: stage i = 0..7 runs 3^i epochs at "
        "lr * 10^(-i/7) (3,280 epochs in all).",
        choices=SCHEDULES,
    )
    stages: int | None = setting(
        None,
        "Run only the first N stages of {schedule} paper.",
        low=1,
        high=8,
        command_default=8,
    )
    epochs: int = setting(
        5,
        "Epochs of {schedule} constant.",
        low=1,
        # About a minute on a 2-core laptop CPU.
        command_default=40,
    )
    batch_size: int = setting(
        100,
        "Points per mini-batch (the paper uses 20; 100 runs faster on a CPU).",
        low=1,
    )
    lr: float = setting(
        1e-3,
        "Learning rate of Adam (the first stage's, for {schedule} paper).",
        low=0,
        open=(True, False),
    )
    seed: int = setting(0, "Random seed.")
    device: str = "cpu"
    x_dim: int = 784
    train_limit: int | None = setting(
        None,
        "Train on the first N training points only (default: all).",
        low=1,
    )
    test_limit: int = setting(
        1000, "Test points for the test bound after each epoch (0: none).", low=0
    )
    checkpoint_every: int | None = setting(
        None,
        "Also write a checkpoint every N steps (default: after each epoch only).",
        low=1,
    )
    compile: bool | str | None = setting(
        "auto",
        "Run each training step's loss, gradients and Adam update as one graph "
        "compiled by torch's inductor (about 12 s to compile per batch shape on "
        "2 cores, 2-3 s once inductor's cache holds it; reported apart; the same "
        "numbers to float tolerance): on, off, or auto (on the CPU, compiles runs "
        "of at least 8,000 steps per batch shape at batch 20, k 5, fewer for "
        "larger batches and k (1,200 at batch 100, k 50), or a quarter of that "
        "where an earlier run left the graph in the cache; the last line says "
        "which it took, and a resumed run keeps it). Compiled and eager runs "
        "round differently and part after many steps: on or off pins the path, "
        "for a run that repeats bit for bit. Programs it cannot capture fall "
        "back to the eager path with a warning.",
        kind="switch",
    )

    def __post_init__(self) -> None:
        if isinstance(h := self.hidden, tuple | int) and not isinstance(h, bool):
            self.hidden = list(h) if isinstance(h, tuple) else [h]  # as JSON has it
        normalize_switches(self)  # a settings file's "on" or "off"
        # Here, not when a run is written: every config (Python's, the command
        # line's, a grid's) then names the data a run records and is compared
        # with on resume, whichever folder it is used from.
        for name, value in absolute_paths(type(self), vars(self)).items():
            setattr(self, name, value)
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
        # Each value by itself first: a misspelt choice is named as such, not as
        # the choice another setting applies to; and the objective would refuse
        # a wrong value without the setting's name.
        check_values(self)
        given = set(given)
        check_applies(self.to_dict(), _defaults(), given, _APPLIES_WITH)
        check_held_out(self.to_dict(), _defaults(), given)
        self.make_schedule()
        self.make_objective()
        check_likelihood(self.likelihood, self.sigma)
        if self.model == "sbn" and self.guide in ZOO:
            raise ConfigError(
                "{model} sbn samples binary units h1, h2, ... that the "
                f"{self.guide} guide does not: use {{guide}} sbn with "
                "{estimator} vimco"
            )
        if self.guide == "sbn" and self.model == "paper":
            # Else the guide's h1 goes unscored and the model's z1 comes from
            # its prior: a number that bounds nothing.
            raise ConfigError(
                "{guide} sbn samples binary units h1, h2, ... that the paper "
                "model does not: use {model} sbn with it"
            )
        if self.model == "paper" or self.guide in ZOO:
            if self.stochastic_layers not in ARCHITECTURES:
                raise ConfigError(
                    "{stochastic_layers} of the paper's networks is 1 or 2, got "
                    f"{self.stochastic_layers!r}; {{model}} sbn takes any number"
                )
            architecture(self.stochastic_layers, self.hidden, self.latent_dim)
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
        """The settings that take no effect with this schedule, objective and data."""
        return _unused(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """The config of ``values``; unknown keys raise :class:`RunError`."""
        unknown = _unknown(values)
        if unknown:
            # Settings a user wrote (a --config file, a grid): name the fields.
            named = ", ".join(_with_guess(name) for name in unknown)
            raise RunError(
                f"unknown run settings {named}; use the names of a "
                "run's config.json, the fields of RunConfig"
            )
        return cls(**values)

    @classmethod
    def merge(
        cls,
        given: dict[str, Any],
        *,
        base: RunConfig | None = None,
        defaults: dict[str, Any] | None = None,
        named: Iterable[str] | None = None,
    ) -> RunConfig:
        """The config of the settings a user ``given`` (field -> value), over
        ``base`` (None: the fields' defaults), with ``defaults`` (a command's own,
        such as :meth:`command_defaults`) for the settings not given where they
        take effect. Checked with the settings ``named`` (default: all those
        ``given``) named (see :meth:`validate`); a new config of a data file
        learns its ``x_dim`` from the file, unless ``given`` (None: the data's).

        :raises ConfigError, ValueError: see :meth:`validate`.
        :raises RunError: on unknown settings.
        :raises pyro_iwae.data.DataError: if a data file cannot be read.
        """
        if "x_dim" in given and given["x_dim"] is None:  # a file's null
            given = {name: v for name, v in given.items() if name != "x_dim"}
        values = {**(_defaults() if base is None else base.to_dict()), **given}
        dataset = values["dataset"]
        if base is None and isinstance(dataset, str) and is_data_file(dataset):
            if "x_dim" not in given:
                width = file_width(values["dataset"], values["test_fraction"])
                values["x_dim"] = width
        config = cls.from_dict(values)
        config.validate(given if named is None else named)
        if base is not None or not defaults:
            return config
        skipped = set(given) | set(config.unused_settings())
        chosen = {k: v for k, v in defaults.items() if k not in skipped}
        return dataclasses.replace(config, **chosen)

    @staticmethod
    def command_defaults() -> dict[str, Any]:
        """The command line's defaults where they differ from the fields' (such
        as its 40 epochs, about a minute on a 2-core laptop CPU)."""
        return {
            name: s.command_default
            for name, (_, s) in declared(RunConfig).items()
            if s.command_default is not NO_DEFAULT
        }

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> RunConfig:
        """Reads ``config.json`` of ``run_dir``.

        Settings there that take no effect (pyro-iwae 0.1.0 saved the command
        line's 40 epochs with the paper schedule) are read as their defaults.

        :raises RunError: if the directory or its config is missing or broken.
        """
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            what = "is a file, not a folder" if run_dir.exists() else "does not exist"
            raise RunError(
                f"run directory {run_dir} {what}; pass the directory of a run "
                "written by train_run or pyro-iwae fit"
            )
        path = run_dir / CONFIG_FILE
        if not path.is_file():
            raise RunError(
                f"{run_dir} is not a run directory (no {CONFIG_FILE}); pass the "
                "directory of a run written by train_run or pyro-iwae fit"
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
        unknown = _unknown(values)
        if unknown:
            raise RunError(
                f"{path} holds unknown run settings {', '.join(unknown)}: the run "
                "was written by another pyro-iwae version; use that version or "
                "start a new run"
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

    def make_objective(self, max_plate_nesting: int = 1) -> ELBO:
        """The training objective (see :func:`~pyro_iwae.make_objective`) of plates
        nested ``max_plate_nesting`` deep; its ``compile="auto"`` is settled by fit."""
        return make_objective(
            self.objective,
            self.num_particles,
            self.estimator,
            self.alpha,
            self.num_groups,
            self.beta,
            self.compile,
            max_plate_nesting,
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
    """The fields that take no effect with ``values``: see :data:`_APPLIES_WITH`."""
    return unused(values, _APPLIES_WITH) + own_test_set(values)


def _unknown(values: dict[str, Any]) -> list[str]:
    """The keys of ``values`` that are no field of :class:`RunConfig`, sorted."""
    return sorted(set(values) - set(_defaults()))


def _with_guess(name: str) -> str:
    """``name``, followed by the field it may mean, if one is close."""
    close = difflib.get_close_matches(name, _defaults(), 1)
    return f"{name} ({close[0]}?)" if close else name


def _defaults() -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(RunConfig)}
