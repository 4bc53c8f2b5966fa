"""Where IWELBO's per-step Python time goes: cProfile of the loss on a 2-point batch.

With 2 data points the tensor work is negligible, so what remains is the cost of
Pyro's tracing and of IWELBO's own bookkeeping. Usage::

    python bench/profile_step.py [--k 5] [--steps 300] [--top 25]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import pyro
import torch

from pyro_iwae import IWELBO, paper_architecture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    pyro.enable_validation(False)
    torch.manual_seed(0)
    model, guide = paper_architecture(1)
    x = (torch.rand(2, 784) < 0.3).float()
    loss = IWELBO(args.k)(model, guide)
    with pyro.settings.context(module_local_params=True):
        for _ in range(50):
            loss(x)
        start = time.perf_counter()
        for _ in range(args.steps):
            loss(x)
        per_step = (time.perf_counter() - start) / args.steps * 1e3
        print(f"loss forward on 2 points, k = {args.k}: {per_step:.3f} ms per call")
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.steps):
            loss(x)
        profile.disable()
    pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
