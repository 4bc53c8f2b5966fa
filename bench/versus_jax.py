"""pyro-iwae against its JAX peer, side by side in one run: training step and
log_likelihood, ours and theirs alternated round by round.

The JAX side (``jax_peer.py``) runs in its own environment, as a subprocess of this
script, driven over a line protocol; both sides start from the same initial
weights (pyro-iwae's, sent over) and see the same binarised MNIST test images.
Each round times ``--steps`` steps of every variant of one side, then of the other
(which side goes first alternates); ratios are medians over rounds of the
per-round ratio, so load on a shared machine hits both sides alike.

Ours: ``fit`` (the step ``pyro_iwae.fit`` runs by default: eager
``IWELBO(k).differentiable_loss`` over the batch size, backward,
``Adam(fused=True)``, Pyro's validation off, module-local parameters,
subnormals flushed to zero; ``pyro_iwae.runs.fit_steps.adam_step`` itself),
``fit-compiled`` (the same with ``IWELBO(k, compile=True)``: ``fit --compile``,
whose step is one graph of the scaled loss, its gradients and the Adam update),
``pyro-svi`` (Pyro's own path:
``SVI(model, guide, pyro.optim.Adam, loss=IWELBO(k)).step``), ``pyro-svi-compiled``
(the same with ``IWELBO(k, compile=True)``), ``pyro-svi-joint`` and
``pyro-svi-joint-compiled`` (the same two as docs/source/estimators.md advises:
``pyro_iwae.optim.Adam``, one fused torch Adam for all parameters, and subnormals
flushed; the plain ``pyro-svi`` rows are Pyro's defaults, without flushing) and
``hand`` (bench/handwritten.py, ``Adam(fused=True)``, subnormals flushed).
Theirs: ``numpyro-run`` (NumPyro's fastest path, ``SVI.run``: a jitted
``lax.scan`` of 10 steps per call), ``numpyro-update`` (jitted ``SVI.update``, one
call a step), both with ``RenyiELBO(alpha=0)``, and ``jax-hand`` (hand-written
loss, gradient and Adam in one jitted function).

Outside load: every round reads the machine's busy CPU time (``/proc/stat``)
and our two processes' own CPU time; a round in which other processes kept more
than ``--max-outside`` cores busy is discarded and run again (up to
``--max-rounds``), and the report gives, per cell, the rounds kept and the
outside load they saw. Ratios are to the fastest NumPyro path of the cell.

    python bench/versus_jax.py --jax-python /work/venv-jax/bin/python \\
        --data-dir /work/shared/data
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import numpy as np
import pyro
import pyro.infer
import pyro.optim
import torch
from handwritten import HandIWAE

import pyro_iwae.optim
from pyro_iwae import IWELBO, log_likelihood, paper_architecture
from pyro_iwae.compiled import CompiledLogLikelihood
from pyro_iwae.infer.evaluation import default_chunk_size
from pyro_iwae.runs.allocator import keep_freed_memory
from pyro_iwae.runs.denormals import flush_denormals, flush_denormals_from_start
from pyro_iwae.runs.fit_steps import adam_step

LR = 1e-3
ADAM_EPS = 1e-4
HERE = Path(__file__).resolve().parent
OURS = (
    "fit",
    "fit-compiled",
    "pyro-svi",
    "pyro-svi-compiled",
    "pyro-svi-joint",
    "pyro-svi-joint-compiled",
    "hand",
)
THEIRS = ("numpyro-run", "numpyro-update", "jax-hand")
#: The NumPyro paths; ratios are to the fastest of them in each cell.
NUMPYRO = ("numpyro-run", "numpyro-update")
LL_OURS = ("pyro_iwae", "compiled", "decoder-products")
LL_THEIRS = ("jax-ll",)
#: The estimators among LL_OURS (the rest are reference computations).
LL = ("pyro_iwae", "compiled")


class Peer:
    """The JAX worker, over its stdin and stdout."""

    def __init__(self, python: str, cpus: set[int] | None = None) -> None:
        env = dict(os.environ)
        if cpus is not None:
            # XLA's flag alone still let its thread pool use every core (1.7
            # cores measured on 2); the affinity holds it to ``cpus``. (The
            # "intra_op_parallelism_threads=1" once given here, without a
            # leading "--", was ignored; it is no XLA flag, and with "--" XLA
            # aborts on it.)
            flags = "--xla_cpu_multi_thread_eigen=false"
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
        self.process = subprocess.Popen(
            [python, str(HERE / "jax_peer.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
        )

    def __call__(self, cmd: str, **fields) -> dict:
        self.process.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the JAX worker exited; see its messages above")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"JAX worker: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.process.stdin.close()
            self.process.wait(timeout=30)


def export(hand: HandIWAE, images: torch.Tensor, path: Path) -> None:
    """Weights as ``[in, out]`` arrays named as jax_peer.py names them, and images."""
    arrays = {"x": images.numpy()}
    for prefix, net in (("enc", hand.encoder), ("dec", hand.decoder)):
        linears = [m for m in net if isinstance(m, torch.nn.Linear)]
        for i, layer in enumerate(linears):
            arrays[f"{prefix}{i}_w"] = layer.weight.detach().T.contiguous().numpy()
            arrays[f"{prefix}{i}_b"] = layer.bias.detach().numpy()
    np.savez(path, **arrays)


def check_peer(peer: Peer, init, images, tmp: Path, k: int = 5, batch: int = 20):
    """Hand-written JAX vs PyTorch loss and gradients from the same noise (max
    relative gap), and the mean NumPyro loss per point vs IWELBO's."""
    model, guide = paper_architecture(1)
    model.load_state_dict(init[0])
    guide.load_state_dict(init[1])
    hand = HandIWAE().load_from(model, guide)
    x = images[:batch]
    torch.manual_seed(0)
    eps = torch.randn(k, batch, 50)
    torch.manual_seed(0)
    loss = hand.loss(x, k)
    loss.backward()
    np.savez(tmp / "eps.npz", eps=eps.numpy())
    reply = peer("check", path=str(tmp / "eps.npz"), out=str(tmp / "grads.npz"))
    theirs = np.load(tmp / "grads.npz")
    gaps = [abs(reply["loss"] - loss.item()) / abs(loss.item())]
    for prefix, net in (("enc", hand.encoder), ("dec", hand.decoder)):
        linears = [m for m in net if isinstance(m, torch.nn.Linear)]
        for i, layer in enumerate(linears):
            for name, ours in (("w", layer.weight.grad.T), ("b", layer.bias.grad)):
                other = torch.from_numpy(theirs[f"{prefix}{i}_{name}"])
                scale = ours.abs().max().clamp_min(1e-12)
                gaps.append(((ours - other).abs().max() / scale).item())
    elbo = IWELBO(num_particles=k)
    with torch.no_grad():
        ours = [elbo.loss(model, guide, x) for _ in range(len(reply["numpyro_losses"]))]
    return {
        "hand_max_rel_gap": max(gaps),
        "numpyro_loss_per_point": statistics.mean(reply["numpyro_losses"]) / batch,
        "iwelbo_loss_per_point": statistics.mean(ours) / batch,
        "draws": len(ours),
    }


def make_ours(name: str, x: torch.Tensor, k: int, init):
    """A closure doing a given number of training steps of our variant ``name``
    (fresh weights), and the seconds its set-up took (compilation included)."""
    start = time.perf_counter()
    model, guide = paper_architecture(1)
    model.load_state_dict(init[0])
    guide.load_state_dict(init[1])
    compile = name.endswith("-compiled")
    if name.startswith("pyro-svi"):
        joint = name.startswith("pyro-svi-joint")
        if joint:
            optim = pyro_iwae.optim.Adam({"lr": LR, "eps": ADAM_EPS})
        else:
            optim = pyro.optim.Adam({"lr": LR, "eps": ADAM_EPS})
        elbo = IWELBO(num_particles=k, compile=compile)
        svi = pyro.infer.SVI(model, guide, optim, loss=elbo)
        flush = joint  # Pyro's defaults keep the CPU's mode

        def step() -> None:
            svi.step(x)

    elif name == "hand":
        hand = HandIWAE().load_from(model, guide)
        optim = torch.optim.Adam(hand.parameters(), lr=LR, eps=ADAM_EPS, fused=True)
        flush = True  # as fit (pyro_iwae.runs.denormals) and XLA do

        def step() -> None:
            optim.zero_grad(set_to_none=True)
            hand.loss(x, k).backward()
            optim.step()

    else:
        params = [*model.parameters(), *guide.parameters()]
        optim = torch.optim.Adam(params, lr=LR, eps=ADAM_EPS, fused=True)
        elbo = IWELBO(num_particles=k, compile=compile)
        flush = True

        def step() -> None:
            # fit's own step under fit's settings (compiled: one graph of the
            # scaled loss, its gradients and the Adam update).
            with pyro.settings.context(module_local_params=True):
                adam_step(elbo, True, model, guide, x, optim)

    run = repeating(step, flush)
    run(1)  # compiles the compiled variants
    if compile:
        from pyro_iwae.compiled import compiled_loss

        if not compiled_loss(elbo, model, guide).compiled:
            raise RuntimeError(f"{name}: the compiled path fell back to eager")
    return run, time.perf_counter() - start


def decoder_products(hand: HandIWAE, rows: int, chunks: int):
    """The decoder's three matrix products alone (no tanh, no log-density, no
    noise), ``chunks`` times on ``rows`` rows: the most GFLOP/s the decoder can
    reach in log_likelihood with these products."""
    layers = [m for m in hand.decoder if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(rows, m.in_features) for m in layers]

    def run() -> None:
        with torch.no_grad():
            for _ in range(chunks):
                for layer, a in zip(layers, inputs, strict=True):
                    torch.addmm(layer.bias, a, layer.weight.t())

    return run


def repeating(fn, flush: bool = False):
    """``fn`` as ``time_ours`` takes it: called ``steps`` times by ``run(steps)``;
    ``flush``: with the calling thread flushing subnormals, its mode set once a
    round as fit sets it once a run (set every step, its probe cost ~0.02 ms)."""

    def run(steps: int) -> None:
        with flush_denormals(flush):
            for _ in range(steps):
                fn()

    return run


def time_ours(run, steps: int) -> tuple[float, float]:
    """Seconds per step (the mean over ``steps``; ``run(steps)`` runs them) and
    the CPU seconds they took."""
    cpu = time.process_time()
    start = time.perf_counter()
    run(steps)
    wall = time.perf_counter() - start
    return wall / steps, time.process_time() - cpu


def alternate(
    ours: dict,
    peer: Peer,
    theirs,
    rounds: int,
    warmup: int,
    steps: int,
    max_outside: float = float("inf"),
    max_rounds: int | None = None,
):
    """Seconds per step of every variant, round by round, the sides alternating;
    and the outside load of each round (cores other processes kept busy).

    Rounds with more than ``max_outside`` cores of outside load are dropped and
    run again, up to ``max_rounds`` rounds in all; if too few are clean by then,
    the least disturbed of the dropped ones make up the number. Returns
    ``(times, kept rounds' loads, dropped rounds' loads)``.
    """
    meter = common.CpuMeter()
    max_rounds = max(rounds, max_rounds or 3 * rounds)
    kept: list[tuple[float, dict]] = []  # (outside cores, {variant: seconds})
    dropped: list[tuple[float, dict]] = []
    for round_ in range(warmup + max_rounds):
        sides = ["ours", "theirs"] if round_ % 2 == 0 else ["theirs", "ours"]
        measured, own_cpu = {}, 0.0
        mark = meter.mark()
        for side in sides:
            if side == "ours":
                for name, fn in ours.items():
                    measured[name], cpu = time_ours(fn, steps)
                    own_cpu += cpu
            else:
                for name in theirs:
                    reply = peer("time", variant=name, steps=steps)
                    measured[name] = statistics.mean(reply["times_s"])
                    own_cpu += reply["cpu_s"]
        outside = meter.outside_cores(mark, meter.mark(), own_cpu)
        if round_ < warmup:
            continue
        (kept if outside <= max_outside else dropped).append((outside, measured))
        if len(kept) >= rounds:
            break
    if len(kept) < rounds:
        dropped.sort(key=lambda r: r[0])
        short = rounds - len(kept)
        kept, dropped = kept + dropped[:short], dropped[short:]
    times = {name: [m[name] for _, m in kept] for name in [*ours, *theirs]}
    return times, [load for load, _ in kept], [load for load, _ in dropped]


def ratio(times: dict, a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def fastest(times: dict, names) -> str:
    """The one of ``names`` with the lowest median time."""
    present = [n for n in names if n in times]
    return min(present, key=lambda n: statistics.median(times[n]))


def summarise(times: dict, **config) -> list[dict]:
    rows = []
    refs = {"jax-hand": "jax-hand", "jax-ll": "jax-ll"}
    if any(n in times for n in NUMPYRO):
        refs["numpyro"] = fastest(times, NUMPYRO)
    for name, seconds in times.items():
        q1, median, q3 = common.quartiles(seconds)
        row = {**config, "variant": name, "median_s": median, "q1_s": q1, "q3_s": q3}
        for key, ref in refs.items():
            if ref in times:
                row[f"vs_{key}"] = ratio(times, name, ref)
        if "numpyro" in refs:
            row["fastest_numpyro"] = refs["numpyro"]
        row["times_s"] = seconds
        rows.append(row)
    return rows


def run(args: argparse.Namespace, peer: Peer, tmp: Path) -> dict:
    pyro.enable_validation(args.validation)
    torch.manual_seed(args.seed)
    n_images = max([*args.batch, args.ll_images])
    images = common.load_test_images(args.dataset, args.data_dir, n_images)
    model, guide = paper_architecture(1)
    init = (model.state_dict(), guide.state_dict())
    hand = HandIWAE().load_from(model, guide)
    export(hand, images, tmp / "init.npz")
    peer("load", path=str(tmp / "init.npz"))
    out = {
        "check": check_peer(peer, init, images, tmp),
        "train": [],
        "ll": [],
        "load": {},
    }
    setup = {}
    for batch, k in itertools.product(args.batch, args.k) if args.train else ():
        x = images[:batch]
        ours, seconds = {}, {}
        for name in args.ours:
            torch.manual_seed(args.seed)
            ours[name], seconds[name] = make_ours(name, x, k, init)
        reply = peer("train", batch=batch, k=k, seed=args.seed)
        seconds["jax (both)"] = reply["compile_and_warmup_s"]
        setup[f"batch {batch}, k {k}"] = seconds
        times, loads, dropped = alternate(
            ours,
            peer,
            args.theirs,
            args.repeats,
            args.warmup,
            args.steps,
            args.max_outside,
            args.max_rounds,
        )
        out["train"] += summarise(times, batch=batch, k=k)
        out["load"][f"batch {batch}, k {k}"] = {"kept": loads, "dropped": dropped}
    if args.ll_images:
        x = images[: args.ll_images]
        chunk = args.ll_chunk or default_chunk_size(model, guide, x)
        compiled = CompiledLogLikelihood(model, guide)
        start = time.perf_counter()
        compiled(x, num_samples=args.ll_k, chunk_size=chunk)
        setup["log_likelihood"] = {"compiled": time.perf_counter() - start}
        estimators = {
            "pyro_iwae": lambda: log_likelihood(
                model, guide, x, num_samples=args.ll_k, chunk_size=args.ll_chunk
            ),
            "compiled": lambda: compiled(x, num_samples=args.ll_k, chunk_size=chunk),
            "decoder-products": decoder_products(
                hand, chunk * len(x), -(-args.ll_k // chunk)
            ),
        }
        reply = peer(
            "ll", images=args.ll_images, num_samples=args.ll_k, chunk=args.jax_chunk
        )
        setup["log_likelihood"]["jax-ll"] = reply["compile_and_first_s"]
        ours = {name: repeating(estimators[name]) for name in LL_OURS}
        means = {
            name: estimators[name]().mean().item() for name in LL_OURS if name in LL
        }
        means["jax-ll"] = statistics.mean(reply["estimates"])
        out["ll_decoder_gflop"] = hand.decoder_flops(len(x) * args.ll_k, False) / 1e9
        before = common.matmul_peak(repeats=30)
        times, loads, dropped = alternate(
            ours, peer, LL_THEIRS, args.ll_repeats, 0, 1, args.max_outside
        )
        out["load"]["log_likelihood"] = {"kept": loads, "dropped": dropped}
        # The machine's speed drifts: the better of two measurements is the peak.
        after = common.matmul_peak(repeats=30)
        out["matmul"] = max(before, after, key=lambda m: m["peak_gflops"])
        out["jax_matmul"] = peer("matmul", size=out["matmul"]["size"], repeats=30)
        out["ll"] = summarise(
            times, images=args.ll_images, num_samples=args.ll_k, chunk=chunk
        )
        out["ll_mean_estimates"] = means
    out["setup_s"] = setup
    out["max_outside"] = args.max_outside
    return out


def report(env: dict, out: dict) -> str:
    check = out["check"]
    lines = [
        "## pyro-iwae vs JAX / NumPyro",
        "",
        common.environment_markdown(env),
        "- same noise, hand-written JAX vs hand-written PyTorch (k 5, batch 20): max "
        f"relative gap in loss and gradients {check['hand_max_rel_gap']:.1e}",
        f"- mean loss per point over {check['draws']} draws at the initial weights: "
        f"NumPyro RenyiELBO(alpha=0) {check['numpyro_loss_per_point']:.3f}, IWELBO "
        f"{check['iwelbo_loss_per_point']:.3f} (k 5, batch 20)",
        "- set-up seconds (tracing, compiling, warm-up): "
        + "; ".join(
            f"{where}: "
            + ", ".join(f"{name} {seconds:.1f}" for name, seconds in parts.items())
            for where, parts in out["setup_s"].items()
        ),
    ]
    limit = out.get("max_outside")
    lines.append(
        "- outside load (cores other processes kept busy, from /proc/stat less "
        "our two processes' CPU time), per cell: median of the rounds kept "
        f"[max], rounds kept, rounds dropped (over {limit} cores): "
        + "; ".join(
            f"{cell}: {load_summary(loads)}" for cell, loads in out["load"].items()
        )
    )
    rows = [
        [
            r["batch"],
            r["k"],
            r["variant"],
            f"{1e3 * r['median_s']:.2f}",
            f"{1e3 * r['q1_s']:.2f}–{1e3 * r['q3_s']:.2f}",
            f"{r['vs_numpyro']:.3f}" if "vs_numpyro" in r else "—",
            r.get("fastest_numpyro", "—"),
            f"{r['vs_jax-hand']:.3f}" if "vs_jax-hand" in r else "—",
        ]
        for r in out["train"]
    ]
    if rows:
        lines += ["", "### Training step", ""]
        headers = ["batch", "k", "variant", "median ms", "IQR ms"]
        lines.append(
            common.markdown_table(
                [*headers, "/ fastest NumPyro", "(which)", "/ jax-hand"], rows
            )
        )
    if out["ll"]:
        peak = out["matmul"]["peak_gflops"]
        gflop = out["ll_decoder_gflop"]
        mean = out["ll_mean_estimates"]
        rows = [
            [
                r["images"],
                r["num_samples"],
                r["variant"],
                r["chunk"] if r["variant"] != "jax-ll" else env["jax_chunk"],
                f"{r['median_s']:.3f}",
                f"{r['q1_s']:.3f}–{r['q3_s']:.3f}",
                f"{r['vs_jax-ll']:.3f}",
                f"{gflop / r['median_s']:.1f}",
                f"{100 * gflop / r['median_s'] / peak:.0f}%",
                f"{mean[r['variant']]:.2f}" if r["variant"] in mean else "—",
            ]
            for r in out["ll"]
        ]
        lines += [
            "",
            "### log_likelihood",
            "",
            common.markdown_table(
                [
                    "images",
                    "K",
                    "variant",
                    "chunk",
                    "median s",
                    "IQR s",
                    "/ jax-ll",
                    "decoder GFLOP/s",
                    "of peak",
                    "mean log p(x)",
                ],
                rows,
            ),
            "",
            f"Decoder GFLOP/s: the decoder's {gflop:.0f} GFLOP of matrix products "
            "(forward) over the whole estimate's time; peak: "
            f"{peak:.1f} GFLOP/s, the best of 30 `torch.mm` "
            f"{out['matmul']['size']}^2, before the rounds and after (median "
            f"{out['matmul']['median_gflops']:.1f}); JAX's jitted `a @ b` of "
            f"the same size: {out['jax_matmul']['peak_gflops']:.1f} GFLOP/s best "
            f"of 30 (median {out['jax_matmul']['median_gflops']:.1f}). "
            "`decoder-products` runs "
            "those products alone (`addmm` on the same rows, nothing else): the "
            "ceiling of that figure with these products.",
        ]
    targets = [
        (
            f"training step ({r['variant']}), batch {r['batch']}, k {r['k']}",
            r["vs_numpyro"],
        )
        for r in out["train"]
        if r["variant"] in ("fit", "fit-compiled") and "vs_numpyro" in r
    ] + [
        (f"log_likelihood, K {r['num_samples']}", r["vs_jax-ll"])
        for r in out["ll"]
        if r["variant"] == "compiled"
    ]
    gemm_targets = [
        (
            f"decoder GFLOP/s in compiled log_likelihood, K {r['num_samples']}",
            out["ll_decoder_gflop"] / r["median_s"] / out["matmul"]["peak_gflops"],
        )
        for r in out["ll"]
        if r["variant"] == "compiled"
    ]
    lines += [
        "",
        "Ratios are medians over rounds of the per-round ratio (the two sides "
        "alternate round by round) to the NumPyro path with the lower median in "
        "that cell; times are per step (per estimate of all images for "
        "log_likelihood); rounds with more outside load than the limit were "
        "dropped and run again.",
        "",
        "Targets (pyro-iwae's fit step, default and compiled / the fastest NumPyro "
        "path, or compiled / jitted JAX log_likelihood, <= 1.00):",
        "",
    ]
    lines += [
        f"- {what}: {value:.3f} ({'met' if value <= 1.0 else 'NOT met'})"
        for what, value in targets
    ]
    lines += [
        f"- {what}: {100 * share:.0f}% of peak, target >= 60% "
        f"({'met' if share >= 0.6 else 'NOT met'})"
        for what, share in gemm_targets
    ]
    return "\n".join(lines)


def load_summary(loads: dict) -> str:
    kept, dropped = loads["kept"], loads["dropped"]
    if not kept:
        return "no rounds"
    return (
        f"{statistics.median(kept):.2f} [{max(kept):.2f}], {len(kept)} kept, "
        f"{len(dropped)} dropped"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--jax-python",
        default=os.environ.get("JAX_PYTHON", "/work/venv-jax/bin/python"),
        help="python of the environment with jax and numpyro (default: $JAX_PYTHON "
        "or /work/venv-jax/bin/python)",
    )
    parser.add_argument("--k", type=int, nargs="+", default=[5, 50])
    parser.add_argument("--batch", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--ours", nargs="+", default=list(OURS), choices=OURS)
    parser.add_argument("--theirs", nargs="+", default=list(THEIRS), choices=THEIRS)
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds")
    parser.add_argument(
        "--steps",
        type=int,
        default=10,
        help="steps per round (numpyro-run: one call of 10 steps per 10)",
    )
    parser.add_argument(
        "--max-outside",
        type=float,
        default=0.3,
        help="drop a round in which other processes kept more than this many "
        "cores busy (default 0.3)",
    )
    parser.add_argument(
        "--max-rounds",
        type=int,
        default=None,
        help="give up replacing dropped rounds after this many (default: 3 x "
        "--repeats); the least disturbed then make up the number",
    )
    parser.add_argument(
        "--no-train",
        dest="train",
        action="store_false",
        help="skip the training steps (log_likelihood only)",
    )
    parser.add_argument(
        "--ll-images", type=int, default=100, help="0 skips log_likelihood"
    )
    parser.add_argument("--ll-k", type=int, default=5000)
    parser.add_argument(
        "--ll-chunk",
        type=int,
        default=None,
        help="our chunk size (default: pyro_iwae's default_chunk_size)",
    )
    parser.add_argument("--jax-chunk", type=int, default=100)
    parser.add_argument("--ll-repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        choices=[1],
        default=None,
        help="1: one core on each side (both processes pinned to the same CPU "
        "with sched_setaffinity; torch.set_num_threads(1); XLA without its "
        "multi-threaded Eigen); default: each side's own default (all cores)",
    )
    common.add_common_arguments(parser)
    parser.add_argument(
        "--no-flush-at-start",
        dest="flush_at_start",
        action="store_false",
        help="do not flush subnormals from the start of the process (by default "
        "torch's worker threads flush them, as under pyro-iwae fit; the rows "
        "that do not flush keep their calling thread's mode)",
    )
    parser.add_argument(
        "--glibc-defaults",
        dest="keep_freed_memory",
        action="store_false",
        help="leave glibc malloc's thresholds at their defaults (by default this "
        "process keeps freed memory for reuse, as the pyro-iwae command does: "
        "pyro_iwae.runs.allocator; the JAX peer keeps its own defaults)",
    )
    args = parser.parse_args(argv)
    if args.keep_freed_memory:
        keep_freed_memory()
    if args.flush_at_start:
        # Before torch's thread pool starts, as pyro-iwae fit does.
        flush_denormals_from_start()
        torch.set_flush_denormal(False)  # each row sets its own thread's mode
    cpus = None
    if args.threads:
        cpus = {min(os.sched_getaffinity(0))}
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        peer = Peer(args.jax_python, cpus)
        try:
            versions = peer("hello")
            env = common.environment(
                seed=args.seed,
                jax=versions["jax"],
                jaxlib=versions["jaxlib"],
                numpyro=versions["numpyro"],
                jax_devices=", ".join(versions["devices"]),
                pyro_validation="on" if args.validation else "off",
                repeats=args.repeats,
                warmup=args.warmup,
                steps_per_round=args.steps,
                jax_chunk=args.jax_chunk,
                ll_repeats=args.ll_repeats,
                parts="train, log_likelihood" if args.train else "log_likelihood",
                torch_malloc=(
                    "freed memory kept (pyro_iwae.runs.allocator)"
                    if args.keep_freed_memory
                    else "glibc defaults"
                ),
                cores=(
                    f"one, CPU {min(cpus)} for both sides (sched_setaffinity)"
                    if cpus
                    else "all, each side's default threads"
                ),
            )
            out = run(args, peer, Path(tmp))
        finally:
            peer.close()
    print(report(env, out))
    if args.json:
        common.write_json(args.json, {"environment": env, **out})


if __name__ == "__main__":
    main(sys.argv[1:])
