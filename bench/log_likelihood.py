"""Time ``pyro_iwae.log_likelihood`` against a hand-written chunked estimator.

Both estimate log p(x) of a fixed set of binarised MNIST test images with the
paper's one-layer model (same weights), K particles per image drawn in chunks and
combined by a running logsumexp, batch by batch. Timings are interleaved in one
process (the order alternating every round); peak memory is measured in a fresh
process per variant (its peak RSS, ``ru_maxrss``), since RSS is process-wide
and torch's allocations are invisible to ``tracemalloc``.

    python bench/log_likelihood.py --data-dir /work/shared/data
    python bench/log_likelihood.py --dataset mnist-mini --k 500 --images 40 \\
        --repeats 2 --chunk-sizes 100 default --sweep-repeats 1
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import pyro
import torch
from common import (
    add_common_arguments,
    environment,
    environment_markdown,
    load_test_images,
    markdown_table,
    quartiles,
    run_measured,
    timed,
    write_json,
)
from handwritten import HandIWAE

from pyro_iwae import log_likelihood, paper_architecture
from pyro_iwae.infer.evaluation import default_chunk_size

VARIANTS = ("pyro_iwae", "hand")
#: Target ratio of pyro_iwae.log_likelihood to the hand-written estimator.
TARGET = 1.05


class Setup:
    """The paper's model and guide, a hand-written copy, and the test images."""

    def __init__(self, images: torch.Tensor, state: tuple[dict, dict] | None = None):
        self.images = images
        self.model, self.guide = paper_architecture(1)
        if state is not None:
            self.model.load_state_dict(state[0])
            self.guide.load_state_dict(state[1])
        self.hand = HandIWAE().load_from(self.model, self.guide).eval()

    def state(self) -> tuple[dict, dict]:
        return self.model.state_dict(), self.guide.state_dict()

    def chunk_size(self, batch: int, chunk: int | None) -> int:
        """``chunk``, or the library's default for a batch of ``batch`` images."""
        if chunk is not None:
            return chunk
        return default_chunk_size(self.model, self.guide, self.images[:batch])

    def estimate(
        self, variant: str, batch: int, num_samples: int, chunk: int | None
    ) -> torch.Tensor:
        """log p(x) of every image, ``batch`` images at a time.

        ``chunk=None`` lets ``pyro_iwae`` choose its default chunk size (its cost
        included); the hand-written estimator is given the same number.
        """
        estimates = []
        for start in range(0, self.images.shape[0], batch):
            x = self.images[start : start + batch]
            if variant == "pyro_iwae":
                estimates.append(
                    log_likelihood(
                        self.model,
                        self.guide,
                        x,
                        num_samples=num_samples,
                        chunk_size=chunk,
                    )
                )
            else:
                size = self.chunk_size(x.shape[0], chunk)
                estimates.append(self.hand.log_likelihood(x, num_samples, size))
        return torch.cat(estimates)


def agreement(setup: Setup, num_samples: int = 500, chunk: int = 100) -> float:
    """Largest gap (nats) between the two estimators drawing the same particles."""
    results = []
    for variant in VARIANTS:
        torch.manual_seed(0)
        results.append(setup.estimate(variant, 20, num_samples, chunk))
    return (results[0] - results[1]).abs().max().item()


def time_interleaved(
    setup: Setup, batch: int, num_samples: int, chunk: int | None, repeats: int
) -> dict[str, list[float]]:
    """Seconds per estimate of all images, per variant; one warm-up round."""
    times = {variant: [] for variant in VARIANTS}
    for round_ in range(repeats + 1):
        order = VARIANTS if round_ % 2 else VARIANTS[::-1]
        for variant in order:
            seconds = timed(
                lambda v=variant: setup.estimate(v, batch, num_samples, chunk)
            )
            if round_:
                times[variant].append(seconds)
    return times


def summarise(
    times: dict[str, list[float]], images: int, **config
) -> list[dict[str, object]]:
    rows = []
    for variant, seconds in times.items():
        q1, median, q3 = quartiles(seconds)
        rows.append(
            {
                **config,
                "variant": variant,
                "median_s": median,
                "q1_s": q1,
                "q3_s": q3,
                "images_per_s": images / median,
                "vs_hand": statistics.median(
                    t / h for t, h in zip(seconds, times["hand"], strict=True)
                ),
                "times_s": seconds,
            }
        )
    return rows


def measure_memory(
    state_path: Path, variant: str, batch: int, num_samples: int, chunk: int | None
) -> dict[str, float]:
    """Peak RSS (MiB) and minor page faults of a fresh process running one estimate.

    ``variant="baseline"`` does everything but the estimate itself.
    """
    command = [sys.executable, __file__, "--worker", str(state_path), variant]
    command += [
        str(batch),
        str(num_samples),
        "default" if chunk is None else str(chunk),
    ]
    result = run_measured(command)
    if result["returncode"]:
        raise RuntimeError(f"{shlex.join(command)} failed ({result['returncode']})")
    return {key: result[key] for key in ("peak_rss_mib", "minor_faults")}


def worker(argv: list[str]) -> None:
    """Runs one estimate (nothing for ``baseline``) after a one-particle warm-up."""
    state_path, variant, batch, num_samples, chunk = argv
    state = torch.load(state_path)
    pyro.enable_validation(state["validation"])
    setup = Setup(state["images"], (state["model"], state["guide"]))
    # Lazy initialisation (thread pools, kernels) counts in the baseline.
    setup.estimate("hand", int(batch), 1, 1)
    if variant != "baseline":
        chunk = None if chunk == "default" else int(chunk)
        torch.manual_seed(state["seed"])
        setup.estimate(variant, int(batch), int(num_samples), chunk)


def parse_chunks(values: list[str]) -> list[int | None]:
    return [None if v == "default" else int(v) for v in values]


def run(args: argparse.Namespace) -> dict:
    pyro.enable_validation(args.validation)
    torch.manual_seed(args.seed)
    setup = Setup(load_test_images(args.dataset, args.data_dir, args.images))
    out: dict = {
        "agreement_nats": agreement(setup),
        "default_chunk_size": {b: setup.chunk_size(b, None) for b in args.batch},
        "main": [],
        "sweep": [],
        "memory": [],
    }
    for batch in args.batch:
        times = time_interleaved(setup, batch, args.k, None, args.repeats)
        out["main"] += summarise(
            times, args.images, batch=batch, chunk=setup.chunk_size(batch, None)
        )
    chunks = parse_chunks(args.chunk_sizes)
    for chunk in chunks:
        times = time_interleaved(
            setup, args.sweep_batch, args.k, chunk, args.sweep_repeats
        )
        out["sweep"] += summarise(
            times,
            args.images,
            batch=args.sweep_batch,
            chunk=setup.chunk_size(args.sweep_batch, chunk),
            default=chunk is None,
        )
    if args.memory:
        configs = [(batch, None) for batch in args.batch]
        configs += [(args.sweep_batch, c) for c in chunks if c is not None]
        with tempfile.TemporaryDirectory() as tmp:
            state_path = Path(tmp) / "state.pt"
            model, guide = setup.state()
            torch.save(
                {
                    "images": setup.images,
                    "model": model,
                    "guide": guide,
                    "seed": args.seed,
                    "validation": args.validation,
                },
                state_path,
            )
            baseline = {
                batch: measure_memory(state_path, "baseline", batch, 1, 1)
                for batch in dict.fromkeys(batch for batch, _ in configs)
            }
            out["memory_baseline_mib"] = {
                batch: m["peak_rss_mib"] for batch, m in baseline.items()
            }
            for batch, chunk in dict.fromkeys(configs):
                for variant in VARIANTS:
                    memory = measure_memory(state_path, variant, batch, args.k, chunk)
                    out["memory"].append(
                        {
                            "variant": variant,
                            "batch": batch,
                            "chunk": setup.chunk_size(batch, chunk),
                            "default": chunk is None,
                            "baseline_rss_mib": baseline[batch]["peak_rss_mib"],
                            **memory,
                        }
                    )
    return out


def _chunk_label(row: dict) -> str:
    return (
        f"{row['chunk']} (default)" if row.get("default", True) else str(row["chunk"])
    )


def _timing_rows(rows: list[dict]) -> list[list]:
    return [
        [
            r["batch"],
            _chunk_label(r),
            r["variant"],
            f"{r['median_s']:.3f}",
            f"{r['q1_s']:.3f}–{r['q3_s']:.3f}",
            f"{r['images_per_s']:.1f}",
            f"{r['vs_hand']:.3f}",
        ]
        for r in rows
    ]


def report(env: dict, out: dict, args: argparse.Namespace) -> str:
    headers = ["batch", "chunk", "variant", "median s", "IQR s", "images/s", "/ hand"]
    lines = [
        "## log_likelihood",
        "",
        environment_markdown(env),
        f"- same particles (seeded, K = 500, chunk 100): the two estimators differ "
        f"by at most {out['agreement_nats']:.1e} nats",
        "",
        f"K = {args.k} particles per image, {args.images} images, default chunk "
        f"size (pyro_iwae's, from its memory budget; the hand-written estimator is "
        f"given the same number); {args.repeats} interleaved rounds:",
        "",
        markdown_table(headers, _timing_rows(out["main"])),
        "",
        f"Chunk size, batch {args.sweep_batch}, {args.sweep_repeats} interleaved "
        "rounds:",
        "",
        markdown_table(headers, _timing_rows(out["sweep"])),
    ]
    if out["memory"]:
        rows = [
            [
                r["batch"],
                _chunk_label(r),
                r["variant"],
                f"{r['peak_rss_mib']:.0f}",
                f"{r['peak_rss_mib'] - r['baseline_rss_mib']:.0f}",
                r["minor_faults"],
            ]
            for r in out["memory"]
        ]
        lines += [
            "",
            "Peak memory of a fresh process running one estimate (peak RSS in MiB, "
            "its ru_maxrss; above baseline: minus the peak RSS of the same process "
            "without the estimate, "
            + ", ".join(
                f"{mib:.0f} MiB at batch {b}"
                for b, mib in out["memory_baseline_mib"].items()
            )
            + "; minor page faults of the whole process):",
            "",
            markdown_table(
                [
                    "batch",
                    "chunk",
                    "variant",
                    "peak RSS",
                    "above baseline",
                    "minor page faults",
                ],
                rows,
            ),
        ]
    ratios = [r for r in out["main"] if r["variant"] == "pyro_iwae"]
    lines += [
        "",
        f"Target: pyro_iwae / hand <= {TARGET:.2f} at the default chunk size:",
        "",
    ]
    lines += [
        f"- batch {r['batch']}: {r['vs_hand']:.3f} "
        f"({'met' if r['vs_hand'] <= TARGET else 'NOT met'})"
        for r in ratios
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if argv[:1] == ["--worker"]:
        worker(argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=5000, help="particles per image")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--batch", type=int, nargs="+", default=[100, 20])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument(
        "--chunk-sizes",
        nargs="+",
        default=["100", "500", "1000", "5000", "default"],
        help="chunk sizes of the sweep ('default': the library's choice)",
    )
    parser.add_argument("--sweep-batch", type=int, default=100)
    parser.add_argument("--sweep-repeats", type=int, default=3)
    parser.add_argument(
        "--no-memory",
        dest="memory",
        action="store_false",
        help="skip the peak-memory subprocesses",
    )
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    env = environment(
        seed=args.seed,
        pyro_validation="on" if args.validation else "off",
        images=args.images,
        particles_per_image=args.k,
    )
    out = run(args)
    print(report(env, out, args))
    if args.json:
        write_json(args.json, {"environment": env, **out})


if __name__ == "__main__":
    main(sys.argv[1:])
