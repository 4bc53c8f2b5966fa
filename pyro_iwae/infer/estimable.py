"""What a per-point estimate of log p(x) needs of a model and guide, checked on
one run of them: a data plate around every sample site, the observed values
along it, a guide with a density, every point in every chunk (no sub-sampled
plate), unscaled latents masked alike in model and guide, and no guide latent
the model lacks or observes. Each failure is a ``ProgramError`` (a
``ValueError``) of one line, naming the site and what to do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pyro
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from ..errors import (
    PlateNestingError,
    ProgramError,
    PyroIwaeError,
    literal,
    one_line,
)
from .arguments import cuda_devices
from .support import is_point_mass
from .traces import (
    PARTICLE_PLATE,
    latent_sites,
    plate_depth,
    relative_scale,
    sample_sites,
)


def check_density(guide_trace: pyro.poutine.Trace, caller: str) -> None:
    """:raises ProgramError: if every latent site of the guide is a point mass
    (``Delta``, as ``AutoDelta``'s are): its draws have no density to weigh."""
    latent = list(latent_sites(guide_trace))
    if latent and all(is_point_mass(site["fn"]) for _, site in latent):
        raise ProgramError(
            f"{caller} weighs the guide's draws by its density, but every latent "
            f"site of the guide is a point mass (Delta: {latent[0][0]!r}), "
            "as AutoDelta's are: the estimate would be log p(x, z) at one z, no "
            "bound on log p(x); use a guide with a density, such as AutoNormal"
        )


def check_guide_sites(
    model_trace: pyro.poutine.Trace, guide_trace: pyro.poutine.Trace, caller: str
) -> None:
    """:raises ProgramError: if a latent site of the guide is not in the model
    (unless marked auxiliary) or is observed there: its q would count without
    its part in p, and neither a bound nor an estimate of log p(x) comes out;
    or if it has other event dims there (Pyro's ``Model and guide event_dims
    disagree``)."""
    for name, site in latent_sites(guide_trace):
        # An auxiliary site (an autoguide's joint draw) is followed by the model's
        # sites as Delta sites that carry its transform's density.
        if name not in model_trace.nodes and not site["infer"].get("is_auxiliary"):
            raise ProgramError(
                f"{caller} weighs each draw by p(x, z) / q(z), but the guide's latent "
                f"site {name!r} is not in the model: its density would count in q "
                "without its part in p, and the estimate is no bound on log p(x); "
                "sample it in the model too, or drop it from the guide"
            )
        if name in model_trace.nodes and model_trace.nodes[name]["is_observed"]:
            raise ProgramError(
                f"{caller} weighs each draw by p(x, z) / q(z), but the guide's latent "
                f"site {name!r} is observed in the model (poutine.condition, or "
                "obs=): q would count its draw while p scores the observed value, "
                "and the estimate is no bound; drop it from the guide, or do not "
                "condition the model on it"
            )
        in_model = model_trace.nodes.get(name)
        if in_model is not None and in_model["fn"].event_dim != site["fn"].event_dim:
            raise ProgramError(
                f"latent site {name!r} has {site['fn'].event_dim} event dims in the "
                f"guide but {in_model['fn'].event_dim} in the model, which Pyro "
                "refuses: give it the same event dims in both (.to_event over the "
                "same dims, inside the same plates)"
            )


def traced_pair(
    model: Callable, guide: Callable, *args: Any, **kwargs: Any
) -> tuple[pyro.poutine.Trace, pyro.poutine.Trace]:
    """``(model_trace, guide_trace)`` of one run of ``guide`` and of ``model``
    replayed on its draws, without particle plates: from a forked random
    stream, without gradients, nothing seen by the handlers around the call."""
    with (
        torch.random.fork_rng(devices=cuda_devices(args, kwargs)),
        torch.no_grad(),
        pyro.poutine.block(),
    ):
        guide_trace = pyro.poutine.trace(guide).get_trace(*args, **kwargs)
        replayed = pyro.poutine.replay(model, trace=guide_trace)
        model_trace = pyro.poutine.trace(replayed).get_trace(*args, **kwargs)
    return model_trace, guide_trace


def plate_nesting(model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> int:
    """The ``max_plate_nesting`` of ``model`` and ``guide``: how deep their
    vectorized plates nest on one run on ``args`` (as :func:`check_program` runs
    them), and at least 1, the data plate's. 1 where they fail to run: the
    estimator's own checks then say why."""
    try:
        with pyro.settings.context(module_local_params=True):
            traces = traced_pair(model, guide, *args, **kwargs)
    except Exception:  # noqa: BLE001 - their failure is said where they are used
        return 1
    return traced_nesting(traces)


def traced_nesting(traces: tuple[pyro.poutine.Trace, pyro.poutine.Trace]) -> int:
    """The ``max_plate_nesting`` of the model and guide of ``traces`` (see
    :func:`plate_nesting`): how deep their vectorized plates nest, at least 1."""
    return max(1, plate_depth(sample_sites(traces)))


def innermost(error: BaseException) -> BaseException:
    """``error`` without the trace shapes Pyro appends to an error raised inside
    a traced program (a copy of it, raised from it, with the shapes after its
    message)."""
    while (
        (cause := error.__cause__) is not None
        and type(cause) is type(error)
        and str(error).startswith(str(cause))
    ):
        error = cause
    return error


@contextmanager
def trace_shapes_dropped() -> Iterator[None]:
    """Raises a ``ValueError`` or ``RuntimeError`` from inside a traced program
    (a network's own message, say: torch's dtype mismatch is a RuntimeError) as
    it was raised, without the trace shapes Pyro appends (as the evaluators'
    :func:`check_plates` run does)."""
    try:
        yield
    except (ValueError, RuntimeError) as e:
        inner = innermost(e)
        if inner is e:
            raise
        raise inner from inner.__cause__


def check_program(
    model: Callable,
    guide: Callable,
    *args: Any,
    caller: str = "fit",
    max_plate_nesting: int | None = None,
    **kwargs: Any,
) -> int:
    """Runs ``guide`` and ``model`` once on ``args`` (see :func:`traced_program`)
    and checks their sites with :func:`check_guide_sites` and
    :func:`check_batch_dims`: said before training, not as a number that is no
    bound. Returns the ``max_plate_nesting`` they were checked at: the one given,
    or where None, how deep their plates nest (:func:`traced_nesting`), as a run
    trains them.

    :raises ProgramError: as those, or where they fail to run.
    """
    traces = traced_program(model, guide, *args, **kwargs)
    if max_plate_nesting is None:
        max_plate_nesting = traced_nesting(traces)
    check_guide_sites(*traces, caller)
    check_batch_dims(*traces, caller, max_plate_nesting)
    return max_plate_nesting


def traced_program(
    model: Callable, guide: Callable, *args: Any, **kwargs: Any
) -> tuple[pyro.poutine.Trace, pyro.poutine.Trace]:
    """:func:`traced_pair` with module-local parameters, as ``fit`` runs them.

    :raises ProgramError: where they fail to run together (a guide latent of
        another size than the model's), with their error's first line.
    """
    try:
        with pyro.settings.context(module_local_params=True):
            return traced_pair(model, guide, *args, **kwargs)
    except PyroIwaeError:
        raise
    except (ValueError, RuntimeError, TypeError, IndexError) as e:
        error = f"{type(e).__name__}: {one_line(innermost(e))}"
        for name, fn in (("guide", guide), ("model", model)):
            if not _runs(fn, args, kwargs):  # its own failure, not the pair's
                raise ProgramError(
                    f"the {name} fails when run on a batch of the data ({error})"
                ) from e
        raise ProgramError(
            f"model and guide fail when run together on a batch of the data "
            f"({error}), though each runs alone; make the guide's latent sites "
            "those of the model, of the same shapes"
        ) from e


def check_batch_dims(
    model_trace: pyro.poutine.Trace,
    guide_trace: pyro.poutine.Trace,
    caller: str = "log_likelihood",
    max_plate_nesting: int | None = None,
) -> None:
    """:raises ProgramError: if a sample site's log-prob has a batch dim of size
    > 1 that no plate around it declares nor enumeration allocated, where the
    weights would take it for another dim: left of the ``max_plate_nesting``
    plate dims (the particles'; None: the particle plate's place in the traces,
    else as deep as the program's plates nest), or where a plate around an
    observed site runs (the data's). Another such dim is summed, as Pyro sums a
    plate's."""
    sites = [
        s for s in sample_sites((model_trace, guide_trace)) if not site_is_subsample(s)
    ]
    enumerated = {site["infer"].get("_enumerate_dim") for site in sites}
    plates = {
        f.dim: f.name for s in sites for f in s["cond_indep_stack"] if f.vectorized
    }
    particle = [dim for dim, name in plates.items() if name == PARTICLE_PLATE]
    if particle:
        max_plate_nesting = -particle[0] - 1
    elif max_plate_nesting is None or max_plate_nesting == float("inf"):
        max_plate_nesting = max((-dim for dim in plates), default=0)
    data = {
        f.dim: f.name
        for s in sites
        if s["is_observed"]
        for f in s["cond_indep_stack"]
        if f.vectorized and f.name != PARTICLE_PLATE
    }
    for site in sites:
        batch = log_prob_batch(site)
        if batch is None:  # the log-prob fails: its own error says why
            continue
        own = {f.dim for f in site["cond_indep_stack"] if f.vectorized}
        for dim in range(-1, -len(batch) - 1, -1):
            if batch[dim] == 1 or dim in own or dim in enumerated:
                continue
            if dim < -max_plate_nesting:
                taken = "the particles'"
            elif dim in data:
                taken = f"plate {data[dim]!r}'s"
            else:
                continue
            raise ProgramError(
                f"site {site['name']!r} has batch shape {list(batch)}, whose dim "
                f"{dim} (size {batch[dim]}) is in no pyro.plate around it, so "
                f"{caller} would take it for {taken}: make each point's values the "
                "distribution's event (.to_event(1) for a vector per point) or "
                "declare that dim with pyro.plate"
            )


def check_plate_dims(
    model_trace: pyro.poutine.Trace,
    guide_trace: pyro.poutine.Trace,
    caller: str,
    max_plate_nesting: int,
) -> None:
    """:raises PlateNestingError: (a ``ProgramError``) if a plate of the model or
    guide is at a dim left of the ``max_plate_nesting`` rightmost batch dims (the
    particle plate's left out): the weights take such a dim as the particles',
    and the number is no bound on log p(x) (Pyro's ELBOs refuse it as a plate
    stack overflow)."""
    plates = {
        f.dim: f.name
        for s in sample_sites((model_trace, guide_trace))
        for f in s["cond_indep_stack"]
        if f.vectorized and f.name != PARTICLE_PLATE
    }
    deepest = min(plates, default=0)
    if deepest < -max_plate_nesting:
        kept = {0: "no batch dim", 1: "only dim -1"}.get(
            max_plate_nesting, f"only dims -1 to -{max_plate_nesting}"
        )
        raise PlateNestingError.of_plate(
            f"plate {plates[deepest]!r} of the model or guide is at dim={deepest}, "
            f"but max_plate_nesting={max_plate_nesting} keeps {kept} for plates, "
            f"so {caller} would take dim {deepest} as the particles' dim",
            -deepest,
        )


def log_prob_batch(site: dict) -> torch.Size | None:
    """The batch shape of sample site ``site``'s log-prob: its distribution's
    batch shape broadcast with its value's; None where they do not broadcast."""
    fn, shape = site["fn"], getattr(site["value"], "shape", ())
    try:
        return torch.broadcast_shapes(
            fn.batch_shape, shape[: max(len(shape) - fn.event_dim, 0)]
        )
    except RuntimeError:
        return None


def _runs(program: Callable, args: tuple, kwargs: dict) -> bool:
    """Whether ``program`` runs alone on ``args`` (as :func:`traced_pair` runs
    it, with module-local parameters)."""
    try:
        with (
            pyro.settings.context(module_local_params=True),
            torch.random.fork_rng(devices=cuda_devices(args, kwargs)),
            torch.no_grad(),
            pyro.poutine.block(),
        ):
            pyro.poutine.trace(program).get_trace(*args, **kwargs)
    except Exception:  # noqa: BLE001 - any failure is its own
        return False
    return True


def check_weights(
    model_trace: pyro.poutine.Trace, guide_trace: pyro.poutine.Trace, caller: str
) -> None:
    """Checks that each particle's weight p(x, z) / q(z) is one of every point's
    own, unbiased for p(x).

    :raises ProgramError: as :func:`check_guide_sites`; if a latent site has
        another scale than the observed sites (``poutine.scale`` on it: a
        tempered density) or is masked otherwise in the model than in the guide.
        (A plate that draws its own sub-sample is found by
        :func:`checked_particles`: the traces keep no sub-sample sites.)
    """
    check_guide_sites(model_trace, guide_trace, caller)
    for name, site in latent_sites(guide_trace):
        _check_masks(name, model_trace.nodes.get(name), site, caller)
    observed = [s for s in sample_sites((model_trace,)) if s["is_observed"]]
    if not observed:
        return
    for which, trace in (("model", model_trace), ("guide", guide_trace)):
        for _, site in latent_sites(trace):
            factor = relative_scale(site, observed[0]["scale"])
            if not (isinstance(factor, float) and factor == 1.0):
                raise ProgramError(
                    f"{caller} estimates log p(x), but the {which}'s latent site "
                    f"{site['name']!r} has another scale ({site['scale']}) than the "
                    f"observed sites ({observed[0]['scale']}; poutine.scale): the "
                    "estimate would be of a tempered density; scale model and "
                    "guide alike, or evaluate without that scale (an annealing "
                    "weight set to 1)"
                )


def _check_masks(name: str, in_model: dict | None, in_guide: dict, caller: str) -> None:
    """:raises ProgramError: where latent site ``name`` is masked otherwise in the
    model than in the guide (``poutine.mask`` on one of them): at a point masked
    in one only, the weight is of q, or of p, alone."""
    if in_model is None or in_model["is_observed"]:
        return
    masks = [site["mask"] for site in (in_model, in_guide)]
    if all(m is None or m is True for m in masks):
        return
    try:
        model_mask, guide_mask = torch.broadcast_tensors(
            *(torch.as_tensor(True if m is None else m) for m in masks)
        )
        alike = torch.equal(model_mask, guide_mask)
    except RuntimeError:  # masks of shapes that do not broadcast
        alike = False
    if not alike:
        raise ProgramError(
            f"{caller} weighs each draw by p(x, z) / q(z), but latent site {name!r} "
            "is masked otherwise in the model than in the guide (poutine.mask): at "
            "a point masked in one only, the weight is of q or of p alone; mask "
            "the guide as the model, or neither"
        )


class _SubsampleDraws(Messenger):
    """Records the plates that draw a sub-sample of their indices (the traces
    of particles keep no sub-sample sites)."""

    def __init__(self) -> None:
        super().__init__()
        self.plates: list[str] = []

    def _pyro_post_sample(self, msg: dict) -> None:
        # A plate's sub-sample site bears the plate's name.
        if site_is_subsample(msg) and _draws_subsample(msg["fn"]):
            self.plates.append(msg["name"])


def checked_particles(draw: Callable[[], Any], caller: str = "log_likelihood") -> Any:
    """``draw()``'s particles (a :class:`~pyro_iwae.infer.log_weights.Particles`),
    checked by :func:`check_plates` on their first pair of traces.

    :raises ProgramError: as :func:`check_plates`, and where a plate draws a
        sub-sample of the points (``subsample_size``): each chunk of particles,
        or each step of a chain, would weigh other points.
    """
    recorder = _SubsampleDraws()
    with recorder:
        particles = draw()
    if recorder.plates:
        raise ProgramError(
            f"{caller} gives one estimate per data point, but plate "
            f"{recorder.plates[0]!r} draws a sub-sample of the points "
            "(subsample_size), other points every time the model runs; pass the "
            "points to estimate as the whole batch, without subsample_size"
        )
    # The log-weights' dims: the particles', then the plates'.
    nesting = particles.log_weights.dim() - 1
    check_plates(*particles.traces[0], caller=caller, max_plate_nesting=nesting)
    return particles


def _draws_subsample(fn: Any) -> bool:
    """Whether a plate's ``_Subsample`` draws fewer indices than its size (a
    sub-sample given as ``subsample=`` draws none)."""
    wanted = getattr(fn, "subsample_size", None)
    return wanted is not None and wanted < fn.size


def check_plates(
    model_trace: pyro.poutine.Trace,
    guide_trace: pyro.poutine.Trace,
    caller: str = "log_likelihood",
    max_plate_nesting: int | None = None,
    advice: str | None = None,
) -> None:
    """Checks that a data plate encloses every sample site and that the observed
    values run along it, for per-point estimates by ``caller``. ``advice`` (a
    template, see :class:`~pyro_iwae.errors.PyroIwaeError`) says what to do where
    no plate encloses every site (by default: how to put it in one).

    :raises ProgramError: naming the site and what to do; also for a guide of
        point masses only (see :func:`check_density`), a latent site scaled
        apart from the observed ones, or a guide latent site the model lacks
        (see :func:`check_weights`), or a batch dim in no plate (see
        :func:`check_batch_dims`).
    """
    check_density(guide_trace, caller)
    check_weights(model_trace, guide_trace, caller)
    sites = [
        site
        for site in sample_sites((model_trace, guide_trace))
        if not site_is_subsample(site)
    ]
    frames = {
        site["name"]: {
            f
            for f in site["cond_indep_stack"]
            if f.vectorized and f.name != PARTICLE_PLATE
        }
        for site in sites
    }
    common = set.intersection(*frames.values()) if frames else set()
    if not common:
        outside = [name for name, fs in frames.items() if not fs]
        where = (
            f"site {outside[0]!r} is outside every plate"
            if outside
            else "no plate encloses every sample site"
        )
        if advice is None:
            advice = (
                "put it inside the data plate (with pyro.plate('data', len(x)): "
                "...), or, for a latent shared by all points, estimate log p(x) "
                "of the whole batch with joint_log_likelihood"
            )
            if outside and outside[0] not in model_trace.nodes:
                # A guide's own site, such as an autoguide's one vector for all
                # points (AutoDiagonalNormal, ...): not the user's code.
                advice = (
                    "use a guide that samples each point's latents in the data "
                    "plate, such as AutoNormal instead of a joint autoguide"
                )
            advice = literal(advice)
        raise ProgramError(
            f"{literal(caller)} needs a data plate that encloses every sample site "
            f"of model and guide, to give one estimate per data point, but "
            f"{literal(where)}: {advice}",
            template=True,
        )
    for site in sites:
        if not site["is_observed"]:
            continue
        value, event_dim = site["value"], len(site["fn"].event_shape)
        for frame in sorted(common, key=lambda f: f.dim):
            dim = frame.dim - event_dim
            if frame.size > 1 and value.dim() < -dim:
                raise ProgramError(
                    f"the observed value of site {site['name']!r} has shape "
                    f"{list(value.shape)}, which does not run along the data plate "
                    f"{frame.name!r} of size {frame.size}: the data lack their batch "
                    "dimension; pass a batch of shape [N, ...] (x.unsqueeze(0) for "
                    "one point)"
                )
            if frame.size > 1 and value.shape[dim] != frame.size:
                raise ProgramError(
                    f"the observed value of site {site['name']!r} has shape "
                    f"{list(value.shape)}, whose dim {dim}, that of the data plate "
                    f"{frame.name!r} (of size {frame.size}), has size "
                    f"{value.shape[dim]}: make each point's values the "
                    "distribution's event (.to_event(1) for a vector per point), "
                    "so that the plate runs along the points"
                )
    check_batch_dims(model_trace, guide_trace, caller, max_plate_nesting)
