"""Measure which valid Pyro programs train under IWELBO: run Pyro's own
``tests/infer/test_valid_models.py`` with ``IWELBO(k, estimator)`` in place of
each test's ELBO (see scripts/iwelbo_swap_plugin.py), outside this repository,
and write the counts and the reasons for failures to results/valid_programs.md.

Pyro's tests are not part of its wheel: pass a Pyro source tree or a clone
(a git repository, read at ``--ref``, by default the tag of the installed
Pyro's version)::

    git clone https://github.com/pyro-ppl/pyro /tmp/pyro
    python scripts/pyro_valid_models.py --pyro-source /tmp/pyro

The files it needs (setup.cfg for Pyro's warning filters, which turn warnings
into errors, and tests/common.py, the conftest files and the test module) are
copied into a temporary folder; only the plugin and pyro_iwae come from here.
The same tests are also run with their own ELBOs, as a baseline.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import pyro
import torch

import pyro_iwae

ROOT = Path(__file__).resolve().parents[1]
FILES = (
    "setup.cfg",
    "tests/__init__.py",
    "tests/common.py",
    "tests/conftest.py",
    "tests/infer/__init__.py",
    "tests/infer/conftest.py",
    "tests/infer/test_valid_models.py",
)
TEST_MODULE = "tests/infer/test_valid_models.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pyro-source",
        type=Path,
        required=True,
        help="a Pyro source tree or git repository (a clone or a bare one)",
    )
    parser.add_argument(
        "--ref",
        default=pyro.__version__.split("+")[0],
        help="the commit or tag to read from a git repository (default: the "
        "installed Pyro's version)",
    )
    parser.add_argument("--particles", type=int, default=2)
    parser.add_argument("--estimator", default="vimco")

    parser.add_argument(
        "--out", type=Path, default=ROOT / "results" / "valid_programs.md"
    )
    return parser.parse_args(argv)


def _git_dir(path: Path) -> Path | None:
    if (path / ".git").exists():
        return path / ".git"
    if (path / "HEAD").is_file() and (path / "objects").is_dir():
        return path
    return None


def export_tests(source: Path, ref: str, dest: Path) -> str:
    """Copies :data:`FILES` from ``source`` into ``dest``; returns where they came
    from, for the report."""
    git_dir = _git_dir(source)
    if git_dir is not None:
        for name in FILES:
            done = subprocess.run(
                ["git", f"--git-dir={git_dir}", "show", f"{ref}:{name}"],
                capture_output=True,
            )
            if done.returncode:
                sys.exit(
                    f"cannot read {name} at {ref} in {source}: "
                    f"{done.stderr.decode().strip()}; pass --ref with a tag or commit "
                    "that has it"
                )
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(done.stdout)
        commit = subprocess.run(
            ["git", f"--git-dir={git_dir}", "rev-parse", f"{ref}^{{commit}}"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return f"pyro-ppl/pyro at {ref} ({commit[:12]})"
    for name in FILES:
        if not (source / name).is_file():
            sys.exit(f"{source / name} not found; pass a Pyro source tree")
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, dest / name)
    return f"the source tree {source}"


def run_tests(
    workdir: Path,
    swap: bool,
    args: argparse.Namespace,
    vectorize: bool = True,
    only: list[str] | None = None,
) -> dict:
    """Runs the test module (``only`` these tests, with Python's ``-O``: its
    ``assert`` statements stripped); ``{nodeid: {"outcome", "reason", "elbo"}}``."""
    name = f"swapped-{vectorize}" if swap else "baseline"
    out = workdir / (name + ("-O" if only is not None else "") + ".json")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(workdir), str(ROOT / "scripts")]),
        "IWELBO_SWAP_OUT": str(out),
        "IWELBO_SWAP_PARTICLES": str(args.particles),
        "IWELBO_SWAP_ESTIMATOR": args.estimator,
        "IWELBO_SWAP_OFF": "0" if swap else "1",
        "IWELBO_SWAP_VECTORIZE": "1" if vectorize else "0",
    }
    command = [
        sys.executable,
        *(["-O"] if only is not None else []),
        "-m",
        "pytest",
        "-q",
        "-p",
        "iwelbo_swap_plugin",
        "-p",
        "no:cacheprovider",
        "-c",
        str(workdir / "setup.cfg"),
        "--rootdir",
        str(workdir),
        # Unrewritten, as -O then strips them; pytest warns that it does, and
        # Pyro's filters make warnings errors.
        *(
            ["--assert=plain", "-W", "ignore::pytest.PytestConfigWarning"]
            if only is not None
            else []
        ),
        *(only if only is not None else [TEST_MODULE]),
    ]
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    if not out.is_file():
        sys.exit(
            f"pytest wrote no results:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return json.loads(out.read_text())


def stripped_says(result: dict) -> str:
    """A test's outcome with Python's ``-O``, and why if it failed."""
    if result["outcome"] == "passed":
        return "passed"
    return f"{result['outcome']}: {one_line(result['reason'], 150)}"


def one_line(reason: str, limit: int = 300) -> str:
    # Object addresses differ from run to run: a rerun writes the same file.
    line = re.sub(r" at 0x[0-9a-f]+", "", " ".join(reason.split())) or "(no message)"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def kind(reason: str) -> str:
    """The reason with its names and shapes blanked, to group failures."""
    line = one_line(reason, limit=10_000)
    # pytest's assertion details and Pyro's trace tables differ per test.
    line = re.split(r" (?:Trace Shapes:|At index|Left contains|Right contains)", line)[
        0
    ]
    line = re.sub(r"(?<!\w)'[^'\s]*'", "'*'", line)
    line = re.sub(r"torch\.Size\(\[[^\]]*\]\)|\([\d, ]*\)", "<shape>", line)
    line = re.sub(r"\bsite \w+", "site *", line)
    line = re.sub(r"(plate\(|param\()[\w.]+", r"\1*", line)
    line = re.sub(
        r"UserWarning: .*If you want to enumerate",
        "UserWarning: <sites> If you want to enumerate",
        line,
    )
    line = re.sub(r"\d+ vs \d+", "<n> vs <m>", line)
    return one_line(line)


#: The runs, by the ``vectorize_particles`` they pass (IWELBO's default first).
MODES = {True: "vectorized", False: "sequential"}


def report(
    swapped: dict[bool, dict],
    baseline: dict,
    stripped: dict,
    source: str,
    args: argparse.Namespace,
) -> str:
    names = sorted(swapped[True])
    passed = {
        mode: {n for n, r in results.items() if r["outcome"] == "passed"}
        for mode, results in swapped.items()
    }
    either = passed[True] | passed[False]
    stripped_passed = sum(r["outcome"] == "passed" for r in stripped.values())
    base_passed = sum(r["outcome"] == "passed" for r in baseline.values())
    by_elbo: dict[str, list[str]] = defaultdict(list)
    for name, result in swapped[True].items():
        by_elbo[result["elbo"]].append(name)
    reasons: dict[str, list[str]] = defaultdict(list)
    for name in names:
        if name not in either:
            reasons[kind(swapped[True][name]["reason"])].append(name)
    command = "python scripts/pyro_valid_models.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:]
    )
    total = len(names)
    lines = [
        "# Pyro's valid-model tests under IWELBO",
        "",
        f"Pyro's `{TEST_MODULE}` (from {source}) with "
        f"`IWELBO(k, estimator={args.estimator!r}, "
        "max_plate_nesting=<the test's>, vectorize_particles=...)` "
        "in place of each test's ELBO in every call of its `assert_ok` "
        "(one SVI step, then `loss`, `differentiable_loss` and "
        "`loss_and_grads` agree), under Pyro's own warning filters "
        f"(warnings are errors); k = {args.particles}, or the test ELBO's own "
        "num_particles where it asks for more. A test parametrized over several "
        "ELBO classes runs once; tests of invalid programs (`assert_error`, "
        "`assert_warning`) are not counted. Each test runs twice: particles in a "
        "vectorized plate (IWELBO's default) and one run at a time "
        "(`vectorize_particles=False`, for programs that check the shapes of "
        "their values or do not broadcast over a particle dim). Made by "
        "`scripts/pyro_valid_models.py` with `scripts/iwelbo_swap_plugin.py`.",
        "",
        f"**{len(either)} of {total} pass** under IWELBO with one of the two "
        f"settings ({len(passed[True])} vectorized, {len(passed[False])} "
        f"sequential); with their own ELBOs, {base_passed} of the same "
        f"{len(baseline)} pass. **{len(either) + stripped_passed} of {total} run** "
        "under IWELBO without an error once the failing ones' `assert` statements "
        "are stripped (below).",
        "",
        "Tests by the ELBO Pyro wrote them for (TraceEnum_ELBO: programs with "
        "sites marked for enumeration):",
        "",
        "| ELBO | tests | pass, vectorized | pass, sequential | pass, either |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {elbo} | {len(group)} | {len(set(group) & passed[True])} | "
            f"{len(set(group) & passed[False])} | {len(set(group) & either)} |"
            for elbo, group in sorted(by_elbo.items())
        ),
        "",
        "| | |",
        "| --- | --- |",
        f"| date | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} |",
        f"| command | `{command}` |",
        f"| pyro-iwae | {pyro_iwae.__version__} |",
        f"| pyro-ppl | {pyro.__version__} |",
        f"| torch | {torch.__version__} |",
        f"| python | {platform.python_version()} |",
        "",
        "## Failures under both settings, by reason (the vectorized run's)",
        "",
        "Each of these was run again (vectorized) with Python's `-O`, which strips "
        "`assert` statements (the programs' own checks of the shapes of their "
        "values, and also `assert_ok`'s checks that the three losses agree): "
        f"{stripped_passed} of {len(stripped)} then pass, that is, their SVI step "
        "and losses run under IWELBO without an error, and what failed was a "
        "program's check of a shape that IWELBO gives otherwise.",
        "",
    ]
    if not reasons:
        lines += ["None.", ""]
    # (heading, tests, what each test's line says after its name)
    sections = [
        (
            f"### {len(group)} x: {reason}",
            group,
            lambda name: (
                f"{one_line(swapped[True][name]['reason'])} (sequential: "
                f"{one_line(swapped[False][name]['reason'], 150)}; with -O: "
                f"{stripped_says(stripped[name])})"
            ),
        )
        for reason, group in sorted(reasons.items(), key=lambda kv: -len(kv[1]))
    ]
    for mode, label in MODES.items():
        only = sorted(either - passed[mode])
        sections.append(
            (
                f"## Pass only {MODES[not mode]}: {len(only)}",
                only,
                lambda name, mode=mode, label=label: (
                    f"{label}: {one_line(swapped[mode][name]['reason'], 200)}"
                ),
            )
        )
    for heading, group, says in sections:
        lines += [heading, ""]
        lines += [f"- `{name.split('::', 1)[1]}`: {says(name)}" for name in group]
        lines.append("")
    lines += ["## Passed under both", ""]
    lines += [
        f"- `{name.split('::', 1)[1]}`" for name in sorted(passed[True] & passed[False])
    ]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pyro-valid-models-") as tmp:
        workdir = Path(tmp)
        source = export_tests(
            args.pyro_source.expanduser().resolve(), args.ref, workdir
        )
        swapped = {mode: run_tests(workdir, True, args, mode) for mode in MODES}
        baseline = run_tests(workdir, False, args)
        failing = [
            name
            for name, result in swapped[True].items()
            if result["outcome"] != "passed"
            and swapped[False][name]["outcome"] != "passed"
        ]
        stripped = run_tests(workdir, True, args, True, only=failing) if failing else {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(swapped, baseline, stripped, source, args))
    passed = {
        n
        for results in swapped.values()
        for n, r in results.items()
        if r["outcome"] == "passed"
    }
    print(
        f"{len(passed)} of {len(swapped[True])} valid-model tests pass under one "
        f"setting; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
