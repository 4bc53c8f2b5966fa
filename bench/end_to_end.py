"""Time the command-line tool end to end: one epoch of ``fit``, then ``eval-nll``.

Runs, as subprocesses, ``pyro-iwae fit`` for one epoch of the training set at
each k, then ``pyro-iwae eval-nll --k 5000`` on the whole test set with the first
run. Reports wall time, images per second and peak RSS of each command (its
``ru_maxrss``, measured as ``/usr/bin/time -v`` does); the commands' own output
goes to stderr. With the defaults this takes many minutes.

    python bench/end_to_end.py --data-dir /work/shared/data
    python bench/end_to_end.py --dataset mnist-mini --particles 5 --eval-k 100 \\
        --fit-args "--train-limit 2000 --test-limit 100"
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import (
    environment,
    environment_markdown,
    markdown_table,
    run_measured,
    write_json,
)

EXECUTABLE = "pyro-iwae"


def check_cli() -> str | None:
    """Why the CLI cannot be benchmarked, or ``None`` if it can."""
    if shutil.which(EXECUTABLE) is None:
        return f"{EXECUTABLE} is not on PATH (pip install -e . in the repository)"
    for command in ("fit", "eval-nll"):
        result = subprocess.run(
            [EXECUTABLE, command, "--help"], capture_output=True, text=True
        )
        if result.returncode:
            lines = (result.stderr or result.stdout).strip().splitlines()
            return (
                f"`{EXECUTABLE} {command} --help` failed: {lines[-1] if lines else ''}"
            )
    return None


def fit_counts(run_dir: Path) -> dict:
    """Images of the run's last epoch and the seconds the trainer's clock gave it."""
    try:
        last = (run_dir / "metrics.jsonl").read_text().strip().splitlines()[-1]
        metrics = json.loads(last)
        return {
            "images": round(metrics["images_per_s"] * metrics["time"]),
            "inner_s": metrics["time"],
        }
    except (OSError, IndexError, KeyError, TypeError, ValueError):
        return {"images": None, "inner_s": None}


def eval_counts(run_dir: Path, k: int) -> dict:
    """Test points of ``eval-nll`` and its own timing, from the JSON it writes."""
    try:
        result = json.loads((run_dir / f"eval-test-k{k}.json").read_text())
        return {"images": result["points"], "inner_s": result["time"]}
    except (OSError, KeyError, ValueError):
        return {"images": None, "inner_s": None}


def run(args: argparse.Namespace, work_dir: Path) -> list[dict]:
    data = ["--dataset", args.dataset]
    if args.data_dir:
        data += ["--data-dir", args.data_dir]
    results = []
    for k in args.particles:
        run_dir = work_dir / f"fit-k{k}"
        command = [EXECUTABLE, "fit", *data, "--particles", str(k), "--epochs", "1"]
        command += ["--seed", str(args.seed), "--out", str(run_dir), "--quiet"]
        command += shlex.split(args.fit_args)
        result = {
            "command": shlex.join(command),
            **run_measured(command, stdout=sys.stderr),
        }
        results.append({"step": f"fit, k = {k}", **fit_counts(run_dir), **result})
    run_dir = work_dir / f"fit-k{args.particles[0]}"
    command = [EXECUTABLE, "eval-nll", str(run_dir), "--k", str(args.eval_k)]
    command += ["--limit", str(args.eval_limit), "--seed", str(args.seed), "--quiet"]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    command += shlex.split(args.eval_args)
    result = {
        "command": shlex.join(command),
        **run_measured(command, stdout=sys.stderr),
    }
    results.append(
        {
            "step": f"eval-nll, k = {args.eval_k}",
            **eval_counts(run_dir, args.eval_k),
            **result,
        }
    )
    return results


def report(env: dict, results: list[dict]) -> str:
    rows = [
        [
            r["step"],
            f"{r['wall_s']:.1f}",
            f"{r['cpu_s']:.1f}",
            r["images"] if r["images"] is not None else "?",
            f"{r['images'] / r['wall_s']:.0f}" if r["images"] else "?",
            f"{r['images'] / r['inner_s']:.0f}" if r["images"] else "?",
            f"{r['peak_rss_mib']:.0f}",
            r["returncode"],
        ]
        for r in results
    ]
    table = markdown_table(
        [
            "step",
            "wall s",
            "CPU s",
            "images",
            "images/s",
            "images/s (tool's clock)",
            "peak RSS MiB",
            "exit",
        ],
        rows,
    )
    commands = [f"- `{r['command']}`" for r in results]
    return "\n".join(
        [
            "## End to end",
            "",
            environment_markdown(env),
            "",
            table,
            "",
            "images/s is over the command's whole wall time (start-up, data loading "
            "and fit's per-epoch test bound included); the tool's clock is the "
            "epoch time in fit's metrics.jsonl and the time in eval-nll's JSON. "
            "Commands:",
            "",
            *commands,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--particles", type=int, nargs="+", default=[5, 50])
    parser.add_argument("--eval-k", type=int, default=5000)
    parser.add_argument(
        "--eval-limit", type=int, default=0, help="test points (0: all of them)"
    )
    parser.add_argument("--seed", type=int, default=0, help="passed to both commands")
    parser.add_argument("--fit-args", default="", help="extra options for fit")
    parser.add_argument("--eval-args", default="", help="extra options for eval-nll")
    parser.add_argument(
        "--work-dir", help="keep the run directories here (default: a temporary one)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write results as JSON")
    args = parser.parse_args(argv)
    problem = check_cli()
    if problem:
        print(f"cannot run the end-to-end benchmark: {problem}", file=sys.stderr)
        return 2
    env = environment(seed=args.seed)
    if args.work_dir:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
        results = run(args, Path(args.work_dir))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            results = run(args, Path(tmp))
    print(report(env, results))
    if args.json:
        write_json(args.json, {"environment": env, "results": results})
    return int(any(r["returncode"] for r in results))


if __name__ == "__main__":
    sys.exit(main())
