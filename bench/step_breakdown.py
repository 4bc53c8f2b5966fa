"""Where one training step's time goes: GEMMs, other tensor operations, the
optimiser, and what runs outside any tensor operation (Python, Pyro's messengers,
the autograd engine's bookkeeping, the compiled graph's call).

For ``fit``'s eager step and its compiled step (bench/fit_overhead.py's ``step``
variants: the paper's one-layer model, a fixed batch of test images, fused Adam,
subnormals flushed), it times ``--steps`` steps unprofiled, then again under
``torch.profiler`` and sums each operation's self CPU time by kind. The profiler
adds a few microseconds per operation, so its total exceeds the unprofiled step;
the shares are what to read. A step that is mostly "outside operations" is
bound by the framework, not by arithmetic: that is what a scan of jitted steps
(NumPyro's ``svi.run``) does not pay.

    python bench/step_breakdown.py --data-dir /work/shared/data --batch 20 --k 5
    python bench/step_breakdown.py --dataset mnist-mini --steps 20 --threads 1
"""

from __future__ import annotations

import argparse
import collections
import time

import common
import fit_overhead
import pyro
import torch
from torch.profiler import ProfilerActivity, profile

from pyro_iwae import paper_architecture
from pyro_iwae.runs.denormals import flush_denormals_from_start

#: Operation names counted as matrix products.
GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_addmm_activation")


def kind(name: str) -> str:
    if name in GEMMS:
        return "GEMMs"
    if "adam" in name.lower() or name.startswith("Optimizer."):
        return "optimiser"
    if "cpp_fused" in name or "Compiled" in name or "Torch-Compiled" in name:
        return "compiled kernels and graph call"
    return "other tensor operations"


def breakdown(step, steps: int) -> tuple[float, float, dict[str, float]]:
    """Unprofiled and profiled wall ms per step, and profiled ms per step by kind."""
    for _ in range(5):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    wall = (time.perf_counter() - start) / steps * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        profiled = (time.perf_counter() - start) / steps * 1e3
    by_kind: dict[str, float] = collections.defaultdict(float)
    for event in prof.key_averages():
        by_kind[kind(event.key)] += event.self_cpu_time_total / 1e3 / steps
    inside = sum(by_kind.values())
    by_kind["outside operations"] = max(profiled - inside, 0.0)
    return wall, profiled, dict(by_kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    flush_denormals_from_start()
    if args.threads:
        torch.set_num_threads(args.threads)
    pyro.enable_validation(args.validation)
    torch.manual_seed(args.seed)
    x = common.load_test_images(args.dataset, args.data_dir, args.batch)
    model, guide = paper_architecture(1)
    init = (model.state_dict(), guide.state_dict())
    kinds = ("GEMMs", "other tensor operations", "optimiser")
    kinds += ("compiled kernels and graph call", "outside operations")
    rows = []
    for name, how in (("eager (fit's default)", None), ("compiled", "step")):
        step = fit_overhead.make_step(args.k, args.batch, init, lambda: x, how=how)
        wall, profiled, by_kind = breakdown(step, args.steps)
        shares = [
            f"{by_kind.get(k, 0.0):.3f} ({by_kind.get(k, 0.0) / profiled:.0%})"
            for k in kinds
        ]
        rows.append([name, f"{wall:.3f}", f"{profiled:.3f}", *shares])
    env = common.environment(
        args.seed,
        batch=args.batch,
        k=args.k,
        steps=args.steps,
        threads=torch.get_num_threads(),
    )
    print(common.environment_markdown(env))
    print()
    headers = ["step", "ms/step", "profiled ms/step", *[f"{k}, ms" for k in kinds]]
    print(common.markdown_table(headers, rows))
    if args.json:
        common.write_json(args.json, {"environment": env, "rows": rows})


if __name__ == "__main__":
    main()
