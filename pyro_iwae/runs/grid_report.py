"""The report of a grid of runs: its table beside the published numbers, the
claims it checks with paired standard errors, and the plots' series.

Reads what :mod:`pyro_iwae.runs.reproduction` leaves in the runs folder; trains
nothing.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Any

from ..errors import literal
from .checkpoints import RunError, read_metrics
from .config import CONFIG_FILE, RunConfig
from .reproduction import Grid, ais_path, evaluation_path
from .run import read_estimates

#: Burda et al. (2016), Table 1: MNIST test NLL (nats, k = 5000), by
#: (stochastic layers, objective, k).
PAPER_NLL = {
    (1, "vae", 1): 86.76,
    (1, "vae", 5): 86.47,
    (1, "vae", 50): 86.35,
    (1, "iwae", 1): 86.76,
    (1, "iwae", 5): 85.54,
    (1, "iwae", 50): 84.78,
    (2, "vae", 1): 85.33,
    (2, "vae", 5): 85.01,
    (2, "vae", 50): 84.78,
    (2, "iwae", 1): 85.33,
    (2, "iwae", 5): 83.89,
    (2, "iwae", 50): 82.90,
}
#: Rainforth et al. (2018) on dynamically binarised MNIST, by objective.
RAINFORTH_NLL = {"miwae": 84.97, "piwae": 84.46, "ciwae": 84.57}


def _claim_terms(claim: list[Any]) -> dict[str, float]:
    """The claim's difference as a sum of run NLLs: run name -> coefficient."""
    if isinstance(claim[0], str):
        lower, higher = claim
        return {lower: -1.0, higher: 1.0}
    terms: dict[str, float] = {}
    for pair, sign in zip(claim, (1.0, -1.0), strict=True):
        for name, coefficient in _claim_terms(pair).items():
            terms[name] = terms.get(name, 0.0) + sign * coefficient
    return terms


def _claim_text(claim: list[Any]) -> str:
    if isinstance(claim[0], str):
        return f"{claim[0]} below {claim[1]}"
    return f"{_claim_text(claim[0])} by more than {_claim_text(claim[1])}"


def check_runs_present(grid: Grid, runs_dir: str | os.PathLike) -> None:
    """:raises RunError: if ``runs_dir`` holds none of the runs of ``grid`` (a
    mistyped folder), whose report would say "not run yet" for every run."""
    runs_dir = Path(runs_dir)
    if any((runs_dir / name / CONFIG_FILE).is_file() for name in grid.runs):
        return
    where = (
        "does not exist" if not runs_dir.is_dir() else "holds none of the grid's runs"
    )
    raise RunError(
        f"the runs folder {literal(runs_dir)} {where}, so its report would say "
        "'not run yet' for every run; nothing was written: pass the folder of the "
        "grid's runs ({runs_dir}), or train them first",
        template=True,
    )


def collect(grid: Grid, runs_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per run of ``grid`` from its files: settings, test NLL with its
    standard error (None until evaluated), active units, epochs and train time."""
    rows = []
    for name in grid.runs:
        run_dir = Path(runs_dir) / name
        try:  # what the run was trained with, should the grid have changed since
            config = RunConfig.load(run_dir)
        except RunError:
            config = grid.config(name)
        metrics = read_metrics(run_dir) if run_dir.is_dir() else []
        path = evaluation_path(grid, run_dir)
        result = json.loads(path.read_text()) if path.is_file() else {}
        ais_file = ais_path(grid, name, run_dir)
        ais = (
            json.loads(ais_file.read_text())
            if ais_file is not None and ais_file.is_file()
            else {}
        )
        k = config.make_objective().num_particles  # all particles: M K for MIWAE
        rows.append(
            {
                "run": name,
                "dataset": config.dataset,
                "stochastic_layers": config.stochastic_layers,
                "objective": config.objective,
                "estimator": config.estimator,
                "k": k,
                "num_groups": config.num_groups,
                "beta": config.beta,
                "schedule": config.schedule,
                "stages": config.stages,
                "batch_size": config.batch_size,
                "seed": config.seed,
                "epochs": len(metrics),
                "train_time_s": sum(m["time"] for m in metrics),
                "likelihood": config.likelihood,
                "test_nll": result.get("nll"),
                "test_nll_stderr": result.get("stderr"),
                "bits_per_dim": result.get("bits_per_dim"),
                "eval_k": result.get("k"),
                "eval_points": result.get("points"),
                "active_units": result.get("active_units"),
                "estimates_file": result.get("estimates_file"),
                "ais_nll": ais.get("nll"),
                "ais_nll_stderr": ais.get("stderr"),
                "ais_points": ais.get("points"),
                "paper_nll": _paper_nll(config, k),
                "versions": result.get("versions"),
                "evaluated": result.get("date"),
            }
        )
    return rows


def _paper_nll(config: RunConfig, k: int) -> float | None:
    variant = config.builder_settings("model") or config.binarization != "dynamic"
    # The papers' numbers are of MNIST's 60,000 training images (not of a subset
    # such as mnist-mini, nor of another data set).
    mnist = config.dataset == "mnist" and config.train_limit is None
    if variant or not mnist or (config.model, config.guide) != ("paper", "paper"):
        return None  # not the paper's model and data
    if config.objective in RAINFORTH_NLL:
        return RAINFORTH_NLL[config.objective]
    if config.estimator != "iwae" or config.objective not in ("iwae", "vae"):
        return None
    return PAPER_NLL.get((config.stochastic_layers, config.objective, k))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table, the paper's NLL beside ours (and an AIS
    column when some row has one)."""
    with_ais = any(row.get("ais_nll") is not None for row in rows)
    ais_head = " AIS NLL (nats, points) |" if with_ais else ""
    lines = [
        "| run | layers | objective | estimator | k | epochs | test NLL (nats) "
        f"| paper |{ais_head} active units | train time (min) |",
        "| --- " * (10 + with_ais) + "|",
    ]
    for row in rows:
        if row["test_nll"] is not None:
            nll = f"{row['test_nll']:.2f} ± {row['test_nll_stderr']:.2f}"
            if row.get("bits_per_dim") is not None:
                nll += f" ({row['bits_per_dim']:.4f} bits/dim)"
        else:
            nll = "not evaluated yet" if row["epochs"] else "not run yet"
        train_time = f"{row['train_time_s'] / 60:.1f}" if row["epochs"] else ""
        paper = "" if row["paper_nll"] is None else f"{row['paper_nll']:.2f}"
        active = ", ".join(f"{k} {v}" for k, v in (row["active_units"] or {}).items())
        objective = row["objective"]
        if objective in ("miwae", "piwae"):
            objective += f" (M={row['num_groups']})"
        elif objective == "ciwae":
            objective += f" (beta={row['beta']})"
        estimator = "" if row["objective"] in ("vae", "renyi") else row["estimator"]
        ais = ""
        if with_ais and row.get("ais_nll") is not None:
            ais = (
                f" {row['ais_nll']:.2f} ± {row['ais_nll_stderr']:.2f} "
                f"({row['ais_points']}) |"
            )
        elif with_ais:
            ais = " |"
        lines.append(
            f"| {row['run']} | {row['stochastic_layers']} | {objective} | "
            f"{estimator} | {row['k']} | {row['epochs']} | {nll} | {paper} |{ais} "
            f"{active} | {train_time} |"
        )
    return "\n".join(lines) + "\n"


#: A difference counts as shown when it exceeds this many standard errors.
CLAIM_Z = 2.0


def check_claims(
    grid: Grid, rows: list[dict[str, Any]], runs_dir: str | os.PathLike | None = None
) -> list[dict[str, Any]]:
    """Each claim of ``grid`` against the rows: its ``claim`` as in the grid and as
    ``text``, the ``difference`` (nats; for ``[lower, higher]`` the NLL of
    ``higher`` minus that of ``lower``, for a pair of pairs the first pair's
    difference minus the second's), its standard error, and a ``verdict``:
    "holds" (difference above :data:`CLAIM_Z` standard errors), "reversed" (below
    minus that), "not shown" (in between) or "not run yet".

    Where every run of the claim in ``runs_dir`` kept its per-point estimates on
    the same points, the standard error is that of the mean per-point difference
    (``paired`` is True); otherwise the runs' standard errors are combined as if
    independent, which overstates the error of the difference.
    """
    by_run = {row["run"]: row for row in rows}
    # A run is in several claims; read its 10,000 estimates once.
    run_estimates = functools.cache(
        lambda name: (
            None
            if runs_dir is None
            else read_estimates(Path(runs_dir) / name, by_run[name])
        )
    )
    results = []
    for claim in grid.claims:
        terms = _claim_terms(claim)
        result = {
            "claim": claim,
            "text": _claim_text(claim),
            "difference": None,
            "stderr": None,
            "paired": False,
            "verdict": "not run yet",
        }
        if all(by_run[name]["test_nll"] is not None for name in terms):
            difference = sum(c * by_run[name]["test_nll"] for name, c in terms.items())
            stderr = math.sqrt(
                sum(
                    (c * (by_run[name]["test_nll_stderr"] or 0.0)) ** 2
                    for name, c in terms.items()
                )
            )
            estimates = [run_estimates(name) for name in terms]
            if all(e is not None and e.shape == estimates[0].shape for e in estimates):
                # NLL differences per point: minus the log-likelihood estimates.
                per_point = -sum(
                    c * e for c, e in zip(terms.values(), estimates, strict=True)
                )
                difference = float(per_point.mean())
                stderr = float(per_point.std() / math.sqrt(per_point.numel()))
                result["paired"] = True
            if difference > CLAIM_Z * stderr:
                verdict = "holds"
            elif difference < -CLAIM_Z * stderr:
                verdict = "reversed"
            else:
                verdict = "not shown"
            result.update(difference=difference, stderr=stderr, verdict=verdict)
        results.append(result)
    return results


def markdown_claims(claims: list[dict[str, Any]]) -> str:
    """The checked claims as a Markdown table."""
    lines = [
        "| claim | NLL difference (nats) | pairing | verdict |",
        "| --- | --- | --- | --- |",
    ]
    for claim in claims:
        difference = (
            ""
            if claim["difference"] is None
            else f"{claim['difference']:+.2f} ± {claim['stderr']:.2f}"
        )
        kind = ""
        if claim["difference"] is not None:
            kind = "paired" if claim["paired"] else "unpaired"
        lines.append(
            f"| {claim['text']} | {difference} | {kind} | {claim['verdict']} |"
        )
    return "\n".join(lines) + "\n"


#: Markers between which :func:`write_report` puts the table into a Markdown file.
TABLE_MARKERS = ("<!-- grid-table:start -->", "<!-- grid-table:end -->")


def write_report(
    grid: Grid,
    runs_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    readme: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Writes ``table.json``, ``table.md`` (with the claims checked, if the grid
    has any, also in ``claims.json``) and the plots of ``grid`` into ``out_dir``;
    returns their paths by kind. With ``readme``, also replaces what stands
    between the :data:`TABLE_MARKERS` lines of that Markdown file by table.md.

    :raises RunError: if ``readme`` lacks the markers.
    """
    from .plots import save_grid_curves, save_nll_against_k

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = collect(grid, runs_dir)
    paths = {"json": out_dir / "table.json", "markdown": out_dir / "table.md"}
    paths["json"].write_text(json.dumps(rows, indent=2) + "\n")
    markdown = markdown_table(rows)
    if grid.claims:
        claims = check_claims(grid, rows, runs_dir)
        paths["claims"] = out_dir / "claims.json"
        paths["claims"].write_text(json.dumps(claims, indent=2) + "\n")
        markdown += (
            f"\nClaims (difference: NLL of the second run minus the first, or for "
            "'by more than' the first pair's difference minus the second's, ± its "
            "standard error, paired over test points where all the runs kept their "
            f"per-point estimates; holds beyond {CLAIM_Z:g} standard errors):\n\n"
            + markdown_claims(claims)
        )
    paths["markdown"].write_text(markdown)
    if readme is not None:
        before, after = table_slot(readme)
        paths["readme"] = Path(readme)
        paths["readme"].write_text(before + markdown + after)
    curves = {name: read_metrics(Path(runs_dir) / name) for name in grid.runs}
    paths["curves"] = save_grid_curves(curves, out_dir / "test-bound-by-epoch.png")
    paths["nll_k"] = save_nll_against_k(nll_series(rows), out_dir / "nll-by-k.png")
    return paths


def nll_series(rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, float, float]]]:
    """The evaluated VAE and IWAE rows (any estimator) as series for the plot of
    NLL against k: label -> ``(k, NLL, standard error)`` points, one series per
    objective, estimator and number of stochastic layers."""
    series: dict[str, list[tuple[int, float, float]]] = {}
    for row in rows:
        if row["test_nll"] is None or row["objective"] not in ("vae", "iwae"):
            continue
        label = "VAE" if row["objective"] == "vae" else "IWAE"
        if row["estimator"] != "iwae":
            label += f"-{row['estimator'].upper()}"
        if row["stochastic_layers"] != 1:
            label += f", {row['stochastic_layers']} layers"
        series.setdefault(label, []).append(
            (row["k"], row["test_nll"], row["test_nll_stderr"] or 0.0)
        )
    return series


def table_slot(path: str | os.PathLike) -> tuple[str, str]:
    """The text of Markdown file ``path`` up to and including the first of the
    :data:`TABLE_MARKERS` lines, and from the second on.

    :raises RunError: if the file cannot be read or lacks the markers.
    """
    start, end = TABLE_MARKERS
    try:
        content = Path(path).read_text()
    except OSError as e:
        raise RunError(f"cannot read {path} ({e.strerror})") from e
    before, found_start, rest = content.partition(start + "\n")
    _, found_end, after = rest.partition(end)
    if not (found_start and found_end):
        # Both there, the end first: "has no lines" misled.
        order = f", {start} first" if start in content and end in content else ""
        raise RunError(
            f"{path} has no lines {start} and {end}{order} to put the table "
            "between; add them where the table should go"
        )
    return before + start + "\n", end + after
