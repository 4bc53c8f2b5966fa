"""Time the command-line tool end to end: one epoch of ``fit``, then ``eval-nll``.

Runs, as subprocesses, ``pyro-iwae fit`` for one epoch of the training set at
each k, then ``pyro-iwae eval-nll --k 5000`` on the whole test set with the first
run; with ``--jax-python``, the same epoch (first k) and estimate in NumPyro
(``jax_epoch.py``), cold and warm. Reports wall time, images per second and peak
RSS of each command (its ``ru_maxrss``, measured as ``/usr/bin/time -v`` does);
the commands' own output
goes to stderr. ``--compile both`` runs every command eagerly and with
``--compile``, and reports the seconds each spent compiling (from cold: inductor's
cache and the temporary folder where it keeps its precompiled header are fresh
folders for each command); ``--compile warm`` runs the compiled
commands twice, the second time with the inductor cache the first one filled
(what later runs on the same machine pay); ``--compile default`` runs them with
the tools' own choice (``--compile auto``), the same two ways. With the defaults
this takes many minutes.

    python bench/end_to_end.py --data-dir /work/shared/data
    python bench/end_to_end.py --dataset mnist-mini --particles 5 --eval-k 100 \\
        --fit-args "--train-limit 2000 --test-limit 100"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import (
    environment,
    environment_markdown,
    markdown_table,
    quartiles,
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
    """Images of the run's last epoch, the seconds the trainer's clock gave it and
    those it spent compiling."""
    try:
        last = (run_dir / "metrics.jsonl").read_text().strip().splitlines()[-1]
        metrics = json.loads(last)
        return {
            "images": round(metrics["images_per_s"] * metrics["time"]),
            "inner_s": metrics["time"],
            "compile_s": metrics.get("compile_time", 0.0),
            "choice": choice_text(metrics),
        }
    except (OSError, IndexError, KeyError, TypeError, ValueError):
        return {"images": None, "inner_s": None, "compile_s": None}


def choice_text(result: dict) -> str:
    """How a command ran (compiled or eager) and, where it chose, why."""
    text = "compiled" if result.get("compiled") else "eager"
    why = result.get("compile_choice", "as asked")
    return text if why == "as asked" else f"{text} ({why})"


def eval_counts(run_dir: Path, k: int) -> dict:
    """Test points of ``eval-nll``, its own timing and its compile time, from the
    JSON it writes."""
    try:
        result = json.loads((run_dir / f"eval-test-k{k}.json").read_text())
        return {
            "images": result["points"],
            "inner_s": result["time"],
            "compile_s": result.get("compile_time", 0.0),
            "choice": choice_text(result),
        }
    except (OSError, KeyError, ValueError):
        return {"images": None, "inner_s": None, "compile_s": None}


def measured(command: list[str], work_dir: Path, cache: str | None) -> dict:
    """``run_measured`` of ``command``; a compiled one gets a fresh inductor cache
    (``cache="cold"``), or the one cache that every ``"shared"`` command uses, and
    with it a temporary folder of its own: inductor keeps its precompiled header
    there, whatever ``TORCHINDUCTOR_CACHE_DIR`` says, so the first command in a
    new one pays for the header too, as on a machine inductor never compiled on."""
    env = dict(os.environ)
    if cache == "cold":
        folder = work_dir / f"inductor-cache-{len(list(work_dir.glob('inductor-*')))}"
    elif cache == "shared":
        folder = work_dir / "inductor-cache-shared"
    if cache in ("cold", "shared"):
        env["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
        env["TMPDIR"] = str(folder.with_name(folder.name + "-tmp"))
        os.makedirs(env["TMPDIR"], exist_ok=True)
    return {
        "command": shlex.join(command),
        **run_measured(command, stdout=sys.stderr, env=env),
    }


def fit_command(
    args: argparse.Namespace, k: int, run_dir: Path, flag: list[str]
) -> list[str]:
    """``pyro-iwae fit`` for one epoch at ``k`` into ``run_dir``."""
    data = ["--dataset", args.dataset]
    if args.data_dir:
        data += ["--data-dir", args.data_dir]
    command = [EXECUTABLE, "fit", *data, "--particles", str(k), "--epochs"]
    command += ["1", "--seed", str(args.seed), "--out", str(run_dir)]
    return [*command, "--quiet", *flag, *shlex.split(args.fit_args)]


def numpyro_command(args: argparse.Namespace, phase: str, out: Path) -> list[str]:
    """``jax_epoch.py`` for ``phase`` (train or eval), with the one JAX cache."""
    command = [args.jax_python, str(Path(__file__).with_name("jax_epoch.py"))]
    command += ["--data-dir", args.data_dir or "", "--phase", phase]
    command += ["--particles", str(args.particles[0]), "--seed", str(args.seed)]
    command += ["--eval-k", str(args.eval_k), "--eval-limit", str(args.eval_limit)]
    command += ["--cache", str(out.parent / "jax-cache"), "--out", str(out)]
    return [*command, *shlex.split(args.jax_args)]


def run(args: argparse.Namespace, work_dir: Path) -> list[dict]:
    # (label, inductor cache, --compile's value) of each pass over the commands;
    # "warm" and "default": every command twice, the second time with the cache
    # the first one filled.
    eager, compiled = ("", None, "off"), (", compiled", "cold", "on")
    passes = {
        "off": [eager],
        "on": [compiled],
        "both": [eager, compiled],
        "warm": [
            (", compiled, cold cache", "shared", "on"),
            (", compiled, warm", "shared", "on"),
        ],
        "default": [
            (", default choice, cold cache", "shared", None),
            (", default choice, warm", "shared", None),
        ],
    }[args.compile]
    results = []
    for number, (label, cache, choice) in enumerate(passes):
        flag = [] if choice is None else ["--compile", choice]
        suffix = f"-{number}" if cache else ""
        for k in args.particles:
            run_dir = work_dir / f"fit-k{k}{suffix}"
            command = fit_command(args, k, run_dir, flag)
            result = measured(command, work_dir, cache)
            step = f"fit, k = {k}{label}"
            results.append({"step": step, **fit_counts(run_dir), **result})
        run_dir = work_dir / f"fit-k{args.particles[0]}{suffix}"
        command = [EXECUTABLE, "eval-nll", str(run_dir), "--k", str(args.eval_k)]
        command += ["--limit", str(args.eval_limit), "--seed", str(args.seed)]
        command += ["--quiet", *flag]
        if args.data_dir:
            command += ["--data-dir", args.data_dir]
        command += shlex.split(args.eval_args)
        result = measured(command, work_dir, cache)
        step = f"eval-nll, k = {args.eval_k}{label}"
        results.append({"step": step, **eval_counts(run_dir, args.eval_k), **result})
    if args.jax_python:
        results += numpyro_rows(args, work_dir)
    return results


def numpyro_rows(args: argparse.Namespace, work_dir: Path) -> list[dict]:
    """The same two steps in NumPyro (``jax_epoch.py``, one process each), from a
    cold JAX compilation cache, then warm (the cache the first filled)."""
    results = []
    for label in ("cold", "warm"):
        for phase in ("train", "eval"):
            out = work_dir / f"jax-{phase}-{label}.json"
            command = numpyro_command(args, phase, out)
            result = {"command": shlex.join(command), **run_measured(command)}
            images, inner = numpyro_reply(out, phase)
            step = (
                f"NumPyro epoch, k = {args.particles[0]}, {label}"
                if phase == "train"
                else f"NumPyro log-likelihood, k = {args.eval_k}, {label}"
            )
            results.append(
                {
                    "step": step,
                    "images": images,
                    "inner_s": inner,
                    "compile_s": None,
                    "choice": "jit",
                    **result,
                }
            )
    return results


def numpyro_reply(out: Path, phase: str) -> tuple[int | None, float | None]:
    """The images and the tool's clock of a ``jax_epoch.py`` run (SVI's init and
    the epoch, or the estimate); None where the run wrote no reply."""
    try:
        reply = json.loads(out.read_text())
    except (OSError, ValueError):
        return None, None
    if phase == "eval":
        return reply.get("test_images"), reply.get("eval_s")
    epoch = reply.get("epoch_s")
    inner = None if epoch is None else epoch + reply.get("init_s", 0.0)
    return reply.get("train_images"), inner


def epoch_rounds(args: argparse.Namespace, work_dir: Path) -> list[dict]:
    """``--epoch-rounds`` more warm epochs of ``fit`` (default choice, the shared
    inductor cache) and of NumPyro (its filled cache), alternated, the order
    swapped every round: single runs of either vary by a second."""
    rows = []
    for number in range(args.epoch_rounds):
        tools = ("fit", "NumPyro") if number % 2 == 0 else ("NumPyro", "fit")
        for tool in tools:
            if tool == "fit":
                run_dir = work_dir / f"round-{number}"
                command = fit_command(args, args.particles[0], run_dir, [])
                result = measured(command, work_dir, "shared")
                inner = fit_counts(run_dir).get("inner_s")
            else:
                out = work_dir / f"jax-round-{number}.json"
                command = numpyro_command(args, "train", out)
                result = {"command": shlex.join(command), **run_measured(command)}
                _, inner = numpyro_reply(out, "train")
            rows.append({"round": number, "tool": tool, "inner_s": inner, **result})
    return rows


def rounds_report(rows: list[dict]) -> str:
    """Medians (and quartiles) of the alternated warm epochs, and their ratio."""
    lines, medians = [], {}
    for tool in ("fit", "NumPyro"):
        walls = [r["wall_s"] for r in rows if r["tool"] == tool]
        inner = [r["inner_s"] for r in rows if r["tool"] == tool and r["inner_s"]]
        q1, medians[tool], q3 = quartiles(walls)
        clock = f"{statistics.median(inner):.2f}" if inner else "?"
        lines.append(
            [tool, len(walls), f"{medians[tool]:.2f}", f"{q1:.2f} to {q3:.2f}", clock]
        )
    table = markdown_table(
        ["warm epoch", "runs", "median wall s", "quartiles s", "median tool's clock s"],
        lines,
    )
    ratio = medians["fit"] / medians["NumPyro"]
    return f"{table}\n\nfit's median wall / NumPyro's: {ratio:.2f}"


def report(env: dict, results: list[dict]) -> str:
    rows = [
        [
            r["step"],
            f"{r['wall_s']:.1f}",
            f"{r['cpu_s']:.1f}",
            r["images"] if r["images"] is not None else "?",
            f"{r['images'] / r['wall_s']:.0f}" if r["images"] else "?",
            f"{r['images'] / r['inner_s']:.0f}" if r["images"] else "?",
            "?" if r["compile_s"] is None else f"{r['compile_s']:.1f}",
            r.get("choice", "?"),
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
            "of which compiling s",
            "ran",
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
            "epoch time in fit's metrics.jsonl and the time in eval-nll's JSON, "
            "compile time included; 'of which compiling' is the part of the tool's "
            "clock spent tracing and compiling graphs (from a cold inductor cache "
            "and no precompiled header, as on a machine inductor never compiled "
            "on, unless the step says warm). For NumPyro (jax_epoch.py), the tool's "
            "clock is its SVI init and jitted epoch, or its jitted estimate, "
            "compiling included; 'warm' runs with the JAX compilation cache the "
            "cold run filled; its estimate uses the initial weights (the same "
            "work). Commands:",
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
    parser.add_argument(
        "--compile",
        choices=["off", "on", "both", "warm", "default"],
        default="off",
        help="run the commands eagerly (--compile off), with --compile (each from "
        "a fresh inductor cache), or both ways; warm: with --compile twice, the "
        "second time with the cache the first filled; default: with the tools' "
        "own choice (--compile auto) twice, from a fresh cache, then warm",
    )
    parser.add_argument("--fit-args", default="", help="extra options for fit")
    parser.add_argument("--eval-args", default="", help="extra options for eval-nll")
    parser.add_argument(
        "--work-dir", help="keep the run directories here (default: a temporary one)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write results as JSON")
    parser.add_argument(
        "--jax-python",
        help="the Python of an environment with jax and numpyro: also time NumPyro's "
        "epoch and log-likelihood (jax_epoch.py; needs --data-dir)",
    )
    parser.add_argument("--jax-args", default="", help="extra options for jax_epoch.py")
    parser.add_argument(
        "--epoch-rounds",
        type=int,
        default=0,
        help="then this many more warm epochs of fit and of NumPyro, alternated, "
        "reported as medians (needs --jax-python)",
    )
    args = parser.parse_args(argv)
    if args.jax_python and not args.data_dir:
        parser.error("--jax-python needs --data-dir (the folder holding MNIST/raw)")
    if args.epoch_rounds and not args.jax_python:
        parser.error("--epoch-rounds needs --jax-python")
    problem = check_cli()
    if problem:
        print(f"cannot run the end-to-end benchmark: {problem}", file=sys.stderr)
        return 2
    env = environment(seed=args.seed)
    if args.work_dir:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
        results, rounds = run_all(args, Path(args.work_dir))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            results, rounds = run_all(args, Path(tmp))
    print(report(env, results))
    if rounds:
        print(f"\n{rounds_report(rounds)}")
    if args.json:
        payload = {"environment": env, "results": results, "epoch_rounds": rounds}
        write_json(args.json, payload)
    return int(any(r["returncode"] for r in [*results, *rounds]))


def run_all(args: argparse.Namespace, work_dir: Path) -> tuple[list[dict], list[dict]]:
    results = run(args, work_dir)
    return results, epoch_rounds(args, work_dir)


if __name__ == "__main__":
    sys.exit(main())
