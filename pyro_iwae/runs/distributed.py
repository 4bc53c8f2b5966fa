"""torch.distributed for pyro-iwae: one run trained, or one model evaluated, by
several processes launched by ``torchrun``.

Everything that knows about ranks lives here; :func:`pyro_iwae.fit` and
:func:`pyro_iwae.evaluate_run` call it, and without a process group (no
``torchrun``) every function here is the single-process identity, so nothing
changes.

- :func:`init` starts the process group from torchrun's environment (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): gloo on
  the CPU, NCCL with CUDA, each rank on ``cuda:LOCAL_RANK``.
  :func:`~pyro_iwae.fit` calls it, so a Python script that calls ``fit`` under
  torchrun needs nothing more.
- Training (:class:`DistributedLoss`): the objective is wrapped as an
  :class:`~pyro.infer.elbo.ELBOModule` inside
  :class:`~torch.nn.parallel.DistributedDataParallel`, created after one forward
  pass has made every (lazy) parameter. Every rank draws the same global
  mini-batch (same data generator, so the same permutation and binarisation as
  one process) and takes its own contiguous slice of it; its Monte Carlo noise
  comes from its own seed (:func:`noise_seed`). Each rank's loss is multiplied
  by ``world / global batch``, so
  that DDP's average of the ranks' gradients is the gradient of the
  single-process loss, the negative bound per point of the global batch.
- Evaluation (:func:`sharded_log_likelihood`): batches of test points are dealt
  to ranks (no point twice, no padding); batch ``i`` draws its particles from
  torch's random stream seeded by ``(seed, i)`` (:func:`batch_seed`), so each
  point's estimate is the same with any number of ranks; every rank gets the
  estimates back in the original order.
- Rank 0 alone writes files (:func:`is_main`); what it writes is first reduced
  or gathered over the ranks (:func:`mean_over_ranks`, :func:`gather_objects`),
  and what it reads is sent to the others (:func:`from_main`), so the other
  ranks need no shared folder to resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pyro
import torch
import torch.distributed as dist
from pyro.infer import ELBO
from pyro.infer.elbo import ELBOModule

from ..infer import evaluation
from .schedules import ConfigError

__all__ = [
    "DistributedLoss",
    "Ranks",
    "barrier",
    "batch_seed",
    "current",
    "forked_rng",
    "from_main",
    "gather_objects",
    "init",
    "is_main",
    "JOB_FILE",
    "job",
    "launched",
    "mean_over_ranks",
    "noise_seed",
    "record_job",
    "sharded_log_likelihood",
    "sharded_map",
    "shutdown",
    "started_by_this_job",
]

#: The environment variables torchrun sets for every worker.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's place in the process group."""

    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the one that writes files and reports."""
        return self.rank == 0


def launched() -> bool:
    """Whether torchrun (or a launcher like it) started this process."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def job() -> str | None:
    """This torchrun job's id (``TORCHELASTIC_RUN_ID``: its ``--rdzv-id``, drawn
    afresh by ``--standalone``), the same in every restart of its workers; None
    outside torchrun and for ``"none"``, torchrun's id of every job given no
    ``--rdzv-id`` with ``--master-port`` or ``--master-addr``."""
    name = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return None if name in ("", "none") else name


#: The file in which a new run started under torchrun names the job
#: (:func:`job`), for a restart of its workers to know the run its own.
JOB_FILE = ".torchrun-job"


def record_job(path: Path) -> None:
    """Names the torchrun job that starts a new run in folder ``path`` (outside
    torchrun: a stale name goes)."""
    name = job()
    if name is None:
        (path / JOB_FILE).unlink(missing_ok=True)
    else:
        (path / JOB_FILE).write_text(name + "\n")


def started_by_this_job(path: Path) -> bool:
    """Whether this torchrun job (:func:`job`) started the run in folder
    ``path``: a restart of its workers resumes that run, and no other."""
    name = job()
    try:
        return name is not None and (path / JOB_FILE).read_text().strip() == name
    except OSError:
        return False


def current() -> Ranks | None:
    """This process's :class:`Ranks` in the default process group; None without
    one (a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    rank = dist.get_rank()
    return Ranks(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))


def is_main() -> bool:
    """True in a single process and on rank 0."""
    ranks = current()
    return ranks is None or ranks.main


def init(device: torch.device | str | None = None) -> torch.device | None:
    """Starts the default process group from torchrun's environment if there is
    none yet, and returns where this rank computes.

    :param device: where one process would compute; ``cuda`` becomes
        ``cuda:LOCAL_RANK`` (and the current CUDA device) under a process group.
    :returns: ``device`` (None stays None) in a single process, this rank's
        device under a process group.
    :raises RuntimeError: if the process group cannot be started.
    """
    device = None if device is None else torch.device(device)
    if current() is None and launched():
        cuda = device is not None and device.type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        # torchrun's rendezvous store outlives a restart of the workers
        # (--max-restarts): keys of each attempt apart, so that the new ranks
        # do not find the addresses of the dead ones.
        store, rank, world = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            store=dist.PrefixStore(f"pyro-iwae/attempt-{attempt}", store),
            rank=rank,
            world_size=world,
            # Binds NCCL to this rank's GPU (barriers otherwise guess, and warn).
            device_id=torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            if cuda
            else None,
        )
    ranks = current()
    if ranks is not None and device is not None and device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    return device


def shutdown() -> None:
    """Ends the default process group, if there is one."""
    if current() is not None:
        dist.destroy_process_group()


def _seed(*parts: int | str) -> int:
    """A 63-bit seed that depends on every one of ``parts``."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def noise_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s Monte Carlo noise in a run seeded ``seed``."""
    return _seed("noise", seed, rank)


def batch_seed(seed: int | tuple[int, ...], index: int) -> int:
    """The seed of the particles of evaluation batch ``index`` under ``seed``."""
    return _seed("batch", seed, index)


def from_main(fn: Callable[[], T]) -> T:
    """``fn()`` called on rank 0 only, its value (or its exception) sent to every
    rank; in a single process, ``fn()``. For reading files that rank 0 wrote, or
    deciding something once (a new run directory)."""
    ranks = current()
    if ranks is None:
        return fn()
    box: list[Any] = [None]
    if ranks.main:
        try:
            box[0] = (True, fn())
        except Exception as e:  # re-raised on every rank below
            box[0] = (False, e)
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def barrier() -> None:
    """Waits until every rank gets here (nothing in a single process): after
    rank 0's writes, before the other ranks read them."""
    if current() is not None:
        dist.barrier()


def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` alone)."""
    ranks = current()
    if ranks is None:
        return [obj]
    objects: list[Any] = [None] * ranks.world
    dist.all_gather_object(objects, obj)
    return objects


def mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over the ranks (``tensor`` itself in one process)."""
    ranks = current()
    if ranks is None:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total / ranks.world


def all_agree(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank."""
    if current() is None:
        return flag
    value = torch.tensor([0 if flag else 1], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(value)
    return int(value) == 0


def _comm_device() -> torch.device:
    """Where tensors for collectives live: the current CUDA device under NCCL."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------
# Training


class _ScaledELBOModule(ELBOModule):
    """The objective's loss as a module, times ``scale``: ``-scale * sum of the
    bound over the batch``. Multiplied, not a ``poutine.scale`` of the sites:
    a compiled loss traced under the first call's scale kept it."""

    def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        return self.elbo.differentiable_loss(self.model, self.guide, x) * scale


class DistributedLoss:
    """This rank's part of the training loss, in DDP.

    Called with a *global* mini-batch (the same on every rank), it computes the
    objective on this rank's slice of it, scaled by ``world / len(batch)``, so
    that DDP's mean of the ranks' gradients is the gradient of the negative
    bound per point of the global batch, as one process computes it. The value
    returned is this rank's share; :func:`mean_over_ranks` of it is the loss.

    :param model: an ``nn.Module`` on ``device``, the same on every rank (DDP
        sends rank 0's parameters to the others).
    :param guide: likewise.
    :param objective: an ELBO with ``differentiable_loss``.
    :param example: a batch to make lazy parameters with (one eager pass, its
        random draws undone) before DDP takes the parameters.
    :raises ConfigError: for an objective without ``differentiable_loss``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        guide: torch.nn.Module,
        objective: ELBO,
        ranks: Ranks,
        device: torch.device,
        example: torch.Tensor,
    ) -> None:
        check_objective(objective)
        self.ranks = ranks
        module = _ScaledELBOModule(model, guide, objective)
        # Eagerly, whatever the objective's compile: a compiled loss builds its
        # first graph in the first step, timed as in one process.
        eager = getattr(objective, "eager_loss", objective.differentiable_loss)
        with (
            forked_rng(device),
            pyro.settings.context(module_local_params=True),
            pyro.validation_enabled(False),
        ):
            eager(model, guide, example[: max(1, example.shape[0] // ranks.world)])
        cuda = device.type == "cuda"
        self.ddp = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device] if cuda else None
        )

    def local_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of the global ``batch``."""
        return batch.tensor_split(self.ranks.world)[self.ranks.rank]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.ddp(self.local_batch(batch), self.ranks.world / batch.shape[0])


def check_objective(objective: ELBO) -> None:
    """:raises ConfigError: for an objective without ``differentiable_loss``,
    which DDP needs (Pyro's ``RenyiELBO``)."""
    if not hasattr(objective, "differentiable_loss"):
        raise ConfigError(
            f"{type(objective).__name__}, the {{objective}} given, has no "
            "differentiable_loss, which DistributedDataParallel needs; under "
            "torchrun train with iwae, vae, miwae, piwae or ciwae"
        )


def check_batch_size(batch_size: int, world: int) -> None:
    """:raises ConfigError: if the global ``batch_size`` does not split evenly
    over ``world`` ranks."""
    if batch_size % world:
        raise ConfigError(
            f"{{batch_size}} {batch_size} is the global batch, split evenly over "
            f"the {world} processes; choose a multiple of {world}"
        )


def check_batches(num_points: int, batch_size: int, ranks: Ranks | None) -> None:
    """:raises ConfigError: if the global ``batch_size`` does not split evenly
    over the ranks, or the last mini-batch has fewer points than there are
    ranks."""
    if ranks is None:
        return
    check_batch_size(batch_size, ranks.world)
    last = num_points % batch_size
    if 0 < last < ranks.world:
        raise ConfigError(
            f"the last mini-batch of each epoch holds {last} of the {num_points} "
            f"training points, fewer than the {ranks.world} processes; choose a "
            f"{{batch_size}} that leaves at least {ranks.world} in the last batch"
        )


def rng_states(device: torch.device) -> list[dict[str, torch.Tensor | None]]:
    """Every rank's torch random states (CPU, and this rank's CUDA device), in
    rank order; a collective under a process group."""
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    return gather_objects(state)


def restore_rank_rng(
    states: list[dict[str, Any]] | None, device: torch.device, fallback_seed: int
) -> None:
    """Restores this rank's random states from ``states`` (one per rank of the
    run that wrote them); a rank the run did not have is seeded with
    ``noise_seed(fallback_seed, rank)``."""
    ranks = current()
    rank = 0 if ranks is None else ranks.rank
    if states is None or rank >= len(states):
        torch.manual_seed(noise_seed(fallback_seed, rank))
        return
    torch.set_rng_state(states[rank]["torch"].cpu())
    cuda = states[rank].get("cuda")
    if device.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda.cpu(), device)


# ---------------------------------------------------------------------------
# Evaluation


@contextlib.contextmanager
def forked_rng(device: torch.device | None) -> Iterator[None]:
    """Torch's random states (CPU and ``device``) restored on exit."""
    cuda = device is not None and device.type == "cuda"
    devices = [device.index or 0] if cuda else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        yield


def sharded_log_likelihood(
    model: Callable,
    guide: Callable,
    data: torch.Tensor,
    *,
    num_samples: int,
    seed: int | tuple[int, ...],
    batch_size: int = 100,
    chunk_size: int | None = None,
    callback: Callable[[torch.Tensor], None] | None = None,
    **options: Any,
) -> torch.Tensor:
    """:func:`~pyro_iwae.log_likelihood` of every row of ``data`` ([N, ...]), in
    batches dealt to the ranks as :func:`sharded_map` does; ``options``
    (``max_plate_nesting``, ``vectorize_particles``) go to it.

    The estimates, ``[N]`` in the order of ``data``, on every rank, do not depend
    on the number of ranks. ``callback(estimates)`` is called after each of this
    rank's batches. Warns (:class:`~pyro_iwae.EstimateWarning`, on rank 0) as
    :func:`~pyro_iwae.dataset_log_likelihood` does.
    """

    def estimate(batch: torch.Tensor) -> torch.Tensor:
        return evaluation.log_likelihood(
            model,
            guide,
            batch,
            num_samples=num_samples,
            chunk_size=chunk_size,
            **options,
        )

    estimates = sharded_map(
        estimate, data, seed=seed, batch_size=batch_size, callback=callback
    )
    if is_main():
        evaluation.warn_of_problems(estimates, stacklevel=3)
    return estimates


def sharded_map(
    fn: Callable[[torch.Tensor], torch.Tensor],
    data: torch.Tensor,
    *,
    seed: int | tuple[int, ...],
    batch_size: int = 100,
    callback: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """``fn`` (per-point results ``[batch, ...]``) on every batch of ``batch_size``
    rows of ``data``, batches dealt to the ranks (batch ``i`` to rank ``i mod
    world``), with torch's random stream seeded by ``batch_seed(seed, i)`` for
    batch ``i`` and left as it was.

    :returns: the results ``[N, ...]`` in the order of ``data``, on every rank,
        the same for any number of ranks. ``callback(result)`` is called after
        each of this rank's batches.
    """
    ranks = current()
    rank, world = (0, 1) if ranks is None else (ranks.rank, ranks.world)
    device = data.device
    mine = {}
    for index in range(rank, math.ceil(data.shape[0] / batch_size), world):
        batch = data[index * batch_size : (index + 1) * batch_size]
        with forked_rng(device):
            torch.manual_seed(batch_seed(seed, index))
            mine[index] = fn(batch)
        if callback is not None:
            callback(mine[index])
    if ranks is not None:
        # Objects go through the CPU; the NCCL collective needs CUDA tensors only.
        gathered = gather_objects({i: e.cpu() for i, e in mine.items()})
        mine = {i: e.to(device) for part in gathered for i, e in part.items()}
    if not mine:
        return data.new_zeros(0)
    return torch.cat([mine[i] for i in sorted(mine)])
