"""Time the command-line tool with 1 and with N processes (torchrun, gloo), one
torch thread each: one epoch of ``fit`` and ``eval-nll --k 5000`` on the whole
test set, wall time and speed-up; checks that the evaluations' per-point
estimates are identical.

One process runs the plain command (no torchrun: what a user runs today); N
processes run ``torchrun --standalone --nproc-per-node=N $(command -v
pyro-iwae) ...``. Wall times include starting the processes and loading the
data. With the defaults this takes many minutes.

    python bench/distributed.py --data-dir /work/shared/data
    python bench/distributed.py --dataset mnist-mini --eval-k 100 --eval-limit 500
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from common import environment, environment_markdown, markdown_table, run_measured

EXECUTABLE = "pyro-iwae"


def command(processes: int, *args: str) -> list[str]:
    """The CLI command with ``args``, under torchrun for more than one process."""
    executable = shutil.which(EXECUTABLE)
    if processes == 1:
        return [executable, *args]
    torchrun = shutil.which("torchrun") or "torchrun"
    launch = [torchrun, "--standalone", f"--nproc-per-node={processes}"]
    return [*launch, executable, *args]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--particles", type=int, default=5, help="k of fit")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--eval-k", type=int, default=5000)
    parser.add_argument("--eval-limit", type=int, default=0, help="0: all")
    parser.add_argument("--skip-fit", action="store_true")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument(
        "--note", default="", help="a line for the report (such as what else ran)"
    )
    args = parser.parse_args()
    if shutil.which(EXECUTABLE) is None:
        print(f"{EXECUTABLE} is not on PATH (pip install -e .)", file=sys.stderr)
        return 1
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    data = ["--dataset", args.dataset]
    if args.data_dir:
        data += ["--data-dir", args.data_dir]
    info = environment(
        processes=args.processes,
        threads_per_process=1,
        **({"note": args.note} if args.note else {}),
    )
    rows, results = [], {"environment": info, "runs": []}
    tmp = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    base = {}
    try:
        for processes in args.processes:
            out = tmp / f"fit-{processes}"
            if not args.skip_fit or processes == args.processes[0]:
                fit = [
                    "fit",
                    *data,
                    "--epochs",
                    "1",
                    "--particles",
                    str(args.particles),
                    "--batch-size",
                    str(args.batch_size),
                    "--out",
                    str(out),
                    "--quiet",
                ]
                result = _run("fit", processes, command(processes, *fit), env)
                (metrics,) = [
                    json.loads(line) for line in (out / "metrics.jsonl").open()
                ]
                result["epoch_s"] = metrics["time"]
                result["images_per_s"] = metrics["images_per_s"]
                rows.append(_row(result, base, f"{metrics['images_per_s']:.0f} img/s"))
                results["runs"].append(result)
            if args.skip_eval:
                continue
            run = tmp / f"fit-{args.processes[0]}"
            evaluate = [
                "eval-nll",
                str(run),
                "--k",
                str(args.eval_k),
                "--limit",
                str(args.eval_limit),
                "--quiet",
            ]
            result = _run("eval-nll", processes, command(processes, *evaluate), env)
            estimates = (run / f"estimates-test-k{args.eval_k}.txt").read_text()
            evaluation = run / f"eval-test-k{args.eval_k}.json"
            evaluation = json.loads(evaluation.read_text())
            result["estimates"] = estimates
            result["nll"] = evaluation["nll"]
            result["compute_s"] = evaluation["time"]
            same = base.get("estimates", {}).get("eval-nll")
            identical = "" if same is None else ("yes" if same == estimates else "NO")
            base.setdefault("estimates", {}).setdefault("eval-nll", estimates)
            note = f"NLL {evaluation['nll']:.3f}, {evaluation['points']} points"
            if identical:
                note += f"; estimates identical to 1 process: {identical}"
            rows.append(_row(result, base, note))
            del result["estimates"]
            results["runs"].append(result)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info["load_average_at_end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print("## pyro-iwae with 1 and more processes (torchrun, gloo, CPU)\n")
    print(environment_markdown(info))
    print()
    headers = ["command", "processes", "wall (s)", "of which training or NLL (s)"]
    headers += ["speed-up (wall)", "notes"]
    print(markdown_table(headers, rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _run(what: str, processes: int, argv: list[str], env: dict) -> dict:
    print(f"running: {' '.join(argv)}", file=sys.stderr, flush=True)
    result = run_measured(argv, env=env, stdout=sys.stderr)
    if result["returncode"] != 0:
        raise SystemExit(f"{what} with {processes} processes failed")
    return {"command": what, "processes": processes, **result}


def _row(result: dict, base: dict, note: str) -> list:
    first = base.setdefault(result["command"], result["wall_s"])
    training = result.get("epoch_s", result.get("compute_s"))
    return [
        result["command"],
        result["processes"],
        f"{result['wall_s']:.1f}",
        "" if training is None else f"{training:.1f}",
        f"{first / result['wall_s']:.2f}",
        note,
    ]


if __name__ == "__main__":
    sys.exit(main())
