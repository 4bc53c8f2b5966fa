"""What keeping freed memory in the process (``pyro_iwae.runs.allocator``) saves.

Each worker is a fresh interpreter, as each ``pyro-iwae`` command is (glibc's
thresholds move with what a process has freed so far), that times one cell under
glibc's default ``malloc`` settings or after
:func:`~pyro_iwae.runs.allocator.keep_freed_memory` (what the ``pyro-iwae``
command does when it starts): ``fit``'s training step (``adam_step``: IWELBO,
the fused Adam, subnormals flushed from the start, as ``fit`` runs it) on the
paper's model at a batch size and k, or ``log_likelihood`` at K = ``--ll-k`` on
``--ll-images`` test images, eagerly or compiled; with its minor page faults.
The two settings alternate, the order swapped every round; the table gives
medians over ``--repeat`` rounds of each worker's median.

With ``--commands``, whole ``pyro-iwae`` commands instead, started through the
console script's ``main()`` with and without the call: ``fit`` for one epoch at
k = 5 and 50 (default choices) and ``eval-nll --compile off`` on ``--ll-images``
test images; wall, minor page faults and peak RSS.

    python bench/allocator.py --data-dir ../shared/data --repeat 3
    python bench/allocator.py --data-dir ../shared/data --repeat 3 --commands
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import common

SETTINGS = ("defaults", "kept")
PATHS = ("eager", "compiled")


# The console script, with keep_freed_memory left out for "defaults".
_COMMAND = """
import sys
import pyro_iwae_cli.main as cli
if sys.argv[1] == "defaults":
    cli.keep_freed_memory = lambda: False
sys.argv = ["pyro-iwae", *sys.argv[2:]]
cli.main()
"""


def commands(args: argparse.Namespace, tmp: str) -> dict[str, list[str]]:
    """The whole commands timed with ``--commands``, by row name."""
    data = ["--dataset", args.dataset, "--seed", str(args.seed), "--quiet"]
    data += ["--data-dir", args.data_dir] if args.data_dir else []
    fit = ["fit", "--epochs", "1", *data]
    limit = str(args.ll_images)
    return {
        "pyro-iwae fit, 1 epoch, k 5": [*fit, "--particles", "5", "--out", f"{tmp}/k5"],
        "pyro-iwae fit, 1 epoch, k 50": [
            *fit,
            "--particles",
            "50",
            "--out",
            f"{tmp}/k50",
        ],
        f"pyro-iwae eval-nll --k {args.ll_k} --limit {limit} --compile off": [
            "eval-nll",
            f"{tmp}/k5",
            "--k",
            str(args.ll_k),
            "--limit",
            limit,
            "--compile",
            "off",
            *data[2:],
        ],
    }


def time_commands(args: argparse.Namespace) -> list[list[str]]:
    """Rows of the whole commands, each setting in turn, ``--repeat`` rounds."""
    results: dict = {}
    for i in range(args.repeat):
        for setting in SETTINGS if i % 2 == 0 else reversed(SETTINGS):
            with tempfile.TemporaryDirectory() as tmp:
                for name, command in commands(args, tmp).items():
                    used = common.run_measured(
                        [sys.executable, "-c", _COMMAND, setting, *command],
                        stdout=subprocess.DEVNULL,
                    )
                    if used["returncode"]:
                        raise RuntimeError(f"{name} failed ({setting})")
                    results.setdefault((name, setting), []).append(used)
    rows = []
    for name in commands(args, "RUN"):
        got = {
            s: {
                m: statistics.median(u[m] for u in results[name, s])
                for m in ("wall_s", "minor_faults", "peak_rss_mib")
            }
            for s in SETTINGS
        }
        before, after = (got[s]["wall_s"] for s in SETTINGS)
        rows.append(
            [
                name,
                f"{before:.2f} s",
                f"{after:.2f} s",
                f"{after / before:.2f}",
                f"{got['defaults']['minor_faults']:.0f}",
                f"{got['kept']['minor_faults']:.0f}",
                f"{got['defaults']['peak_rss_mib']:.0f}",
                f"{got['kept']['peak_rss_mib']:.0f}",
            ]
        )
    return rows


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def worker(args: argparse.Namespace) -> None:
    """One setting, path and cell (``"b{batch} k{k}"``, or ``"ll"``) in a fresh
    process, as a ``pyro-iwae`` command runs one: prints one JSON line."""
    import torch

    torch.set_flush_denormal(True)  # before the pool starts, as fit does
    if args.worker == "kept":
        from pyro_iwae.runs.allocator import keep_freed_memory

        assert keep_freed_memory(), "glibc only"
    import pyro

    from pyro_iwae import IWELBO, log_likelihood, paper_architecture
    from pyro_iwae.runs.fit_steps import adam_step

    compiled = args.path == "compiled"
    torch.manual_seed(args.seed)
    model, guide = paper_architecture(1)
    rounds = []
    if args.cell == "ll":
        x = common.load_test_images(args.dataset, args.data_dir, args.ll_images)

        def estimate() -> None:
            log_likelihood(model, guide, x, num_samples=args.ll_k, compile=compiled)

        estimate()  # compiles the compiled path's graph
        for _ in range(args.ll_rounds):
            before, start = faults(), time.perf_counter()
            estimate()
            rounds.append((time.perf_counter() - start, faults() - before))
    else:
        batch, k = (int(word[1:]) for word in args.cell.split())
        x = common.load_test_images(args.dataset, args.data_dir, batch)
        params = [*model.parameters(), *guide.parameters()]
        optimizer = torch.optim.Adam(params, lr=1e-3, eps=1e-4, fused=True)
        elbo = IWELBO(num_particles=k, compile=compiled)
        steps = max(10, int(args.step_budget / (batch * k)))
        with pyro.settings.context(module_local_params=True):
            for _ in range(args.warmup):
                adam_step(elbo, True, model, guide, x, optimizer)
            for _ in range(args.rounds):
                before, start = faults(), time.perf_counter()
                for _ in range(steps):
                    adam_step(elbo, True, model, guide, x, optimizer)
                seconds = (time.perf_counter() - start) / steps
                rounds.append((seconds, (faults() - before) / steps))
    print(json.dumps(_medians(rounds)))


def _medians(rounds: list[tuple[float, float]]) -> dict[str, float]:
    return {
        "seconds": statistics.median(r[0] for r in rounds),
        "faults": statistics.median(r[1] for r in rounds),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser)
    parser.add_argument("--batch", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--k", type=int, nargs="+", default=[5, 50])
    parser.add_argument("--repeat", type=int, default=3, help="rounds of workers")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds a cell")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps")
    parser.add_argument(
        "--step-budget",
        type=float,
        default=200_000,
        help="particle-points a timed round (steps = budget / (batch k))",
    )
    parser.add_argument("--ll-images", type=int, default=100)
    parser.add_argument("--ll-k", type=int, default=5000)
    parser.add_argument("--ll-rounds", type=int, default=3)
    parser.add_argument(
        "--commands",
        action="store_true",
        help="time whole pyro-iwae commands instead (fit one epoch at k 5 and 50, "
        "eval-nll on --ll-images test images): wall, page faults, peak RSS",
    )
    parser.add_argument("--worker", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    env = common.environment(seed=args.seed)
    if args.commands:
        rows = time_commands(args)
        if args.json:
            common.write_json(args.json, {"environment": env, "results": rows})
        print(common.environment_markdown(env))
        print()
        headers = ["command", "glibc defaults", "kept", "kept / defaults"]
        headers += ["faults, defaults", "faults, kept"]
        headers += ["peak RSS MiB, defaults", "peak RSS MiB, kept"]
        print(common.markdown_table(headers, rows))
        print(f"\nwall times: medians over {args.repeat} alternated rounds")
        return None
    argv = sys.argv[1:] if argv is None else argv
    cells = [f"b{b} k{k}" for b, k in itertools.product(args.batch, args.k)]
    cells += ["ll"] if args.ll_images else []
    results = {(c, s, p): [] for c in cells for s in SETTINGS for p in PATHS}
    for i, path, cell in itertools.product(range(args.repeat), PATHS, cells):
        for setting in SETTINGS if i % 2 == 0 else reversed(SETTINGS):
            command = [sys.executable, __file__, *argv, "--worker", setting]
            reply = subprocess.run(
                [*command, "--path", path, "--cell", cell],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            results[cell, setting, path].append(json.loads(reply.splitlines()[-1]))
    rows = []
    for path, cell in itertools.product(PATHS, cells):
        got = {
            s: {
                m: statistics.median(r[m] for r in results[cell, s, path])
                for m in ("seconds", "faults")
            }
            for s in SETTINGS
        }
        if cell == "ll":
            name, unit, scale = (
                f"log_likelihood, {args.ll_images} images, K {args.ll_k}",
                "s",
                1,
            )
        else:
            name, unit, scale = f"training step, {cell}", "ms", 1e3
        before, after = (got[s]["seconds"] * scale for s in SETTINGS)
        rows.append(
            [
                f"{name}, {path}",
                f"{before:.3g} {unit}",
                f"{after:.3g} {unit}",
                f"{after / before:.2f}",
                f"{got['defaults']['faults']:.0f}",
                f"{got['kept']['faults']:.0f}",
            ]
        )
    if args.json:
        common.write_json(args.json, {"environment": env, "results": rows})
    print(common.environment_markdown(env))
    print()
    headers = ["cell", "glibc defaults", "kept", "kept / defaults"]
    print(common.markdown_table([*headers, "faults, defaults", "faults, kept"], rows))
    print(
        f"\nmedians over {args.repeat} alternated rounds of workers; page faults "
        "per step (training) or per estimate (log_likelihood)"
    )


if __name__ == "__main__":
    main()
