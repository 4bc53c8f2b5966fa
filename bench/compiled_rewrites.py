"""What the compiled evaluation's graph rewrites buy: ``CompiledLogLikelihood``
with none of them, with the grouped Bernoulli log-density alone, and with it and
the ``exp``-based ``tanh``, timed round by round on the same images, and a
per-kernel profile of one chunk of the last.

The variants switch the rewrites off by replacing
``pyro_iwae.compiled.log_likelihood``'s ``group_bernoulli_sums`` and
``cheaper_tanh`` with no-ops while their graph is
built (a benchmark's switch, not an option of the library)::

    python bench/compiled_rewrites.py --data-dir /work/shared/data
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from unittest import mock

import common
import pyro
import torch
import torch._inductor.config

import pyro_iwae.compiled.log_likelihood as compiled_module
from pyro_iwae import paper_architecture
from pyro_iwae.compiled import CompiledLogLikelihood

#: Variant: the rewrites it leaves out.
VARIANTS = {
    "no rewrite": ("group_bernoulli_sums", "cheaper_tanh"),
    "grouped log-density": ("cheaper_tanh",),
    "grouped log-density + exp tanh": (),
}


def build(model, guide, x, chunk: int, left_out: tuple[str, ...]):
    """A CompiledLogLikelihood whose graph (built by this first call) lacks
    the rewrites ``left_out``."""
    estimator = CompiledLogLikelihood(model, guide)
    with contextlib.ExitStack() as stack:
        for name in left_out:
            no_op = mock.patch.object(compiled_module, name, lambda gm: None)
            stack.enter_context(no_op)
        estimator(x, num_samples=chunk, chunk_size=chunk)
    return estimator


def profile_chunks(estimator, x, num_samples: int, chunk: int) -> list[list]:
    """Self time per op and inductor kernel, in ms per chunk, largest first."""
    from torch.profiler import profile

    with profile() as prof:
        estimator(x, num_samples=num_samples, chunk_size=chunk)
    chunks = num_samples // chunk
    rows = [
        [event.key, event.count // chunks, event.self_cpu_time_total / 1e3 / chunks]
        for event in prof.key_averages()
        if event.self_cpu_time_total / 1e3 / chunks >= 0.05
    ]
    return sorted(rows, key=lambda row: -row[2])


def run(args: argparse.Namespace) -> dict:
    pyro.enable_validation(args.validation)
    # Names each inductor kernel in the profile (compiled in, so set before).
    torch._inductor.config.cpp.enable_kernel_profile = True
    torch.manual_seed(args.seed)
    x = common.load_test_images(args.dataset, args.data_dir, args.images)
    model, guide = paper_architecture(1)
    estimators = {
        name: build(model, guide, x, args.chunk, left_out)
        for name, left_out in VARIANTS.items()
    }
    estimates = {}
    for name, estimator in estimators.items():
        torch.manual_seed(args.seed)
        estimates[name] = estimator(
            x, num_samples=args.num_samples, chunk_size=args.chunk
        )
    reference = estimates["no rewrite"]
    times = {name: [] for name in estimators}
    for _ in range(args.rounds):
        for name, estimator in estimators.items():
            start = time.perf_counter()
            estimator(x, num_samples=args.num_samples, chunk_size=args.chunk)
            times[name].append(time.perf_counter() - start)
    chunks = -(-args.num_samples // args.chunk)
    rows = []
    for name, seconds in times.items():
        q1, median, q3 = common.quartiles([s / chunks * 1e3 for s in seconds])
        ratios = [a / b for a, b in zip(seconds, times["no rewrite"], strict=True)]
        rows.append(
            {
                "variant": name,
                "median_ms_per_chunk": median,
                "q1_ms": q1,
                "q3_ms": q3,
                "vs_no_rewrite": common.quartiles(ratios),
                "max_abs_gap_nats": (estimates[name] - reference).abs().max().item(),
            }
        )
    last = list(estimators)[-1]
    profile = profile_chunks(estimators[last], x, args.num_samples, args.chunk)
    return {"results": rows, "profile": profile, "profiled": last, "chunks": chunks}


def report(env: dict, out: dict, args: argparse.Namespace) -> str:
    rows = [
        [
            r["variant"],
            f"{r['median_ms_per_chunk']:.1f}",
            f"{r['q1_ms']:.1f}–{r['q3_ms']:.1f}",
            f"{r['vs_no_rewrite'][1]:.3f} ({r['vs_no_rewrite'][0]:.3f}–"
            f"{r['vs_no_rewrite'][2]:.3f})",
            f"{r['max_abs_gap_nats']:.1e}",
        ]
        for r in out["results"]
    ]
    profile = [[name, count, f"{ms:.2f}"] for name, count, ms in out["profile"]]
    return "\n".join(
        [
            "## The compiled evaluation's graph rewrites",
            "",
            common.environment_markdown(env),
            "",
            common.markdown_table(
                [
                    "variant",
                    "median ms a chunk",
                    "IQR ms",
                    "/ no rewrite (IQR)",
                    "max gap to no rewrite, nats",
                ],
                rows,
            ),
            "",
            f"Ratios are per round (the variants alternate within each of "
            f"{args.rounds} rounds of {out['chunks']} chunks of {args.chunk} "
            f"particles x {args.images} images); the gap compares each variant's "
            "estimates with the no-rewrite graph's from the same seed.",
            "",
            f"Profile of `{out['profiled']}` (`torch.profiler`, self time in ms a "
            "chunk; inductor's kernels by name):",
            "",
            common.markdown_table(["op or kernel", "calls a chunk", "ms"], profile),
        ]
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--num-samples", type=int, default=1060)
    parser.add_argument("--chunk", type=int, default=106)
    parser.add_argument("--rounds", type=int, default=16)
    common.add_common_arguments(parser)
    args = parser.parse_args(argv)
    env = common.environment(
        seed=args.seed,
        images=args.images,
        num_samples=args.num_samples,
        chunk=args.chunk,
        rounds=args.rounds,
    )
    out = run(args)
    print(report(env, out, args))
    if args.json:
        common.write_json(args.json, {"environment": env, **out})


if __name__ == "__main__":
    main(sys.argv[1:])
