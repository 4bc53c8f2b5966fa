"""Where Pyro's ``SVI.step`` with ``IWELBO`` spends a step, by optimiser.

Times the parts of ``svi.step`` one by one, as Pyro runs them: the loss and its
gradients (under Pyro's parameter-capturing trace), the optimiser's call on the
captured parameters, and ``zero_grads``; for ``pyro.optim.Adam`` (a torch Adam per
parameter tensor) and ``pyro_iwae.optim.Adam`` (one fused Adam for all of them),
each with subnormals flushed and not (flushed in the calling thread only: torch's
worker threads, started before, keep their mode, as in a script that flushes
after its first parallel operation; ``versus_jax.py`` flushes them all). The
paper's one-layer model on a fixed batch of test images; milliseconds per step,
the median of ``--rounds`` rounds. ``--compile`` gives the loss as
``IWELBO(k, compile=True)`` (one compiled graph of the loss and its gradients;
the warm-up compiles it), ``--threads`` sets torch's threads.

    python bench/svi_parts.py --data-dir /work/shared/data --batch 20 --k 5
    python bench/svi_parts.py --data-dir /work/shared/data --compile --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import common
import pyro
import pyro.optim
import torch
from pyro import poutine
from pyro.infer.util import zero_grads

import pyro_iwae.optim
from pyro_iwae import IWELBO, paper_architecture
from pyro_iwae.runs.denormals import flush_denormals

OPTIMISERS = {
    "pyro.optim.Adam": lambda: pyro.optim.Adam({"lr": 1e-3, "eps": 1e-4}),
    "pyro_iwae.optim.Adam": lambda: pyro_iwae.optim.Adam({"lr": 1e-3, "eps": 1e-4}),
}
PARTS = ("loss and gradients", "optimiser", "zero_grads", "svi.step")


def measure(optim_name: str, flush: bool, x: torch.Tensor, k: int, init, args):
    """Median ms per step of each part of ``svi.step``."""
    model, guide = paper_architecture(1)
    model.load_state_dict(init[0])
    guide.load_state_dict(init[1])
    pyro.clear_param_store()
    optim = OPTIMISERS[optim_name]()
    elbo = IWELBO(num_particles=k, compile=args.compile)
    svi = pyro.infer.SVI(model, guide, optim, loss=elbo)
    rounds = {part: [] for part in PARTS}
    with flush_denormals(flush):
        for _ in range(args.warmup):
            svi.step(x)
        for _ in range(args.rounds):
            totals = dict.fromkeys(PARTS, 0.0)
            for _ in range(args.steps):
                # svi.step's own body, each part timed.
                t0 = time.perf_counter()
                with poutine.trace(param_only=True) as capture:
                    elbo.loss_and_grads(model, guide, x)
                t1 = time.perf_counter()
                params = {
                    s["value"].unconstrained() for s in capture.trace.nodes.values()
                }
                optim(params)
                t2 = time.perf_counter()
                zero_grads(params)
                t3 = time.perf_counter()
                totals["loss and gradients"] += t1 - t0
                totals["optimiser"] += t2 - t1
                totals["zero_grads"] += t3 - t2
            start = time.perf_counter()
            for _ in range(args.steps):
                svi.step(x)
            totals["svi.step"] = time.perf_counter() - start
            for part in PARTS:
                rounds[part].append(totals[part] / args.steps * 1e3)
    return {part: statistics.median(values) for part, values in rounds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50, help="steps per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="IWELBO(compile=True)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pyro.enable_validation(args.validation)
    torch.manual_seed(args.seed)
    x = common.load_test_images(args.dataset, args.data_dir, args.batch)
    model, guide = paper_architecture(1)
    init = (model.state_dict(), guide.state_dict())
    rows = []
    for flush in (False, True):
        for name in OPTIMISERS:
            parts = measure(name, flush, x, args.k, init, args)
            rows.append(
                [name, "yes" if flush else "no", *(f"{parts[p]:.3f}" for p in PARTS)]
            )
    env = common.environment(
        args.seed,
        batch=args.batch,
        k=args.k,
        steps=args.steps,
        rounds=args.rounds,
        loss="IWELBO(compile=True)" if args.compile else "IWELBO",
        threads=torch.get_num_threads(),
    )
    print(common.environment_markdown(env))
    print()
    headers = ["optimiser", "subnormals flushed", *(f"{p}, ms" for p in PARTS)]
    print(common.markdown_table(headers, rows))
    if args.json:
        common.write_json(args.json, {"environment": env, "rows": rows})


if __name__ == "__main__":
    main()
