"""Where the first call of the compiled training loss spends its time.

``fit --compile`` (``IWELBO(k, compile=True)``) pays once per input shape for:
tracing the Pyro program and its backward pass into an aten graph
(``trace_graph``, fake tensors), compiling that graph (``compile_graph``: inductor's
lowering, code generation and C++ compilation, or a hit in its on-disk cache),
and checking the first call against the eager loss and gradients
(``_verified``). This script times each part for the paper's model, in a fresh
process per pass, with a cold inductor cache (a new, empty folder) and then warm
(the folder the cold pass filled), and prints a Markdown table.

    python bench/compile_cost.py --data-dir /work/shared/data
    python bench/compile_cost.py --dataset mnist-mini --batch 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import common

PARTS = ("trace_graph", "compile_graph", "_verified")


def one_pass(args: argparse.Namespace) -> dict:
    """In this process: the first compiled step, its parts timed."""
    import pyro
    import torch

    import pyro_iwae.compiled.loss as compiled
    from pyro_iwae import IWELBO, paper_architecture

    seconds = dict.fromkeys(PARTS, 0.0)

    def timed(name, fn):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                seconds[name] += time.perf_counter() - start

        return wrapper

    compiled.trace_graph = timed("trace_graph", compiled.trace_graph)
    compiled.compile_graph = timed("compile_graph", compiled.compile_graph)
    compiled.CompiledLoss._verified = timed(
        "_verified", compiled.CompiledLoss._verified
    )
    pyro.enable_validation(False)
    torch.manual_seed(args.seed)
    x = common.load_test_images(args.dataset, args.data_dir, args.batch)
    model, guide = paper_architecture(1)
    elbo = IWELBO(args.k, compile=True)
    optim = torch.optim.Adam([*model.parameters(), *guide.parameters()], fused=True)
    start = time.perf_counter()
    with pyro.settings.context(module_local_params=True):
        loss = elbo.differentiable_loss(model, guide, x) / args.batch
    loss.backward()
    optim.step()
    first = time.perf_counter() - start
    if not compiled.compiled_loss(elbo, model, guide).compiled:
        raise RuntimeError("the compiled path fell back to eager")
    return {"first_step_s": first, **{f"{k}_s": v for k, v in seconds.items()}}


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for label in ("cold cache", "warm cache"):
            command = [sys.executable, __file__, "--one-pass", *sys.argv[1:]]
            start = time.perf_counter()
            out = subprocess.run(
                command, env=env, capture_output=True, text=True, check=True
            )
            process = time.perf_counter() - start
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"cache": label, "process_s": process, **result})
    return rows


def report(env: dict, rows: list[dict]) -> str:
    table = common.markdown_table(
        [
            "inductor cache",
            "first step s",
            "tracing s",
            "compiling s",
            "checking s",
            "rest s",
            "process s",
        ],
        [
            [
                r["cache"],
                f"{r['first_step_s']:.2f}",
                f"{r['trace_graph_s']:.2f}",
                f"{r['_compile_s']:.2f}",
                f"{r['_verified_s']:.2f}",
                f"{r['first_step_s'] - sum(r[f'{p}_s'] for p in PARTS):.2f}",
                f"{r['process_s']:.2f}",
            ]
            for r in rows
        ],
    )
    return "\n".join(
        [
            "## Cost of the first compiled step",
            "",
            common.environment_markdown(env),
            "",
            table,
            "",
            "tracing: `trace_graph` (make_fx of loss and backward, fake tensors, "
            "noise lifted); compiling: `compile_graph` (inductor, or its on-disk "
            "cache); checking: the eager loss and gradients and the compiled ones "
            "on the first call; rest: the first step's other work (eager "
            "backward hand-off, Adam). process: the whole child process, "
            "Python and torch start-up and data loading included.",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--one-pass", action="store_true", help=argparse.SUPPRESS)
    common.add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.one_pass:
        print(json.dumps(one_pass(args)))
        return
    env = common.environment(seed=args.seed, k=args.k, batch=args.batch)
    rows = run(args)
    print(report(env, rows))
    if args.json:
        common.write_json(args.json, {"environment": env, "rows": rows})


if __name__ == "__main__":
    main(sys.argv[1:])
