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
        "--no-vectorize",
        action="store_true",
        help="draw the particles in a Python loop (vectorize_particles=False)",
    )
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


def run_tests(workdir: Path, swap: bool, args: argparse.Namespace) -> dict:
    out = workdir / ("swapped.json" if swap else "baseline.json")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(workdir), str(ROOT / "scripts")]),
        "IWELBO_SWAP_OUT": str(out),
        "IWELBO_SWAP_PARTICLES": str(args.particles),
        "IWELBO_SWAP_ESTIMATOR": args.estimator,
        "IWELBO_SWAP_OFF": "0" if swap else "1",
        "IWELBO_SWAP_VECTORIZE": "0" if args.no_vectorize else "1",
    }
    command = [
        sys.executable,
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
        TEST_MODULE,
    ]
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    if not out.is_file():
        sys.exit(
            f"pytest wrote no results:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return json.loads(out.read_text())


def one_line(reason: str, limit: int = 300) -> str:
    line = " ".join(reason.split()) or "(no message)"
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


def report(swapped: dict, baseline: dict, source: str, args: argparse.Namespace) -> str:
    passed = sorted(n for n, r in swapped.items() if r["outcome"] == "passed")
    failed = sorted(n for n, r in swapped.items() if r["outcome"] != "passed")
    base_passed = sum(r["outcome"] == "passed" for r in baseline.values())
    by_elbo: dict[str, list[str]] = defaultdict(list)
    for name, result in swapped.items():
        by_elbo[result["elbo"]].append(name)
    reasons: dict[str, list[str]] = defaultdict(list)
    for name in failed:
        reasons[kind(swapped[name]["reason"])].append(name)
    command = "python scripts/pyro_valid_models.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:]
    )
    lines = [
        "# Pyro's valid-model tests under IWELBO",
        "",
        f"Pyro's `{TEST_MODULE}` (from {source}) with "
        f"`IWELBO({args.particles}, estimator={args.estimator!r}, "
        "max_plate_nesting=<the test's>, "
        f"vectorize_particles={not args.no_vectorize})` "
        "in place of each test's ELBO in every call of its `assert_ok` "
        "(one SVI step, then `loss`, `differentiable_loss` and "
        "`loss_and_grads` agree), under Pyro's own warning filters "
        "(warnings are errors). A test parametrized over several ELBO "
        "classes runs once; tests of invalid programs (`assert_error`, "
        "`assert_warning`) are not counted. Made by "
        "`scripts/pyro_valid_models.py` with `scripts/iwelbo_swap_plugin.py`.",
        "",
        f"**{len(passed)} of {len(swapped)} pass** under IWELBO; with their own "
        f"ELBOs, {base_passed} of the same {len(baseline)} pass.",
        "",
        "Tests by the ELBO Pyro wrote them for (TraceEnum_ELBO: programs with "
        "sites marked for enumeration):",
        "",
        "| ELBO | tests | pass under IWELBO |",
        "| --- | --- | --- |",
        *(
            f"| {elbo} | {len(names)} | {len(set(names) & set(passed))} |"
            for elbo, names in sorted(by_elbo.items())
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
        "## Failures by reason",
        "",
    ]
    if not failed:
        lines.append("None.")
    for reason, names in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
        lines += [f"### {len(names)} x: {reason}", ""]
        lines += [
            f"- `{name.split('::', 1)[1]}`: {one_line(swapped[name]['reason'])}"
            for name in names
        ]
        lines.append("")
    lines += ["## Passed", ""]
    lines += [f"- `{name.split('::', 1)[1]}`" for name in passed]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pyro-valid-models-") as tmp:
        workdir = Path(tmp)
        source = export_tests(
            args.pyro_source.expanduser().resolve(), args.ref, workdir
        )
        swapped = run_tests(workdir, True, args)
        baseline = run_tests(workdir, False, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(swapped, baseline, source, args))
    passed = sum(r["outcome"] == "passed" for r in swapped.values())
    print(f"{passed} of {len(swapped)} valid-model tests pass; wrote {args.out}")


if __name__ == "__main__":
    main()
