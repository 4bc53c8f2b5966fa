"""A self-check of a guide's gradient estimator: is its mean the plain one's?

STL, DReG and the score-function estimators rewrite the guide gradient of an
importance-weighted bound; for a guide they do not handle (a distribution that
evaluates modules lazily, a parameter they cannot hold constant) they can give a
biased gradient without any error. :func:`check_guide_gradients` draws the chosen
estimator's guide gradient and the reference estimator's (the plain ``"iwae"``
reparameterised gradient, or ``"reinforce"`` for the score-function estimators)
on the same noise, many times, and tests per parameter whether their means
differ, as Tucker et al. (2019) check DReG's bias: with paired draws ``d =
g_estimator - g_reference``, ``t = mean(d) / (sd(d) / sqrt(num_draws))`` for
each entry, and the largest ``|t|`` of each parameter against a threshold that
keeps the chance of a false flag over all entries at ``alpha``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from statistics import NormalDist
from typing import Any, NamedTuple

import pyro
import torch
from pyro import poutine

from ..errors import ConfigError
from .arguments import cuda_devices
from .enumeration import marked_parallel
from .objectives import IWELBO, SCORE_ESTIMATORS
from .traces import latent_sites

__all__ = [
    "GradientCheck",
    "ParameterCheck",
    "check_guide_gradients",
    "t_threshold",
]


class ParameterCheck(NamedTuple):
    """The check of one guide parameter (``size`` entries).

    ``max_abs_t``: the largest ``|t|`` over its entries of the paired difference of
    the two estimators' mean gradients; ``variance_ratio``: the estimator's gradient
    variance over the reference's, each summed over the entries (NaN where the
    reference's is zero); ``flagged``: ``max_abs_t`` is above the check's threshold;
    ``reference_variance``: the reference's variance summed over the entries.
    """

    name: str
    size: int
    max_abs_t: float
    variance_ratio: float
    flagged: bool
    reference_variance: float = math.nan

    @property
    def verdict(self) -> str:
        return "MEANS DIFFER" if self.flagged else "ok"


class GradientCheck(NamedTuple):
    """What :func:`check_guide_gradients` found: one :class:`ParameterCheck` per
    guide parameter, and the settings it ran with; ``known_bias``: why the
    estimator's mean differs whatever the guide ("" where it should not)."""

    objective: str
    estimator: str
    reference: str
    num_draws: int
    threshold: float
    alpha: float
    parameters: tuple[ParameterCheck, ...]
    known_bias: str = ""
    #: Fresh draws that tested again after the first ``num_draws`` flagged a mean
    #: (0: none flagged); the table's ``|t|``, threshold and flags are theirs then.
    confirmation_draws: int = 0

    @property
    def passed(self) -> bool:
        """No parameter flagged: the estimator's mean is the reference's."""
        return not any(p.flagged for p in self.parameters)

    @property
    def variance_ratio(self) -> float:
        """The estimator's gradient variance over the reference's, each summed over
        every entry of every parameter (NaN where the reference's is zero)."""
        weighted = [
            (p.variance_ratio * p.reference_variance, p.reference_variance)
            for p in self.parameters
            if p.reference_variance > 0
        ]
        total = sum(ref for _, ref in weighted)
        return sum(v for v, _ in weighted) / total if total > 0 else math.nan

    @property
    def flagged(self) -> tuple[ParameterCheck, ...]:
        return tuple(p for p in self.parameters if p.flagged)

    def table(self, spell: Callable[[str], str] | None = None) -> str:
        """The result as a text table, one row per parameter, and a verdict line
        whose advice ``spell`` rewrites (the command line's options) if given."""
        confirmed = (
            f", retested on {self.confirmation_draws} fresh draws (shown)"
            if self.confirmation_draws
            else ""
        )
        header = (
            f"{self.objective}: guide gradient of estimator {self.estimator!r} "
            f"against {self.reference!r}, {self.num_draws} paired draws{confirmed}; "
            f"a mean differs where max |t| > {self.threshold:.2f} (false-flag "
            f"chance {self.alpha:g} over all entries)"
        )
        width = max([len("parameter"), *(len(p.name) for p in self.parameters)])
        rows = [
            f"{'parameter':<{width}}  {'size':>7}  {'max |t|':>8}  "
            f"{'var ratio':>9}  verdict"
        ]
        for p in self.parameters:
            ratio = "-" if math.isnan(p.variance_ratio) else f"{p.variance_ratio:.3g}"
            rows.append(
                f"{p.name:<{width}}  {p.size:>7}  {p.max_abs_t:>8.2f}  {ratio:>9}  "
                f"{p.verdict}"
            )
        ratio = "-" if math.isnan(self.variance_ratio) else f"{self.variance_ratio:.3g}"
        rows.append(
            f"{'(all)':<{width}}  {sum(p.size for p in self.parameters):>7}  "
            f"{max((p.max_abs_t for p in self.parameters), default=0.0):>8.2f}  "
            f"{ratio:>9}"
        )
        verdict = self.verdict if spell is None else spell(self.verdict)
        return "\n".join([header, *rows, verdict])

    @property
    def verdict(self) -> str:
        """The table's last line: passed, or what failed and what to do."""
        if self.passed:
            return (
                f"passed: the {self.estimator!r} gradient has the {self.reference!r} "
                "gradient's mean for every parameter"
            )
        failed = (
            f"FAILED: the {self.estimator!r} gradient's mean differs for "
            f"{', '.join(p.name for p in self.flagged)}"
        )
        if self.known_bias:
            return (
                f"{failed}, as expected: {self.known_bias}; check the guide with "
                "num_particles=1 or estimator='dreg', and train with "
                "estimator='dreg'"
            )
        return (
            f"{failed}: its log q may not be the density of what it samples, or "
            "hold a parameter the estimator cannot stop; train with "
            f"estimator={self.reference!r} or fix the guide"
        )


#: Fresh draws that confirm a flag: this many times ``num_draws``, and at least
#: ``MIN_CONFIRMATION`` (with 30 draws, a chance flag of AutoNormal's heavy-tailed
#: initial gradients was confirmed by 120 fresh draws once in 20 checks).
CONFIRMATION, MIN_CONFIRMATION = 4, 400


def t_threshold(num_entries: int, num_draws: int, alpha: float = 1e-3) -> float:
    """The ``|t|`` (Student's t, ``num_draws - 1`` degrees of freedom) exceeded by
    chance with probability ``alpha / num_entries``: Bonferroni's bound keeps the
    chance of any false flag among ``num_entries`` entries below ``alpha``.

    From the normal quantile by the Cornish-Fisher expansion in ``1/nu``, a
    little below the exact quantile (the check errs toward flagging): by 0.1%
    for 100 draws, by up to 1.1% (10^6 entries) and 2.2% (10^8) for 20 draws.
    """
    z = NormalDist().inv_cdf(1 - alpha / (2 * max(num_entries, 1)))
    nu = num_draws - 1
    return (
        z
        + (z**3 + z) / (4 * nu)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * nu**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * nu**3)
    )


def check_guide_gradients(
    model: Callable,
    guide: Callable,
    *args: Any,
    objective: IWELBO | None = None,
    num_draws: int = 100,
    alpha: float = 1e-3,
    seed: int = 0,
    **kwargs: Any,
) -> GradientCheck:
    """Tests whether ``objective``'s guide gradient has the mean of the plain
    estimator's, on the batch ``*args, **kwargs`` (passed to model and guide).

    :param objective: an :class:`~pyro_iwae.IWELBO` (or ``MIWELBO``, ``CIWELBO``,
        ``PIWELBO``) with the estimator to check; default ``IWELBO(5, "dreg")``.
        Its reference is a copy with ``estimator="iwae"`` (``"reinforce"`` for
        ``"vimco"``), run eagerly.
    :param num_draws: paired draws of both gradients (at least 20); draw ``i``
        runs both under torch seed ``seed + i``. Each costs two loss evaluations
        and two backward passes; the caller's random stream is left as it was.
        Where a mean is flagged, ``CONFIRMATION`` times as many fresh draws (at
        least ``MIN_CONFIRMATION``) test every parameter again, and theirs are
        the verdict (a mean they flag is flagged, whether or not the first
        draws flagged it).
    :param alpha: the chance that an unbiased estimator is flagged anywhere.
    :returns: a :class:`GradientCheck`; ``.table()`` renders it. With
        ``"stl"`` and more than one particle per bound its ``known_bias`` says
        that a flagged mean is STL's own bias.
    :raises ConfigError: for a check that could not fail: ``"reinforce"`` (the
        reference itself), or ``"vimco"`` on a guide whose every site has
        ``rsample`` (the same gradient as the reference's there).
    """
    if not isinstance(num_draws, int) or num_draws < 20:
        raise ValueError(f"num_draws must be an integer >= 20, got {num_draws}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    objective = IWELBO(5, "dreg") if objective is None else objective
    if not isinstance(objective, IWELBO):
        raise ValueError(
            "the check compares the guide gradient estimators of IWELBO, MIWELBO, "
            f"CIWELBO and PIWELBO; {type(objective).__name__} has none to choose"
        )
    reference = copy.copy(objective)
    reference.estimator = (
        "reinforce" if objective.estimator in SCORE_ESTIMATORS else "iwae"
    )
    reference.compile = False
    with torch.random.fork_rng(devices=cuda_devices(args, kwargs)):
        trace = _guide_trace(guide, args, kwargs)
        _check_comparable(objective.estimator, trace)
        params = _trainable(guide, trace)

        def checked(draws: range) -> tuple[list[ParameterCheck], float]:
            moments = [_PairedMoments() for _ in params]
            for i in draws:
                torch.manual_seed(seed + i)
                ours = _guide_gradient(objective, model, guide, params, args, kwargs)
                torch.manual_seed(seed + i)
                theirs = _guide_gradient(reference, model, guide, params, args, kwargs)
                for m, a, b in zip(moments, ours, theirs, strict=True):
                    m.add(a, b)
            sizes = [p.numel() for p in params.values()]
            threshold = t_threshold(sum(sizes), len(draws), alpha)
            checks = []
            for name, size, m in zip(params, sizes, moments, strict=True):
                t, ratio, reference_variance = m.result()
                flagged = t > threshold
                checks.append(
                    ParameterCheck(name, size, t, ratio, flagged, reference_variance)
                )
            return checks, threshold

        checks, threshold = checked(range(num_draws))
        confirmation = 0
        if any(check.flagged for check in checks):
            # Heavy-tailed gradients (a guide far from the posterior) make |t| of
            # few draws exceed the threshold by chance far more often than alpha:
            # fresh, more numerous draws then test every parameter again, and
            # their flags are the verdict. They alone are the test, at alpha over
            # all entries, so the verdict agrees with the |t| shown beside it and
            # a bias that only the larger sample detects is not passed.
            confirmation = max(CONFIRMATION * num_draws, MIN_CONFIRMATION)
            checks, threshold = checked(range(num_draws, num_draws + confirmation))
    return GradientCheck(
        objective=f"{type(objective).__name__}(num_particles="
        f"{objective.num_particles})",
        estimator=objective.estimator,
        reference=reference.estimator,
        num_draws=num_draws,
        threshold=threshold,
        alpha=alpha,
        parameters=tuple(checks),
        known_bias=_known_bias(objective),
        confirmation_draws=confirmation,
    )


def _check_comparable(estimator: str, guide_trace: poutine.Trace) -> None:
    """Refuses an estimator whose gradient is its reference's whatever the guide."""
    if estimator == "reinforce":
        raise ConfigError(
            "estimator='reinforce' is the check's own reference for score-function "
            "gradients, so the check could not fail; check estimator='vimco' on a "
            "guide with sites without rsample, or estimator='dreg'",
            literal=True,
        )
    scored = [
        name
        for name, site in latent_sites(guide_trace)
        if not site["fn"].has_rsample and not marked_parallel(site)
    ]
    if estimator == "vimco" and not scored:
        raise ConfigError(
            "estimator='vimco' changes the gradient of guide sites without rsample "
            "only, and every site of this guide has rsample: its gradient is the "
            "reference's whatever the guide, so the check could not fail; check "
            "estimator='dreg' instead",
            literal=True,
        )


def _known_bias(objective: IWELBO) -> str:
    """Why ``objective``'s guide gradient is biased whatever the guide, or ""."""
    per_bound = getattr(objective, "group_size", objective.num_particles)
    if objective.estimator == "stl" and per_bound > 1:
        return (
            "STL is biased for more than one particle per bound (here "
            f"{per_bound}) whatever the guide (Tucker et al. 2019)"
        )
    return ""


def guide_parameters(
    guide: Callable, args: tuple, kwargs: dict
) -> dict[str, torch.Tensor]:
    """The trainable tensors of ``guide``, by name, after one run of it (which
    makes lazily created parameters): an ``nn.Module``'s parameters (a
    ``PyroModule``'s unconstrained ones), else the unconstrained values of the
    ``pyro.param`` sites it reads."""
    return _trainable(guide, _guide_trace(guide, args, kwargs))


def _guide_trace(guide: Callable, args: tuple, kwargs: dict) -> poutine.Trace:
    """One run of ``guide``, without gradients."""
    with torch.no_grad():
        return poutine.trace(guide).get_trace(*args, **kwargs)


def _trainable(guide: Callable, trace: poutine.Trace) -> dict[str, torch.Tensor]:
    """:func:`guide_parameters` from ``trace``, a run of ``guide``."""
    if isinstance(guide, torch.nn.Module):
        named = {n: p for n, p in guide.named_parameters() if p.requires_grad}
    else:
        named = {
            name: pyro.param(name).unconstrained()
            for name, site in trace.nodes.items()
            if site["type"] == "param"
        }
    if not named:
        raise ValueError("the guide has no trainable parameters to check")
    return named


def _guide_gradient(
    objective: IWELBO,
    model: Callable,
    guide: Callable,
    params: dict[str, torch.Tensor],
    args: tuple,
    kwargs: dict,
) -> list[torch.Tensor]:
    loss = objective.differentiable_loss(model, guide, *args, **kwargs)
    tensors = list(params.values())
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [
        torch.zeros_like(p) if g is None else g
        for p, g in zip(tensors, grads, strict=True)
    ]


class _PairedMoments:
    """Running sums of two paired gradient draws and of their difference, in
    float64, about the first draw (sums of squares about a far-off origin would
    lose the variance to cancellation)."""

    def __init__(self) -> None:
        self.n = 0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        values = torch.stack([a, b, a - b]).detach().double().reshape(3, -1)
        if self.n == 0:
            self.shift = values
            self.sum = torch.zeros_like(values)
            self.sum_sq = torch.zeros_like(values)
        centred = values - self.shift
        self.sum += centred
        self.sum_sq += centred**2
        self.n += 1

    def result(self) -> tuple[float, float, float]:
        """(max |t| of the difference's mean, estimator / reference variance,
        reference variance), variances summed over the entries."""
        n = self.n
        mean = self.sum / n
        var = ((self.sum_sq - n * mean**2) / (n - 1)).clamp(min=0)
        diff_mean = (mean[2] + self.shift[2]).abs()
        # A floor on the standard error, far below any gradient's own size: a
        # difference of rounding alone (two estimators equal up to the order of
        # their sums) is not a difference of means.
        scale = (mean[:2] + self.shift[:2]).abs().max() + var[:2].sqrt().max()
        se = (var[2] / n).sqrt().clamp(min=1e-10 * scale.item())
        t = torch.where(diff_mean == 0, torch.zeros_like(se), diff_mean / se)
        total_ref = var[1].sum().item()
        ratio = var[0].sum().item() / total_ref if total_ref > 0 else math.nan
        return t.max().item(), ratio, total_ref
