"""How loose is the paper's NLL? IWAE at k = 5000 against AIS on the same points.

For each run directory: the IWAE bound at ``--k`` with its per-point diagnostics
(ESS, Pareto k-hat), and annealed importance sampling (``--ais-steps`` HMC steps,
``--chains`` chains) on the first ``--points`` test images, paired point by point.
Writes ``<out>/<run name>.json`` (settings, seed, versions, times, per-point
estimates) and prints a Markdown table of all runs given.

    python scripts/ais_vs_iwae.py RUN_DIR [RUN_DIR ...] --data-dir DATA --cuda
    python scripts/ais_vs_iwae.py --report results/ais/*.json --pair iwae-k50 vae-k50

``--report`` reads results written before and prints their table; ``--pair A B``
adds how much higher A's log-likelihood is than B's by each estimator, paired
over the points they share.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from pyro_iwae import ais_log_likelihood, log_likelihood_with_diagnostics
from pyro_iwae.runs.run import load_run, versions


def batches(points: torch.Tensor, size: int):
    for start in range(0, points.shape[0], size):
        yield points[start : start + size]


def evaluate(run_dir: Path, args: argparse.Namespace, device: str) -> dict:
    config, model, guide = load_run(run_dir, device)
    points = config.load_data(args.data_dir).test[: args.points].to(device)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    iwae = [
        log_likelihood_with_diagnostics(model, guide, x, num_samples=args.k)
        for x in batches(points, args.batch_size)
    ]
    iwae_time = time.perf_counter() - start
    torch.manual_seed(args.seed)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    ais = [
        ais_log_likelihood(
            model, guide, x, num_steps=args.ais_steps, num_chains=args.chains
        )
        for x in batches(points, args.batch_size)
    ]
    ais_time = time.perf_counter() - start
    bound = torch.cat([d.log_likelihood for d in iwae]).double().cpu()
    khat = torch.cat([d.khat for d in iwae]).double().cpu()
    ess = torch.cat([d.ess for d in iwae]).double().cpu()
    annealed = torch.cat([a.log_likelihood for a in ais]).double().cpu()
    acceptance = torch.cat([a.acceptance_rate for a in ais]).double().cpu()
    gap = annealed - bound
    n = bound.numel()
    return {
        "run": run_dir.name,
        "objective": config.objective,
        "k_train": config.num_particles,
        "points": n,
        "nll_iwae": -bound.mean().item(),
        "nll_iwae_se": bound.std().item() / math.sqrt(n),
        "nll_ais": -annealed.mean().item(),
        "nll_ais_se": annealed.std().item() / math.sqrt(n),
        "ais_minus_iwae": gap.mean().item(),
        "ais_minus_iwae_se": gap.std().item() / math.sqrt(n),
        "khat_median": khat.nanmedian().item(),
        "khat_above_0.7": (khat > 0.7).double().mean().item(),
        "ess_median": ess.median().item(),
        "ais_acceptance": acceptance.mean().item(),
        "iwae_time_s": iwae_time,
        "ais_time_s": ais_time,
        "peak_gpu_memory_mib": (
            torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
        ),
        "settings": {
            "k": args.k,
            "ais_steps": args.ais_steps,
            "chains": args.chains,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        },
        "versions": versions(),
        "date": datetime.now().isoformat(timespec="seconds"),
        "estimates": {
            "iwae": bound.tolist(),
            "ais": annealed.tolist(),
            "khat": khat.tolist(),
        },
    }


def table(results: list[dict]) -> str:
    head = (
        "| run | points | NLL, IWAE k | NLL, AIS | AIS - IWAE (paired) "
        "| k-hat median | k-hat > 0.7 | ESS median | AIS accept | time IWAE / AIS |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [
        f"| {r['run']} | {r['points']} "
        f"| {r['nll_iwae']:.2f} ± {r['nll_iwae_se']:.2f} "
        f"| {r['nll_ais']:.2f} ± {r['nll_ais_se']:.2f} "
        f"| {r['ais_minus_iwae']:.3f} ± {r['ais_minus_iwae_se']:.3f} "
        f"| {r['khat_median']:.2f} | {100 * r['khat_above_0.7']:.0f}% "
        f"| {r['ess_median']:.0f} | {r['ais_acceptance']:.2f} "
        f"| {r['iwae_time_s']:.0f} s / {r['ais_time_s']:.0f} s |"
        for r in results
    ]
    return "\n".join([head, *rows])


def pair(results: list[dict], a: str, b: str) -> str:
    by_run = {r["run"]: r["estimates"] for r in results}
    lines = []
    for method in ("iwae", "ais"):
        d = torch.tensor(by_run[a][method]) - torch.tensor(by_run[b][method])
        se = d.std().item() / math.sqrt(d.numel())
        lines.append(
            f"- {a} above {b}, by {method.upper()}: {d.mean().item():.3f} ± {se:.3f} "
            f"nats per point ({d.numel()} points, paired)"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", type=Path)
    parser.add_argument("--report", nargs="+", type=Path, default=None)
    parser.add_argument("--pair", nargs=2, metavar=("A", "B"), default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--points", type=int, default=1000)
    parser.add_argument("--k", type=int, default=5000)
    parser.add_argument("--ais-steps", type=int, default=1000)
    parser.add_argument("--chains", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("results/ais"))
    args = parser.parse_args(argv)
    if args.report:
        results = [json.loads(path.read_text()) for path in args.report]
        print(table(results))
        if args.pair:
            print()
            print(pair(results, *args.pair))
        return
    device = "cuda" if args.cuda else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for run_dir in args.runs:
        result = evaluate(run_dir, args, device)
        (args.out / f"{run_dir.name}.json").write_text(json.dumps(result) + "\n")
        results.append(result)
    print(f"command: python scripts/ais_vs_iwae.py {' '.join(argv)}\n")
    print(table(results))


if __name__ == "__main__":
    main(sys.argv[1:])
