"""What an evaluation of a run is asked (:class:`EvalSettings`) and what it
found (:class:`Evaluation`), and the files it leaves in the run directory:
``eval-<split>-<tag>.json``, the per-point ``estimates-<split>-<tag>.txt`` and
``diagnostics-<split>-<tag>.txt``.

``<tag>`` is ``k<num_samples>`` or ``ais<ais_steps>x<num_chains>``, followed
by ``-on-<name>`` for data other than the run's (``-on-<name>-<8 hex digits
of the file's path>`` where another data file of that name took it). An
evaluation never replaces
one of other settings: where that name holds one (of other points, seed, batch
or chunk size, or particle mode), it takes a name that spells its settings
(``eval-test-k5000-n20-seed0-batch100.json``, ``...-chunk50.json``,
``...-sequential.json``; ``...-vectorized.json`` beside a sequential one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import pyro
import torch

from .._version import __version__
from ..errors import ConfigError, RunError
from ..infer.activity import count_active, latent_activity
from ..infer.diagnostics import KHAT_THRESHOLD
from ..infer.hooks import compiles
from ..nn.likelihoods import CONTINUOUS
from . import distributed
from .checkpoints import read_metrics, write_json, write_text
from .config import RunConfig
from .settings import check_applies, check_values, normalize_switches, setting

__all__ = [
    "EVAL_METHODS",
    "EvalSettings",
    "Evaluation",
    "activity_of",
    "checkpoint_place",
    "read_estimates",
    "result_path",
    "summarise",
    "versions",
]

#: Estimators of an evaluation: the IWAE bound, or annealed importance sampling.
EVAL_METHODS = ("iwae", "ais")

# Settings that take effect with one method only (see settings.check_applies).
_APPLIES_WITH = {
    "num_samples": ("method", ("iwae",), "drop it or choose {method} iwae"),
    "compile": ("method", ("iwae",), "drop it or choose {method} iwae"),
    "sequential_particles": ("method", ("iwae",), "drop it or choose {method} iwae"),
    "ais_steps": ("method", ("ais",), "drop it or choose {method} ais"),
    "num_chains": ("method", ("ais",), "drop it or choose {method} ais"),
}


@dataclasses.dataclass
class EvalSettings:
    """How to estimate a run's negative log-likelihood (see
    :func:`~pyro_iwae.evaluate_run`); checked when made.

    :raises ConfigError: for values out of range or settings of another method.
    """

    num_samples: int = setting(
        5000,
        "Importance samples per point (the paper's NLL uses 5000).",
        flag="--k",
        low=1,
    )
    split: str = setting(
        "test",
        "Data to evaluate: the binarised test set, or the points the run trained "
        "on (the first {train_limit} of the training set) binarised once with {seed}.",
        choices=("test", "train"),
    )
    limit: int | None = setting(
        None,
        "Evaluate the first N points only; 0 for all (the paper's protocol).",
        low=0,
        # About 80 s at k = 5000 on a 2-core laptop CPU.
        command_default=1000,
    )
    chunk_size: int | None = setting(
        None,
        "Particles drawn at once (memory grows with it); another size draws "
        "other particles, so other estimates, kept under their own file name.",
        low=1,
        default_text="as many as fit in 256 MiB, no tensor over 32 MiB",
    )
    batch_size: int = setting(100, "Data points per batch.", low=1)
    seed: int = setting(0, "Random seed of the importance samples.")
    method: str = setting(
        "iwae",
        "iwae: the IWAE bound -L_k (the paper's NLL); ais: annealed importance "
        "sampling from the guide to the posterior with HMC, tighter and slower.",
        choices=EVAL_METHODS,
    )
    ais_steps: int = setting(
        1000,
        "With {method} ais: annealing steps; N steps make N - 1 HMC moves of 10 "
        "leapfrog steps each (1: plain importance sampling with {num_chains} "
        "particles); double it until the NLL stops moving.",
        low=1,
    )
    num_chains: int = setting(
        16,
        "With {method} ais: independent chains per point.",
        flag="--chains",
        low=1,
    )
    compile: bool | str | None = setting(
        "auto",
        "With {method} iwae: compute each chunk's log-weights in one graph compiled "
        "by torch's inductor (seconds to compile per batch shape, reported apart; "
        "the same estimates to float tolerance where {chunk_size} divides "
        "{num_samples}): on, off, or auto (on from 3 million particle-points, "
        "points times {num_samples}, where compiling pays; the output says which "
        "it took). Programs it cannot capture fall back to the eager path with a "
        "warning.",
        kind="switch",
    )
    sequential_particles: bool = setting(
        False,
        "With {method} iwae: draw the particles one at a time, a run of guide and "
        "model each, for networks that do not broadcast over a leading particle "
        "dimension; slower, the same estimator, eager ({compile} off).",
        kind="flag",
    )

    def __post_init__(self) -> None:
        if self.limit == 0:
            self.limit = None  # all points
        normalize_switches(self)  # a settings file's "on" or "off"
        if self.sequential_particles and self.method == "iwae":
            # Sequential particles run eagerly: "auto" settles on off.
            self.compile = False if self.compile == "auto" else self.compile
        self.validate()

    def validate(self, given: tuple[str, ...] | list[str] = ()) -> None:
        """Checks the values; settings of the other method must keep their
        defaults, and those named in ``given`` may not be set at all.

        :raises ConfigError: naming the settings as ``{field}``.
        """
        defaults = {f.name: f.default for f in dataclasses.fields(EvalSettings)}
        # A misspelt method is named as such, not as the one a setting applies to.
        check_values(self)
        check_applies(dataclasses.asdict(self), defaults, given, _APPLIES_WITH)
        if self.sequential_particles and compiles(self.compile):
            raise ConfigError(
                "{sequential_particles} draws the particles one at a time, eagerly, "
                "and {compile} compiles vectorized ones; drop one of them"
            )

    @property
    def tag(self) -> str:
        """``k<num_samples>``, or ``ais<ais_steps>x<num_chains>``."""
        if self.method == "iwae":
            return f"k{self.num_samples}"
        return f"ais{self.ais_steps}x{self.num_chains}"

    def identity(self) -> dict[str, Any]:
        """What makes the estimates of a point what they are, in the keys of an
        evaluation's JSON."""
        return {
            "method": self.method,
            "split": self.split,
            "seed": self.seed,
            "batch_size": self.batch_size,
            # Other draws than the vectorised ones: another estimate.
            "sequential_particles": self.sequential_particles,
            # Another chunk draws other particles (AIS: other chains' noise).
            "chunk_size": self.chunk_size,
            **self.method_settings(),
        }

    def method_settings(self) -> dict[str, Any]:
        """``k``, or ``ais_steps`` and ``chains``, as an evaluation's JSON has them."""
        if self.method == "iwae":
            return {"k": self.num_samples}
        return {"ais_steps": self.ais_steps, "chains": self.num_chains}


@dataclasses.dataclass
class Evaluation(Mapping):
    """The result of an evaluation of a run, as written to its JSON file.

    ``nll`` (mean, nats) and ``stderr`` (std / sqrt(n), None for one point);
    ``bits_per_dim`` (``nll / (x_dim log 2)``) and its ``bits_per_dim_stderr``
    for continuous likelihoods (None otherwise); ``method``, ``k`` (None with
    AIS), ``ais_steps`` and ``chains`` (None without AIS), ``split``,
    ``points`` (the first ``limit``, None: all), ``seed``, ``batch_size``;
    ``time`` (s) and ``compile_time`` (s of it spent compiling graphs);
    ``compiled``: whether the log-weights ran as compiled graphs, and
    ``compile_choice``: why (``"as asked"``, or what ``compile="auto"`` saw);
    ``sequential_particles``: whether the particles were drawn one at a time;
    ``chunk_size``: the particles drawn at once as asked (None: the default);
    ``dataset``: the data evaluated (the run's, or other data asked for);
    ``trained_steps``: the run's training steps when it was evaluated;
    ``diagnostics``: median ESS, median k-hat (None below 21 samples), the
    share of points with k-hat > 0.7 and, with AIS, the mean acceptance
    rate; ``active_units`` and ``latent_units`` (site -> count, size);
    ``ranks``, ``versions``, ``date``; ``file`` (the JSON's
    absolute path) and the names of the per-point ``estimates_file`` and
    ``diagnostics_file`` beside it.

    It is a read-only mapping of the JSON's dict: ``evaluation["nll"]``,
    ``"k" in evaluation``, ``dict(evaluation)`` (that dict, a copy), ``keys()``.
    """

    nll: float
    stderr: float | None
    bits_per_dim: float | None
    bits_per_dim_stderr: float | None
    method: str
    k: int | None
    split: str
    points: int
    time: float
    compile_time: float
    diagnostics: dict[str, float | None]
    active_units: dict[str, int]
    latent_units: dict[str, int]
    seed: int
    ranks: int
    dataset: str
    versions: dict[str, str]
    date: str
    file: str
    estimates_file: str
    diagnostics_file: str
    ais_steps: int | None = None
    chains: int | None = None
    batch_size: int = 100
    limit: int | None = None
    compiled: bool = False
    compile_choice: str = "as asked"
    sequential_particles: bool = False
    chunk_size: int | None = None
    # An evaluation of fewer steps than the checkpoint now holds is out of date.
    trained_steps: int | None = None

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_json())

    def __len__(self) -> int:
        return len(self.to_json())

    def to_json(self) -> dict[str, Any]:
        """The JSON file's dict (``ais_steps`` and ``chains`` with AIS only)."""
        values = dataclasses.asdict(self)
        if self.method != "ais":
            del values["ais_steps"], values["chains"]
        return values

    @property
    def folder(self) -> Path:
        """The run directory the files are in."""
        return Path(self.file).parent

    def write(self, estimates: torch.Tensor, per_point: torch.Tensor) -> None:
        """Writes the per-point ``estimates`` ``[n]`` (nats), the ``per_point``
        diagnostics ``[n, columns]`` (named in ``diagnostics``'s order of
        columns) and the JSON."""
        columns = _COLUMNS[self.method]
        write_text(
            self.folder / self.estimates_file,
            "".join(f"{v:.6f}\n" for v in estimates.tolist()),
        )
        rows = (" ".join(f"{v:.6g}" for v in row) for row in per_point.tolist())
        header = "# " + " ".join(columns) + "\n"
        write_text(
            self.folder / self.diagnostics_file,
            header + "".join(f"{row}\n" for row in rows),
        )
        write_json(Path(self.file), self.to_json())


#: The per-point diagnostics of each method, in the diagnostics file's order.
_COLUMNS = {"iwae": ("ess", "khat"), "ais": ("stderr", "ess", "khat", "acceptance")}


def columns(method: str) -> tuple[str, ...]:
    """The per-point diagnostics of ``method``, as its diagnostics file has them."""
    return _COLUMNS[method]


def result_path(
    run_dir: str | os.PathLike,
    settings: EvalSettings,
    points: int | None = None,
    other_data: str | None = None,
) -> Path:
    """Where the evaluation with ``settings`` (of ``points`` points, where
    known) is, or goes: ``eval-<split>-<tag>.json`` unless that holds one of
    other settings, then a name that spells them all (see the module); where
    ``points`` is not known, one of all points, no more than the limit, counts.
    Of ``other_data`` than the run's, ``<tag>`` ends in ``-on-<its name>``."""
    run_dir = Path(run_dir)
    tag = settings.tag
    if other_data is not None:
        tag += "-on-" + (Path(other_data).stem or "data")
        if _of_other_data(run_dir / f"eval-{settings.split}-{tag}.json", other_data):
            # Another file of the same name evaluated first: that name is its.
            tag += "-" + hashlib.sha256(other_data.encode()).hexdigest()[:8]
    plain = run_dir / f"eval-{settings.split}-{tag}.json"
    if not plain.is_file() or _same(plain, settings, points, other_data):
        return plain
    limit = "all" if settings.limit is None else settings.limit
    sequential = "-sequential" if settings.sequential_particles else ""
    if not sequential and (_saved(plain) or {}).get("sequential_particles"):
        # The plain name's evaluation differs from this one by the mode alone.
        sequential = "-vectorized"
    chunk = "" if settings.chunk_size is None else f"-chunk{settings.chunk_size}"
    named = run_dir / (
        f"eval-{settings.split}-{tag}-n{limit}-seed{settings.seed}"
        f"-batch{settings.batch_size}{chunk}{sequential}.json"
    )
    if points is None and settings.limit is not None and not named.is_file():
        # A limit of at least the split's size is evaluated, and named, as all.
        every_settings = dataclasses.replace(settings, limit=None)
        every = result_path(run_dir, every_settings, None, other_data)
        if every.is_file() and _same(every, settings, None, other_data):
            return every
    return named


def _of_other_data(path: Path, other_data: str) -> bool:
    """Whether ``path`` holds an evaluation of data other than ``other_data``."""
    saved = _saved(path)
    return saved is not None and saved.get("dataset") != other_data


def _saved(path: Path) -> dict | None:
    """The evaluation in ``path``; None where unreadable or no evaluation."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def _same(
    path: Path, settings: EvalSettings, points: int | None, other_data: str | None
) -> bool:
    """Whether the evaluation in ``path`` was made with ``settings`` (on
    ``points`` points where known; of ``other_data`` where given). Files of
    pyro-iwae 0.1 lack the batch size (theirs was 100) and the limit (their
    points tell it), and files written before it was recorded the chunk size
    (theirs: None, the default)."""
    saved = _saved(path)
    if saved is None:
        return True  # unreadable: nothing worth keeping
    saved = {
        "batch_size": 100,
        "method": "iwae",
        "sequential_particles": False,
        "chunk_size": None,
        **saved,
    }
    if not all(saved.get(k) == v for k, v in settings.identity().items()):
        return False
    if other_data is not None and saved.get("dataset") != other_data:
        return False
    if points is not None:
        return saved.get("points") == points
    if "limit" in saved:
        if saved["limit"] is None and settings.limit is not None:
            # All points: so is a limit of at least the split's size.
            return saved.get("points", math.inf) <= settings.limit
        return saved["limit"] == settings.limit
    return settings.limit is None or saved.get("points") == settings.limit


def summarise(
    results: torch.Tensor,
    settings: EvalSettings,
    config: RunConfig,
    activity: dict[str, torch.Tensor],
    path: Path,
    other_data: str | None = None,
) -> Evaluation:
    """The :class:`Evaluation` of ``results``, float64 ``[n, 1 + columns]``:
    each point's log-likelihood estimate and its diagnostics (see
    :func:`columns`), made with ``settings`` on the data of ``config`` (or
    ``other_data``), with the latent ``activity`` (see
    :func:`~pyro_iwae.latent_activity`), to be written to ``path``; its times
    left at 0."""
    nll = -results[:, 0]
    n = nll.shape[0]
    stderr = float(nll.std() / math.sqrt(n)) if n > 1 else None
    bits = None
    if config.likelihood in CONTINUOUS:
        bits = 1 / (config.x_dim * math.log(2))
    tag = path.name[len("eval-") : -len(".json")]
    ranks = distributed.current()
    return Evaluation(
        nll=float(nll.mean()),
        stderr=stderr,
        bits_per_dim=None if bits is None else float(nll.mean()) * bits,
        bits_per_dim_stderr=None if bits is None or stderr is None else stderr * bits,
        method=settings.method,
        k=settings.num_samples if settings.method == "iwae" else None,
        ais_steps=settings.ais_steps if settings.method == "ais" else None,
        chains=settings.num_chains if settings.method == "ais" else None,
        split=settings.split,
        points=n,
        time=0.0,
        compile_time=0.0,
        diagnostics=_diagnostics(results, settings.method),
        active_units=count_active(activity),
        latent_units={name: a.numel() for name, a in activity.items()},
        seed=settings.seed,
        batch_size=settings.batch_size,
        limit=settings.limit,
        ranks=1 if ranks is None else ranks.world,
        dataset=config.dataset if other_data is None else other_data,
        versions=versions(),
        date=datetime.now().isoformat(timespec="seconds"),
        file=str(Path(path).resolve()),
        estimates_file=f"estimates-{tag}.txt",
        diagnostics_file=f"diagnostics-{tag}.txt",
        sequential_particles=settings.sequential_particles,
        chunk_size=settings.chunk_size,
    )


def activity_of(
    guide: torch.nn.Module, points: torch.Tensor, settings: EvalSettings
) -> dict[str, torch.Tensor]:
    """The latent activity of ``guide`` on ``points`` (on the CPU), drawn with
    the seed of ``settings``, its particles as they say."""
    with distributed.forked_rng(points.device):
        torch.manual_seed(settings.seed)
        vectorize = not settings.sequential_particles
        activity = latent_activity(guide, points, vectorize_particles=vectorize)
        return {name: a.cpu() for name, a in activity.items()}


def _diagnostics(results: torch.Tensor, method: str) -> dict[str, float | None]:
    """Median ESS, median k-hat (None: too few weights to fit a tail, 20 or
    fewer, or infinite, which JSON cannot hold: -inf where ``khat_flat`` is at
    least 1/2, +inf otherwise), the share of points with k-hat above 0.7 (+inf
    included), the share with k-hat -inf (flat weights: the largest equal, as
    for an exact guide) and, for AIS, the mean acceptance rate."""
    values = dict(zip(columns(method), results[:, 1:].unbind(-1), strict=True))
    khat = values["khat"]
    # NaN at every point where K <= 20 fits no tail; at some points only where
    # their weights were not finite: no more to be trusted than +inf (all the
    # weight on one particle), so counted with those, above 0.7.
    fitted = not bool(khat.isnan().all())
    khat = khat.nan_to_num(nan=math.inf, posinf=math.inf, neginf=-math.inf)
    # -inf exactly where at least half the points are -inf (NaN, so None, where
    # the two middle values are -inf and +inf: khat_flat is then 1/2).
    median = _median(khat)
    above = (khat > KHAT_THRESHOLD).double().mean()
    flat = (khat == -math.inf).double().mean()
    diagnostics = {
        "ess_median": float(_median(values["ess"])),
        "khat_median": float(median) if fitted and median.isfinite() else None,
        # None, not 0 (none unreliable), where no k-hat was fitted.
        "khat_above_0.7": float(above) if fitted else None,
        "khat_flat": float(flat) if fitted else None,
    }
    if "acceptance" in values:
        diagnostics["acceptance_mean"] = float(values["acceptance"].mean())
    return diagnostics


def _median(values: torch.Tensor) -> torch.Tensor:
    """The median of ``values``: of an even count, the mean of the two middle
    ones (``torch.median`` takes the lower); NaN where any is NaN."""
    if values.isnan().any():
        return values.new_tensor(math.nan)
    ordered = values.sort().values
    middle = (ordered.numel() - 1) // 2
    return ordered[middle : ordered.numel() - middle].mean()


def checkpoint_place(
    run_dir: str | os.PathLike, trained_steps: int | None
) -> tuple[int, int] | None:
    """Where a checkpoint of ``trained_steps`` training steps (an evaluation's)
    stands in the run in ``run_dir``: the epochs it had finished and the steps
    it had taken of the next (0 at an epoch's end); None where the run's
    metrics do not tell (unreadable, or written before they counted steps)."""
    if trained_steps is None:
        return None
    try:
        ends = [m.get("steps") for m in read_metrics(run_dir)]
    except RunError:
        return None
    if not all(isinstance(end, int) for end in ends):
        return None
    # Each epoch's metrics hold the steps taken by its end, over all epochs.
    done = [end for end in ends if end <= trained_steps]
    return len(done), trained_steps - (done[-1] if done else 0)


def read_estimates(
    run_dir: str | os.PathLike, evaluation: dict | Evaluation
) -> torch.Tensor | None:
    """The per-point log-likelihood estimates (nats, float64) that ``evaluation``
    (an :class:`Evaluation` or its JSON's dict) wrote in ``run_dir``; None if it
    has none."""
    name = evaluation.get("estimates_file")
    path = Path(run_dir) / name if name else None
    if path is None or not path.is_file():
        return None
    values = [float(line) for line in path.read_text().split()]
    return torch.tensor(values, dtype=torch.float64)


def versions() -> dict[str, str]:
    """Versions of Python, torch, Pyro and pyro-iwae, and the machine (with the
    number of threads torch uses), for the record."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "pyro_iwae": __version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch_threads": str(torch.get_num_threads()),
    }
