"""Where the first call of the compiled training step spends its time.

``fit --compile`` (``IWELBO(k, compile=True)``) makes each training step one
graph: the loss, its gradients and Adam's update
(:meth:`~pyro_iwae.compiled.CompiledLoss.step`, through
``pyro_iwae.runs.fit_steps.adam_step`` with fit's optimiser). Its first call pays,
once per input shape, for: importing inductor; tracing the Pyro program and its
backward pass into an aten graph (``trace_graph``, fake tensors); compiling that
graph (``compile_graph``: AOT autograd, inductor's lowering and code generation,
the probes of the CPU's vector ISAs, the g++ builds of the C++ kernels, or hits
in inductor's on-disk cache); and checking the step against the eager one
(``_verified_step``). This script times each part for the paper's model, in a
fresh process per pass, with a cold inductor cache (a new, empty folder) and
then warm (the folder the cold pass filled), and prints a Markdown table.
``--path loss`` times ``elbo.differentiable_loss`` (loss and gradients, no
Adam) instead; ``--probe-all-isas`` lets inductor probe every vector ISA, as it
does by default (the library's compile before
:func:`pyro_iwae.compiled.backend.vec_isa_options`); ``--cpp-wrapper`` tries
inductor's C++ wrapper.

    python bench/compile_cost.py --data-dir /work/shared/data --batch 20
    python bench/compile_cost.py --dataset mnist-mini --batch 20 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import common

PARTS = ("trace_graph", "compile_graph", "_verified")
#: Torch's own timers (``torch._dynamo.utils.compilation_time_metrics``) read
#: after the first step: the C++ kernel builds inductor waited for.
TORCH_TIMERS = {"kernel_builds": "async_compile.wait"}


def one_pass(args: argparse.Namespace) -> dict:
    """In this process: the first compiled step, its parts timed."""
    import pyro
    import torch

    import pyro_iwae.compiled.backend as backend
    import pyro_iwae.compiled.loss as compiled
    from pyro_iwae import IWELBO, paper_architecture
    from pyro_iwae.runs.fit_steps import adam_step

    seconds = dict.fromkeys([*PARTS, "isa_probes", "precompiled_header"], 0.0)

    def timed(name, fn):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                seconds[name] += time.perf_counter() - start

        return wrapper

    start = time.perf_counter()
    # Imported here, as the first compile would, to time it apart.
    import torch._inductor.compile_fx
    from torch._dynamo.utils import compilation_time_metrics
    from torch._inductor import codecache, cpu_vec_isa

    inductor_import = time.perf_counter() - start
    compiled.trace_graph = timed("trace_graph", compiled.trace_graph)
    compiled.compile_graph = timed("compile_graph", compiled.compile_graph)
    verify = "_verified_step" if args.path == "step" else "_verified"
    setattr(
        compiled.CompiledLoss,
        verify,
        timed("_verified", getattr(compiled.CompiledLoss, verify)),
    )
    # The probes' wall time: the library's (side by side, in vec_isa_options)
    # and any inductor runs itself, one by one, afterwards.
    options = timed("isa_probes", backend.vec_isa_options)
    in_options = False

    def vec_isa_options():
        nonlocal in_options
        in_options = True
        try:
            return options()
        finally:
            in_options = False

    backend.vec_isa_options = vec_isa_options
    check_build = cpu_vec_isa.VecISA.check_build
    timed_check = timed("isa_probes", check_build)
    cpu_vec_isa.VecISA.check_build = lambda isa, code: (
        check_build(isa, code) if in_options else timed_check(isa, code)
    )
    codecache._precompile_header = timed(
        "precompiled_header", codecache._precompile_header
    )
    if args.probe_all_isas:
        backend.vec_isa_options = dict
    if args.cpp_wrapper:
        isa_options = backend.vec_isa_options
        backend.vec_isa_options = lambda: {**isa_options(), "cpp_wrapper": True}
    pyro.enable_validation(args.validation)
    torch.manual_seed(args.seed)
    x = common.load_test_images(args.dataset, args.data_dir, args.batch)
    model, guide = paper_architecture(args.layers)
    elbo = IWELBO(args.k, compile=True)
    # fit's optimiser (pyro_iwae.runs.training).
    optim = torch.optim.Adam(
        [*model.parameters(), *guide.parameters()],
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-4,
        fused=True,
    )
    start = time.perf_counter()
    if args.path == "step":
        adam_step(elbo, True, model, guide, x, optim)
    else:
        with pyro.settings.context(module_local_params=True):
            loss = elbo.differentiable_loss(model, guide, x) / args.batch
        loss.backward()
        optim.step()
    first = time.perf_counter() - start
    if not compiled.compiled_loss(elbo, model, guide).compiled:
        raise RuntimeError("the compiled path fell back to eager")
    timers = {
        name: sum(compilation_time_metrics.get(key, ()))
        for name, key in TORCH_TIMERS.items()
    }
    return {
        "first_step_s": first,
        "inductor_import_s": inductor_import,
        **{f"{k}_s": v for k, v in seconds.items()},
        **{f"{k}_s": v for k, v in timers.items()},
    }


#: The passes of one repeat, in order: a machine inductor has never compiled on
#: (a new temporary folder: inductor keeps its precompiled header in the
#: temporary folder, whatever ``TORCHINDUCTOR_CACHE_DIR`` says); a new, empty
#: cache folder on it (the header built); that folder again.
PASSES = ("cold machine", "cold cache", "warm cache")


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as root:
            for label in PASSES:
                cache = os.path.join(
                    root, "first" if label == "cold machine" else "second"
                )
                env = {**os.environ, "TMPDIR": root, "TORCHINDUCTOR_CACHE_DIR": cache}
                command = [sys.executable, __file__, "--one-pass", *sys.argv[1:]]
                start = time.perf_counter()
                out = subprocess.run(
                    command, env=env, capture_output=True, text=True, check=True
                )
                process = time.perf_counter() - start
                result = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append({"cache": label, "process_s": process, **result})
    return rows


COLUMNS = {
    "import inductor s": lambda r: r["inductor_import_s"],
    "first step s": lambda r: r["first_step_s"],
    "tracing s": lambda r: r["trace_graph_s"],
    "compiling s": lambda r: r["compile_graph_s"],
    "of which ISA probes s": lambda r: r["isa_probes_s"],
    "of which the precompiled header s": lambda r: r["precompiled_header_s"],
    "of which waiting for g++ s": lambda r: r["kernel_builds_s"],
    "checking s": lambda r: r["_verified_s"],
    "rest s": lambda r: r["first_step_s"] - sum(r[f"{p}_s"] for p in PARTS),
    "process s": lambda r: r["process_s"],
}


def report(env: dict, rows: list[dict]) -> str:
    """Medians over the repeats, cold and warm."""
    lines = []
    for label in PASSES:
        mine = [r for r in rows if r["cache"] == label]
        lines.append(
            [f"{label} (median of {len(mine)})"]
            + [f"{statistics.median(f(r) for r in mine):.2f}" for f in COLUMNS.values()]
        )
    table = common.markdown_table(["inductor cache", *COLUMNS], lines)
    return "\n".join(
        [
            "## Cost of the first compiled step",
            "",
            common.environment_markdown(env),
            "",
            table,
            "",
            "import inductor: before the step, as its first compile would; first "
            "step: the step without that import; tracing: `trace_graph` (make_fx "
            "of loss and backward, and Adam's update with --path step, fake "
            "tensors, noise lifted); compiling: `compile_graph` (AOT autograd and "
            "inductor, or hits in its on-disk cache), of which ISA probes: "
            "inductor's builds and loads of vector-ISA probe libraries (wall "
            "time), the precompiled "
            "header: its build of the header every C++ kernel includes (once "
            "per machine, compiler and flags; kept in the temporary folder), "
            "and "
            "waiting for g++: its wait for the C++ kernel builds "
            "(`async_compile.wait`); checking: the eager step and the compiled "
            "one compared on the first call; rest: the first step's other work. "
            "process: the whole child process, Python and torch start-up and "
            "data loading included.",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--layers", type=int, default=1, help="stochastic layers")
    parser.add_argument(
        "--path",
        choices=("step", "loss"),
        default="step",
        help="step: fit --compile's training step (Adam in the graph); loss: "
        "differentiable_loss and an eager Adam step",
    )
    parser.add_argument(
        "--probe-all-isas",
        action="store_true",
        help="let inductor probe every vector ISA (its default; the library "
        "probes only the one it picks)",
    )
    parser.add_argument(
        "--cpp-wrapper",
        action="store_true",
        help="inductor's C++ wrapper: the kernels built as one library, not one "
        "each (the library keeps the Python wrapper: its step is faster)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="cold/warm pairs")
    parser.add_argument("--one-pass", action="store_true", help=argparse.SUPPRESS)
    common.add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.one_pass:
        print(json.dumps(one_pass(args)))
        return
    env = common.environment(
        seed=args.seed,
        k=args.k,
        batch=args.batch,
        layers=args.layers,
        path=args.path,
        probe_all_isas=args.probe_all_isas,
        cpp_wrapper=args.cpp_wrapper,
    )
    rows = run(args)
    print(report(env, rows))
    if args.json:
        common.write_json(args.json, {"environment": env, "rows": rows})


if __name__ == "__main__":
    main(sys.argv[1:])
