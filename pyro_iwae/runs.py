"""Runs: a :class:`~pyro_iwae.RunConfig` trained in a run directory, loaded
back, and evaluated.

A *run directory* holds everything about one training run:

- ``config.json``: the :class:`~pyro_iwae.RunConfig` that rebuilds model, guide
  and data (see :mod:`pyro_iwae.config`);
- ``checkpoint.pt`` and ``metrics.jsonl``, written by :func:`pyro_iwae.fit`
  (see :mod:`pyro_iwae.checkpoints`);
- ``eval-<split>-k<k>.json`` and ``estimates-<split>-k<k>.txt``, written by
  :func:`evaluate_run`.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pyro
import torch

from . import distributed
from ._version import __version__
from .ais import ais_log_likelihood
from .callbacks import FitCallback
from .checkpoints import (
    CHECKPOINT_FILE,
    CheckpointError,
    RunError,
    load_checkpoint,
    load_state,
    write_json,
    write_text,
)
from .config import CONFIG_FILE, RunConfig
from .data import DataError, Dataset, is_data_file, load_dataset, one_line
from .diagnostics import KHAT_THRESHOLD, log_likelihood_with_diagnostics
from .evaluation import (
    compile_seconds,
    count_active,
    evaluating,
    latent_activity,
    warn_of_problems,
)
from .likelihoods import CONTINUOUS, support_problem
from .objectives import IWELBO
from .registry import BuilderError, build_guide, build_model
from .training import fit

__all__ = [
    "EVAL_METHODS",
    "build_run",
    "evaluate_run",
    "find_latest_run",
    "load_run",
    "new_run_dir",
    "read_estimates",
    "train_run",
    "versions",
]


#: Estimators of :func:`evaluate_run`: the IWAE bound, or annealed importance sampling.
EVAL_METHODS = ("iwae", "ais")


def build_run(
    config: RunConfig,
    data_mean: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Model and guide of ``config``, initialised from ``config.seed``.

    :param data_mean: ``[x_dim]`` training grey-level means for the model's output
        bias (None keeps the default initialisation).
    """
    torch.manual_seed(config.seed)
    model = build_model(
        config.model,
        x_dim=config.x_dim,
        stochastic_layers=config.stochastic_layers,
        data_mean=data_mean,
        **config.builder_settings("model"),
    )
    guide = build_guide(
        config.guide,
        x_dim=config.x_dim,
        stochastic_layers=config.stochastic_layers,
        **config.builder_settings("guide"),
    )
    device = torch.device(config.device if device is None else device)
    return model.to(device), guide.to(device)


def new_run_dir(
    runs_dir: str | os.PathLike, config: RunConfig, now: datetime | None = None
) -> Path:
    """Creates and returns a fresh folder under ``runs_dir`` for a run of ``config``,
    named ``<YYYYmmdd-HHMMSS>-<dataset>-<objective>-k<k>`` (with a suffix if taken)."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    dataset = (
        Path(config.dataset).stem if is_data_file(config.dataset) else config.dataset
    )
    base = f"{stamp}-{dataset}-{config.objective}-k{config.num_particles}"
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    for i in range(1, 1000):
        path = runs_dir / (base if i == 1 else f"{base}-{i}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise RunError(f"too many runs named {base} in {runs_dir}; pass another folder")


def find_latest_run(runs_dir: str | os.PathLike) -> Path:
    """The run directory under ``runs_dir`` whose checkpoint (or config, before its
    first epoch) was written last.

    :raises RunError: if ``runs_dir`` holds no run.
    """
    runs_dir = Path(runs_dir)
    candidates = []
    if runs_dir.is_dir():
        for path in runs_dir.iterdir():
            for name in (CHECKPOINT_FILE, CONFIG_FILE):
                if (path / name).is_file():
                    candidates.append(((path / name).stat().st_mtime, path.name, path))
                    break
    if not candidates:
        raise RunError(
            f"no run found in {runs_dir}; train one with fit, or pass a run "
            "directory (or the runs folder that holds it)"
        )
    return max(candidates)[2]


def train_run(
    config: RunConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    data_dir: str | os.PathLike | None = None,
    callback: FitCallback | None = None,
) -> list[dict[str, Any]]:
    """Trains run ``config`` in ``run_dir`` (writing ``config.json``), or resumes it.

    On ``resume`` the saved config must equal ``config`` but for ``device`` and
    ``data_dir``. ``data_dir`` overrides ``config.data_dir`` for loading only.
    Returns the metrics of every epoch (see :func:`fit`).

    :raises ConfigError, ValueError: if ``config`` was changed, since it was
        made, into settings that do not go together (see
        :meth:`RunConfig.validate`), or under torchrun does not split over the
        ranks.
    :raises RunError: on a config that differs from the run's, or a broken run.
    :raises CheckpointError: on ``resume`` with no usable checkpoint.
    :raises pyro_iwae.data.DataError: if the data cannot be loaded.
    :raises TrainingDiverged: see :func:`fit`.

    Under torchrun, every rank calls it alike: rank 0 checks and writes the run
    directory, and the ranks train the run together (see :func:`fit`).
    """
    config.validate()  # before anything is written
    device = distributed.init(config.device)
    ranks = distributed.current()
    objective = config.make_objective()
    if ranks is not None:
        distributed.check_batch_size(config.batch_size, ranks.world)
        distributed.check_objective(objective)
    run_dir = Path(run_dir)
    distributed.from_main(lambda: _check_run_dir(config, run_dir, resume))
    data = config.load_data(data_dir)
    if data.x_dim != config.x_dim:
        raise RunError(
            f"{config.dataset} points have {data.x_dim} values, the config says "
            f"{config.x_dim}; set x_dim to {data.x_dim}"
        )
    check_support(config, data)
    try:
        model, guide = build_run(config, data.train_mean, device)
    except BuilderError as e:
        raise RunError(one_line(e)) from e
    if isinstance(objective, IWELBO):
        # A guide the estimator cannot train fails here, before the run is written;
        # in eval mode, so that no batch-norm statistics move before training.
        with evaluating(guide):
            objective.check_guide(guide, data.train[:1].to(device))
    if not resume and distributed.is_main():
        config.save(run_dir)
    return fit(
        model,
        guide,
        data,
        objective,
        schedule=config.make_schedule(),
        batch_size=config.batch_size,
        seed=config.seed,
        test_size=config.test_limit,
        run_dir=run_dir,
        resume=resume,
        config=config.to_dict(),
        checkpoint_every=config.checkpoint_every,
        device=device,
        callback=callback,
    )


def _check_run_dir(config: RunConfig, run_dir: Path, resume: bool) -> None:
    """Checks that ``run_dir`` can be resumed with ``config`` (or, without
    ``resume``, holds no run)."""
    if resume:
        saved = RunConfig.load(run_dir)
        load_checkpoint_path = run_dir / CHECKPOINT_FILE
        if not load_checkpoint_path.is_file():
            raise CheckpointError(
                f"{run_dir} has no checkpoint to resume (it never finished an "
                "epoch); start a new run instead"
            )
        ignored = {"device", "data_dir"}
        differences = [
            f"{name}={getattr(saved, name)!r} (not {getattr(config, name)!r})"
            for name in saved.to_dict()
            if name not in ignored and getattr(saved, name) != getattr(config, name)
        ]
        if differences:
            raise RunError(
                f"run {run_dir} was started with {', '.join(differences)}; resume "
                "it with its own settings or start a new run"
            )
    elif (run_dir / CHECKPOINT_FILE).exists():
        raise RunError(
            f"{run_dir} holds a run already; resume it or choose another directory"
        )


def check_support(config: RunConfig, data: Dataset) -> None:
    """:raises DataError: if the data, as the model will see them, lie outside
    the support of the run's likelihood."""
    splits = [("test", data.test)]
    if data.binarize != "dynamic":  # else binarised before the model sees them
        splits.insert(0, ("training", data.train))
    for split, x in splits:
        problem = support_problem(config.likelihood, x, f"{split} data")
        if problem is not None:
            raise DataError(f"{config.dataset}: {problem}")


def load_run(
    run_dir: str | os.PathLike, device: torch.device | str | None = None
) -> tuple[RunConfig, torch.nn.Module, torch.nn.Module]:
    """The config, model and guide of a run, with the checkpoint's parameters.

    :param device: where to put model and guide (default: the CPU).
    :raises RunError: if ``run_dir`` is not a run directory.
    :raises CheckpointError: if the checkpoint is missing, corrupt, or of
        another architecture.
    """
    run_dir = Path(run_dir)
    config = RunConfig.load(run_dir)
    device = torch.device("cpu" if device is None else device)
    path = run_dir / CHECKPOINT_FILE
    checkpoint = load_checkpoint(path, map_location=device)
    try:
        model, guide = build_run(config, device=device)
    except ValueError as e:
        raise RunError(
            f"{run_dir / CONFIG_FILE} names no buildable model and guide "
            f"({one_line(e)}); restore it or start a new run"
        ) from e
    load_state(model, checkpoint["model"], "model", path)
    load_state(guide, checkpoint["guide"], "guide", path)
    return config, model, guide


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    num_samples: int = 5000,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 100,
    chunk_size: int | None = None,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    callback: Callable[[torch.Tensor, int], None] | None = None,
    method: str = "iwae",
    ais_steps: int = 1000,
    num_chains: int = 16,
    compile: bool | str | None = False,
) -> dict[str, Any]:
    """Estimates the negative log-likelihood of a run's model, per point.

    ``method="iwae"``: -L_k, the IWAE bound with ``num_samples`` particles, with
    the effective sample size and Pareto k-hat of each point's importance weights
    (:func:`~pyro_iwae.log_likelihood_with_diagnostics`; ``compile``: True or a
    ``torch.compile`` backend computes each chunk's log-weights in one compiled
    graph, traced and compiled once per batch shape). ``method="ais"``:
    annealed importance sampling with ``ais_steps`` HMC steps and ``num_chains``
    chains (:func:`~pyro_iwae.ais_log_likelihood`); ``num_samples`` is unused.

    Uses the first ``limit`` points (None: all) of ``split`` (``"test"``: the
    test set; ``"train"``: the training data, binarised once with ``seed`` if
    the run binarises them dynamically). Also counts the active units of each
    latent site on those points.
    Writes the result to ``eval-<split>-<tag>.json`` in ``run_dir``, ``<tag>``
    being ``k<num_samples>`` or ``ais<ais_steps>x<num_chains>``.
    ``callback(estimates, total)`` is called after each batch with its
    log-likelihood estimates (``[batch]``, nats) and the number of points
    (under torchrun: this rank's batches and points).

    The particles of batch ``i`` (of ``batch_size`` points) are drawn with
    torch's random stream seeded by ``(seed, i)`` (see
    :func:`~pyro_iwae.distributed.sharded_log_likelihood`), so the per-point
    estimates depend on ``seed`` and ``batch_size``, not on how many processes
    share the work: under torchrun the batches are dealt to the ranks, rank 0
    gathers the estimates and writes the same files as one process (every rank
    returns the result). The run directory must be readable by every rank.

    :returns: a dict: ``nll`` (mean, nats), ``stderr`` (std / sqrt(n), None for
        one point), ``bits_per_dim`` (``nll / (x_dim log 2)``, and its
        ``bits_per_dim_stderr``, for continuous likelihoods; None otherwise),
        ``k``, ``split``, ``points``, ``time`` (s; ``compile_time`` of it spent
        compiling graphs, with ``compile``), ``active_units``
        (site -> count), ``latent_units`` (site -> size), ``seed``, ``file``, and
        ``estimates_file``: the per-point estimates, one per line in nats, beside
        the JSON (see :func:`read_estimates`); ``method``, ``diagnostics`` (median
        ESS, median k-hat, share of points with k-hat > 0.7; for AIS also the
        mean acceptance rate) and ``diagnostics_file``: per point, those values
        (for AIS also each estimate's standard error), a header line naming them.
    :raises RunError, CheckpointError, pyro_iwae.data.DataError: see
        :func:`load_run` and :func:`pyro_iwae.data.load_dataset`.
    """
    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    if method not in EVAL_METHODS:
        raise ValueError(
            f"unknown method {method!r}; choose one of {', '.join(EVAL_METHODS)}"
        )
    for name, value in (
        ("num_samples", num_samples),
        ("ais_steps", ais_steps),
        ("num_chains", num_chains),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    run_dir = Path(run_dir)
    device = distributed.init(device)
    ranks = distributed.current()
    config, model, guide = load_run(run_dir, device)
    # The test set keeps its fixed binarisation, so that every evaluation (and
    # the per-epoch test bound) sees the same points.
    data = load_dataset(
        config.dataset,
        data_dir or config.data_dir,
        binarize=config.binarization,
        test_fraction=config.test_fraction,
    )
    if split == "test":
        points = data.test[:limit]
    elif data.binarize == "dynamic":
        generator = torch.Generator().manual_seed(seed)
        points = torch.bernoulli(data.train[:limit], generator=generator)
    else:
        points = data.train[:limit]
    points = points.to(next(model.parameters()).device)
    world = 1 if ranks is None else ranks.world
    mine = math.ceil(math.ceil(points.shape[0] / batch_size) / world) * batch_size

    if method == "iwae":
        tag, columns = f"k{num_samples}", ("ess", "khat")

        def estimate(batch: torch.Tensor) -> torch.Tensor:
            d = log_likelihood_with_diagnostics(
                model,
                guide,
                batch,
                num_samples=num_samples,
                chunk_size=chunk_size,
                compile=compile,
            )
            return torch.stack([d.log_likelihood, d.ess, d.khat], -1)

    else:
        tag, columns = (
            f"ais{ais_steps}x{num_chains}",
            (
                "stderr",
                "ess",
                "khat",
                "acceptance",
            ),
        )

        def estimate(batch: torch.Tensor) -> torch.Tensor:
            a = ais_log_likelihood(
                model,
                guide,
                batch,
                num_steps=ais_steps,
                num_chains=num_chains,
                chunk_size=chunk_size,
            )
            values = (a.stderr, a.ess, a.khat, a.acceptance_rate)
            return torch.stack([a.log_likelihood, *values], -1)

    start = time.perf_counter()
    compiled_before = compile_seconds(compile)
    results = distributed.sharded_map(
        estimate,
        points,
        seed=seed,
        batch_size=batch_size,
        callback=(
            None
            if callback is None
            else lambda r: callback(r[:, 0], min(mine, points.shape[0]))
        ),
    ).double()
    seconds = time.perf_counter() - start
    compile_time = compile_seconds(compile) - compiled_before
    estimates = results[:, 0]
    if distributed.is_main():
        warn_of_problems(estimates)
    nll = -estimates
    n = nll.shape[0]
    stderr = float(nll.std() / math.sqrt(n)) if n > 1 else None
    activity = distributed.from_main(lambda: _activity(guide, points, seed))
    active = count_active(activity)
    latent = {name: a.numel() for name, a in activity.items()}
    path = run_dir / f"eval-{split}-{tag}.json"
    estimates_path = run_dir / f"estimates-{split}-{tag}.txt"
    diagnostics_path = run_dir / f"diagnostics-{split}-{tag}.txt"
    values = dict(zip(columns, results[:, 1:].unbind(-1), strict=True))
    khat = values["khat"].nanmedian()
    diagnostics = {
        "ess_median": float(values["ess"].median()),
        # k-hat needs more than 20 weights (None: too few to fit a tail).
        "khat_median": float(khat) if khat.isfinite() else None,
        "khat_above_0.7": float((values["khat"] > KHAT_THRESHOLD).double().mean()),
    }
    if "acceptance" in values:
        diagnostics["acceptance_mean"] = float(values["acceptance"].mean())
    bits = None
    if config.likelihood in CONTINUOUS:
        bits = 1 / (config.x_dim * math.log(2))
    result = {
        "nll": float(nll.mean()),
        "stderr": stderr,
        "bits_per_dim": None if bits is None else float(nll.mean()) * bits,
        "bits_per_dim_stderr": None
        if bits is None or stderr is None
        else stderr * bits,
        "method": method,
        "k": num_samples if method == "iwae" else None,
        **({"ais_steps": ais_steps, "chains": num_chains} if method == "ais" else {}),
        "split": split,
        "points": n,
        "time": seconds,
        "compile_time": compile_time,
        "diagnostics": diagnostics,
        "active_units": active,
        "latent_units": latent,
        "seed": seed,
        "ranks": world,
        "dataset": config.dataset,
        "versions": versions(),
        "date": datetime.now().isoformat(timespec="seconds"),
        "file": str(path),
        "estimates_file": estimates_path.name,
        "diagnostics_file": diagnostics_path.name,
    }
    if distributed.is_main():
        # Per point, so that two runs scored on the same points can be compared
        # pairwise.
        write_text(estimates_path, "".join(f"{v:.6f}\n" for v in estimates.tolist()))
        rows = (" ".join(f"{v:.6g}" for v in row) for row in results[:, 1:].tolist())
        header = "# " + " ".join(columns) + "\n"
        write_text(diagnostics_path, header + "".join(f"{row}\n" for row in rows))
        write_json(path, result)
    distributed.barrier()  # the files are written when any rank returns
    return result


def _activity(
    guide: torch.nn.Module, points: torch.Tensor, seed: int
) -> dict[str, torch.Tensor]:
    """The latent activity of ``guide`` on ``points`` (on the CPU), drawn with
    its own seed."""
    with distributed.forked_rng(points.device):
        torch.manual_seed(seed)
        return {name: a.cpu() for name, a in latent_activity(guide, points).items()}


def read_estimates(run_dir: str | os.PathLike, evaluation: dict) -> torch.Tensor | None:
    """The per-point log-likelihood estimates (nats, float64) that ``evaluation``
    (a result of :func:`evaluate_run`) wrote in ``run_dir``; None if it has none."""
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
