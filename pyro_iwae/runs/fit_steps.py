"""The parts of :func:`~pyro_iwae.fit` that hold none of its loop's state: the
checks of its arguments, the data and parameters it trains, one Adam step, and
where training stands in the schedule (saved in checkpoints)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.distributions import constraints
from pyro.distributions.util import validation_enabled
from pyro.infer import ELBO
from pyro.infer.autoguide import AutoGuide
from pyro.poutine.runtime import effectful
from torch.nn.parameter import is_lazy

from ..data import Dataset, in_unit_interval
from ..errors import CheckpointError, ProgramError, literal, one_line
from ..infer.arguments import check_tensor
from ..infer.estimable import check_plates, trace_shapes_dropped, traced_pair
from ..infer.evaluation import evaluating
from ..infer.hooks import backend_of, compiler, compiles
from . import distributed
from .callbacks import FitCallback
from .checkpoints import CHECKPOINT_FILE
from .schedules import Schedule, as_schedule, continues


@dataclasses.dataclass
class Position:
    """Where training stands: the next epoch to run, and how far into it."""

    stage: int = 0  # index into the schedule
    stage_epoch: int = 0  # epochs finished in this stage
    epochs_done: int = 0  # epochs finished in all
    step: int = 0  # steps finished in the current epoch
    global_step: int = 0
    elapsed: float = 0.0  # seconds of training and evaluation, over resumes

    def advance_epoch(self, schedule: Schedule) -> None:
        self.stage_epoch += 1
        self.epochs_done += 1
        self.step = 0
        if self.stage_epoch == schedule[self.stage][0]:
            self.stage, self.stage_epoch = self.stage + 1, 0


def checked_schedule(
    objective: ELBO,
    schedule: Iterable[Sequence[Any]],
    batch_size: int,
    checkpoint_every: int | None,
    resume: bool,
    run_dir: str | os.PathLike | None,
    seed: Any = 0,
    config: dict[str, Any] | None = None,
    callback: Any = None,
) -> Schedule:
    """The schedule as (epochs, lr) pairs, once the arguments of fit that need
    no model (``objective``, ``seed``, ``config``, ``callback``) are checked."""
    if not isinstance(objective, ELBO):
        raise TypeError(
            "fit's objective is a Pyro ELBO, such as IWELBO(5) or "
            f"make_objective('iwae', 5), got {type(objective).__name__}"
        )
    schedule = as_schedule(schedule)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if resume and run_dir is None:
        raise ValueError("resume needs the run_dir of the run to continue")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if callback is not None and not isinstance(callback, FitCallback):
        raise TypeError(
            f"fit's callback must be a FitCallback, got {type(callback).__name__}; "
            "subclass pyro_iwae.FitCallback and override the hooks you need"
        )
    try:  # the checkpoint keeps it, and loads only plain values back
        json.dumps(config, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"fit's config is stored in the checkpoint, which keeps JSON values only "
            f"(strings, numbers, booleans, None, lists and dicts of them): "
            f"{one_line(e)}; convert the values (str(path), float(x))"
        ) from None
    return schedule


#: How to give fit a parameter it trains, where a program is no module or a
#: pyro.param is none of the module's parameters.
_PYRO_PARAM_ADVICE = (
    "write it as a PyroModule with PyroParam s (or nn.Parameter s) in place of "
    "pyro.param"
)


def parameters_of(*modules: Any) -> list[torch.nn.Parameter]:
    """The parameters of the modules among ``modules``, each once.

    :raises ValueError: if there are some and all are frozen."""
    params: dict[int, torch.nn.Parameter] = {}
    for module in modules:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(
                f"fit needs the model and guide to be torch.nn.Module s (e.g. "
                f"PyroModule), got {type(module).__name__}; {_PYRO_PARAM_ADVICE}"
            )
        auto = [m for m in module.modules() if isinstance(m, AutoGuide)]
        if auto:
            # It failed in Pyro's local param mode, with a dump of trace shapes.
            raise ProgramError(
                f"fit cannot train Pyro's autoguides ({type(auto[0]).__name__}): it "
                "draws mini-batches, which an autoguide's latents, made for the "
                "whole data set, cannot follow; train it with IWELBO(...)(model, "
                "guide) and an optimiser, or Pyro's SVI, on all the data"
            )
        for p in module.parameters():
            params.setdefault(id(p), p)
    if params and not any(p.requires_grad for p in params.values()):
        raise ValueError(
            "fit found every parameter of the model and guide frozen "
            "(requires_grad False): nothing to train; unfreeze some"
        )
    return list(params.values())


def fit_data(
    data: Dataset | torch.Tensor,
    test_data: torch.Tensor | None,
    test_size: int | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training grey levels and the test points (None: none) on ``device``."""
    if isinstance(data, Dataset):
        train = data.train
        if test_data is None:
            test_data = data.test
    else:
        train = data
    # As the evaluators: a NumPy array failed on its missing tensor methods.
    check_tensor("fit's data", train)
    if test_data is not None:
        check_tensor("fit's test_data", test_data)
    if train.dim() < 2 or not len(train):
        raise ValueError(
            f"fit takes data of shape [N, ...], one row per point, with at least "
            f"one point, got shape {list(train.shape)} (one point: x.unsqueeze(0))"
        )
    if train.is_floating_point() and not bool(train.isfinite().all()):
        rows = (~train.isfinite()).reshape(len(train), -1).any(-1)
        raise ValueError(
            f"fit's training data hold NaN or infinite values ({int(rows.sum())} "
            f"of {len(train)} points); drop those points or fill them in"
        )
    train = train.to(device)
    test = None
    if test_data is not None:
        test = test_data[:test_size] if test_size is not None else test_data
        if test.shape[1:] != train.shape[1:] or test.dtype != train.dtype:
            raise ValueError(
                f"fit's test points are {test.dtype} of shape {list(test.shape[1:])}, "
                f"its training points {train.dtype} of shape "
                f"{list(train.shape[1:])}; pass test points like the training ones"
            )
        test = test.to(device) if test.shape[0] else None
    return train, test


def binarizes(
    data: Dataset | torch.Tensor, binarize: bool | None, train: torch.Tensor
) -> bool:
    """Whether fit binarises each mini-batch; checks that it can."""
    if binarize is None:
        binarize = isinstance(data, Dataset) and data.binarize == "dynamic"
    if binarize and not in_unit_interval(train):
        raise ValueError(
            "binarize needs training values in [0, 1] (Bernoulli probabilities); "
            "scale the data into [0, 1], or train on them as given (binarize=False)"
        )
    return bool(binarize)


# A network's own one-line refusal (data of another dtype) is raised as it
# was, without Pyro's dump of the trace shapes.
@trace_shapes_dropped()
def adam_step(
    objective: ELBO,
    differentiable: bool,
    model: torch.nn.Module,
    guide: torch.nn.Module,
    batch: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    distributed_loss: distributed.DistributedLoss | None = None,
) -> torch.Tensor:
    """One Adam step on the negative bound per point; returns it, detached
    (under torchrun: this rank's share of it, see
    :class:`~pyro_iwae.runs.distributed.DistributedLoss`)."""
    n = batch.shape[0]
    compiled = getattr(objective, "compile", False)
    if distributed_loss is None and differentiable and compiles(compiled):
        # One graph for the scaled loss, its gradients and (Adam on the CPU)
        # the update: no backward pass or optimiser call of its own.
        step = compiler().step(objective, model, guide, backend_of(compiled))
        return step(optimizer, batch, scale=1 / n)
    optimizer.zero_grad(set_to_none=True)
    if distributed_loss is not None:
        loss = distributed_loss(batch)
        loss.backward()
        loss = loss.detach()
    elif differentiable:
        loss = objective.differentiable_loss(model, guide, batch) / n
        loss.backward()
        loss = loss.detach()
    else:
        # RenyiELBO: no differentiable_loss; it accumulates the gradient of the
        # summed bound, so scale the gradients to the bound per point.
        value = objective.loss_and_grads(
            with_param_sites(model, "model"), with_param_sites(guide, "guide"), batch
        )
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.div_(n)
        loss = torch.as_tensor(value / n, device=batch.device)
    optimizer.step()
    return loss


def with_param_sites(module: torch.nn.Module, name: str) -> Callable[..., Any]:
    """``module`` as a program that first records each of its trainable
    parameters as a ``param`` site (named ``fit:<name>.<parameter>``), as a
    PyroModule in module-local mode records its own.

    Pyro's ``RenyiELBO.loss_and_grads`` calls ``backward`` only where its
    traces hold a ``param`` site: the ``nn.Parameter`` s of a plain
    ``nn.Module`` are none, and fit trained nothing. The sites' values are the
    parameters themselves; no store holds them and the bound is unchanged."""

    def program(*args: Any, **kwargs: Any) -> Any:
        for param_name, value in module.named_parameters():
            if value.requires_grad:
                site = f"fit:{name}.{param_name}"
                record = effectful(type="param")(lambda *_, _value=value, **__: _value)
                record(site, constraint=constraints.real, event_dim=None, name=site)
        return module(*args, **kwargs)

    return program


def rate(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else 0.0


def fit_state(schedule: Schedule, batch_size: int) -> dict[str, Any]:
    """What a checkpoint must have been written with to be resumed by a fit
    with this ``schedule`` and ``batch_size`` (its ``"fit"`` entry)."""
    return {"schedule": [list(stage) for stage in schedule], "batch_size": batch_size}


#: The settings of an objective a checkpoint records, where it has them.
_OBJECTIVE_SETTINGS = ("num_particles", "estimator", "num_groups", "beta", "alpha")


def fit_record(objective: ELBO, seed: int, train: torch.Tensor) -> dict[str, Any]:
    """What a checkpoint records of the fit that wrote it, for a resume to check
    (its ``"record"`` entry): the objective's class and settings, the seed, and
    the training data's shape and sum."""
    settings = {
        name: getattr(objective, name)
        for name in _OBJECTIVE_SETTINGS
        if isinstance(getattr(objective, name, None), int | float | str)
    }
    return {
        "objective": {"class": type(objective).__name__, **settings},
        "seed": seed,
        "data": {
            "shape": list(train.shape),
            "sum": float(train.sum(dtype=torch.float64)),
        },
    }


def check_same_fit(
    checkpoint: dict[str, Any], record: dict[str, Any], path: Path
) -> None:
    """:raises CheckpointError: where the checkpoint at ``path`` records (see
    :func:`fit_record`) another objective, seed or training data than
    ``record``; a checkpoint that records none is not checked."""
    saved = checkpoint.get("record")
    saved = saved if isinstance(saved, dict) else {}
    differences = [
        f"{name} {_spelled(saved[name])} (not {_spelled(record[name])})"
        for name in ("objective", "seed")
        if name in saved and saved[name] != record[name]
    ]
    data, now = saved.get("data"), record["data"]
    if isinstance(data, dict) and data.get("shape") != now["shape"]:
        differences.append(f"data of shape {data.get('shape')} (not {now['shape']})")
    elif isinstance(data, dict) and not math.isclose(
        data.get("sum", math.nan), now["sum"], rel_tol=1e-9, abs_tol=1e-9
    ):
        # Summed on another device, the same data round alike to 1e-9.
        differences.append("other training data of that shape")
    if differences:
        raise CheckpointError(
            f"the run of checkpoint {path} was trained with "
            f"{', '.join(differences)}; resume with the run's own objective, seed "
            "and data, or start a new run in another run_dir"
        )


def _spelled(value: Any) -> str:
    """An objective's record as ``IWELBO(num_particles=5, ...)``; others as
    they are."""
    if isinstance(value, dict) and "class" in value:
        settings = ", ".join(f"{k}={v!r}" for k, v in value.items() if k != "class")
        return f"{value['class']}({settings})"
    return repr(value)


def check_continues(
    checkpoint: dict[str, Any], schedule: Schedule, batch_size: int, path: Path
) -> None:
    """:raises CheckpointError: unless the checkpoint at ``path`` was written with
    this batch size and a schedule that this one continues (the same, or one
    with more epochs or stages)."""
    saved = checkpoint.get("fit")
    position = checkpoint.get("position")
    if isinstance(saved, dict) and isinstance(position, dict):
        epochs = position.get("epochs_done", 0) + bool(position.get("step"))
        try:
            earlier = as_schedule(saved.get("schedule", []))
        except (TypeError, ValueError):
            earlier = []
        if saved.get("batch_size") == batch_size and continues(
            schedule, earlier, epochs
        ):
            return
        planned = sum(stage_epochs for stage_epochs, _ in schedule)
        if planned < epochs:
            raise CheckpointError(
                f"the run in {literal(path.parent)} has trained {epochs} epochs, "
                f"more than the {planned} asked for; a resumed schedule may only "
                "go on: drop {epochs} and {stages} to finish it, or give more",
                template=True,
            )
    raise CheckpointError(
        f"checkpoint {path} was written with schedule and batch "
        f"size {saved}, not {fit_state(schedule, batch_size)}; resume with the "
        "run's own settings (a schedule may only go on for longer) or start a new run"
    )


def check_fit_program(
    model: torch.nn.Module,
    guide: torch.nn.Module,
    train: torch.Tensor,
    test: torch.Tensor | None,
) -> None:
    """Checks, before training, that Adam trains every parameter of ``model``
    and ``guide`` (see :func:`check_module_params`, on the first training
    point) and that the per-epoch test bound can be computed on the ``test``
    points (see :func:`check_test_bound`).

    :raises ProgramError: as those.
    """
    check_module_params(model, guide, train[:1])
    check_test_bound(model, guide, test, "test_size=0")


def check_module_params(
    model: torch.nn.Module, guide: torch.nn.Module, point: torch.Tensor
) -> None:
    """Checks, on one run of ``guide`` and ``model`` on ``point`` as fit trains
    them (module-local parameters), that each of their ``pyro.param`` sites is a
    parameter of theirs: fit's Adam updates those alone.

    :raises ProgramError: for a ``pyro.param`` of Pyro's global store, which
        fit would leave as it was, the bound flat and no word said.
    """
    owned = {id(p) for module in (model, guide) for p in module.parameters()}
    if any(is_lazy(p) for module in (model, guide) for p in module.parameters()):
        return  # lazy parameters are made in training, from fit's seed
    try:
        # Without checks of the values (grey levels that a Bernoulli model is
        # trained on as binarised draws), nor Pyro's refusal of a pyro.param in
        # a PyroModule, which names no site.
        with (
            evaluating(model, guide),
            validation_enabled(False),
            pyro.settings.context(module_local_params=True, validate_poutine=False),
        ):
            traces = traced_pair(model, guide, point)
    except Exception:  # noqa: BLE001 - the first training step names its failure
        return
    for name, trace in zip(("model", "guide"), traces, strict=True):
        for site in trace.nodes.values():
            if site["type"] != "param":
                continue
            value = site["value"]
            if getattr(value, "unconstrained", None) is not None:
                value = value.unconstrained()  # a weak reference
            if id(value) in owned:
                continue
            what, advice = (
                # pyro.module of a module the model or guide does not hold.
                ("parameter", f"register its module as a submodule of the {name}")
                if isinstance(value, torch.nn.Parameter)
                else ("pyro.param", _PYRO_PARAM_ADVICE)
            )
            raise ProgramError(
                f"fit trains the parameters of the model's and guide's modules "
                f"alone, but the {name}'s {what} {site['name']!r} is none of "
                f"them: it would stay as it is; {advice}"
            )


def check_test_bound(
    model: torch.nn.Module,
    guide: torch.nn.Module,
    test: torch.Tensor | None,
    advice: str,
) -> None:
    """Checks, on one run of ``guide`` and ``model`` on the first test point,
    that the per-epoch test bound can be computed (see ``check_plates``): said
    before training, not after the first epoch. ``advice`` (a template, see
    :class:`~pyro_iwae.errors.PyroIwaeError`) says how to pass no test points.

    :raises ProgramError: as ``check_plates``.
    """
    params = [p for module in (model, guide) for p in module.parameters()]
    if test is None or any(is_lazy(p) for p in params):
        return  # lazy parameters are made in training, from fit's seed
    try:
        with evaluating(model, guide):
            traces = traced_pair(model, guide, test[:1])
    except Exception:  # noqa: BLE001 - the first training step names its failure
        return
    advice = f"train without test points ({advice})"
    check_plates(*traces, caller="the per-epoch test bound", advice=advice)


def program_nesting(objective: ELBO) -> float:
    """The ``max_plate_nesting`` of the program ``objective`` trains (inf:
    guessed), without the particle plate Pyro's ELBO counts in it where it
    vectorizes more than one particle."""
    particle_plate = getattr(objective, "vectorize_particles", False) and (
        getattr(objective, "num_particles", 1) > 1
    )
    return getattr(objective, "max_plate_nesting", float("inf")) - particle_plate


def test_bound(
    model: torch.nn.Module,
    guide: torch.nn.Module,
    test: torch.Tensor,
    *,
    objective: ELBO,
    batch_size: int,
    seed: tuple[int, int],
) -> float:
    """The bound of the ``objective``'s number of particles (its plate nesting
    and particle mode too), mean over the ``test`` points, shared among the
    ranks of a torchrun. Its particles are drawn from streams of their own,
    seeded by ``seed`` (the run's seed and epoch): drawn from training's, they
    made the trained parameters depend on the number of test points."""
    nesting = program_nesting(objective)
    estimates = distributed.sharded_log_likelihood(
        model,
        guide,
        test,
        seed=seed,
        batch_size=batch_size,
        num_samples=getattr(objective, "num_particles", 1),
        max_plate_nesting=1 if nesting == float("inf") else nesting,
        vectorize_particles=getattr(objective, "vectorize_particles", True),
    )
    return float(estimates.mean())


def diverged_message(what: str, position: Position, run_dir: Path | None) -> str:
    """What :class:`~pyro_iwae.errors.TrainingDiverged` says when ``what`` (the
    loss, a parameter) became NaN or infinite at ``position``."""
    kept = (
        f"; the checkpoint of epoch {position.epochs_done} in {run_dir} is kept"
        if run_dir is not None and (run_dir / CHECKPOINT_FILE).exists()
        else ""
    )
    return (
        f"{what} became NaN or infinite in epoch {position.epochs_done + 1} "
        f"(by step {position.step}){kept}; start a new run with a lower "
        "learning rate or another seed (resuming would repeat the same steps)"
    )
