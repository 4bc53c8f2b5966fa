"""Time one IWAE training step: IWELBO, Pyro's RenyiELBO and hand-written PyTorch.

Every variant trains the paper's one-layer architecture (q 784-200-200-50,
p 50-200-200-784 Bernoulli, tanh) from the same initial weights on the same fixed
batch of binarised MNIST test images, with one ``torch.optim.Adam`` over model and
guide parameters. A step is: zero the gradients, compute the objective, backward,
Adam step. Variants are interleaved (A B C ... A B C ..., the order rotated every
round) after a warm-up, so that load on a shared machine hits all of them alike;
ratios are medians over rounds of the per-round ratio to the hand-written floor.

    python bench/train_step.py --data-dir /work/shared/data
    python bench/train_step.py --dataset mnist-mini --repeats 3 --k 5 --batch 20
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from collections.abc import Callable
from functools import partial

import pyro
import torch
from common import (
    add_common_arguments,
    environment,
    environment_markdown,
    load_test_images,
    markdown_table,
    matmul_peak,
    quartiles,
    timed,
    write_json,
)
from handwritten import HandIWAE, HandIWAEDistributions

from pyro_iwae import IWELBO, paper_architecture

LR = 1e-3
ADAM_EPS = 1e-4  # the paper's
#: Target ratios of IWELBO(iwae) to the hand-written floor at batch 100, by k.
TARGETS = {5: 1.10, 50: 1.05}


#: Variants: name -> (implementation, estimator); the "hand-" ones are the floors.
VARIANTS = {
    "hand-iwae": ("hand", "iwae"),
    "iwelbo-iwae": ("IWELBO", "iwae"),
    "renyi": ("RenyiELBO", "iwae"),
    "hand-stl": ("hand", "stl"),
    "iwelbo-stl": ("IWELBO", "stl"),
    "hand-dreg": ("hand", "dreg"),
    "iwelbo-dreg": ("IWELBO", "dreg"),
    # Diagnostics: the hand-written step with torch.distributions log-probs; IWELBO
    # with the networks registering their parameters in Pyro's global store on
    # every call (the SVI path; pyro-iwae's trainer, like the "iwelbo-" variants,
    # runs under module_local_params and skips it).
    "hand-dist": ("hand-dist", "iwae"),
    "iwelbo-global": ("IWELBO-global", "iwae"),
}
DEFAULT_VARIANTS = list(VARIANTS)[:7]


def floor_of(name: str) -> str:
    """The hand-written variant with the same gradient estimator."""
    return "hand-" + VARIANTS[name][1]


#: ``torch.optim.Adam`` keyword arguments selected by ``--adam``.
ADAM_IMPLEMENTATIONS = {
    "default": {},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}


def make_step(
    name: str,
    x: torch.Tensor,
    k: int,
    init: tuple[dict, dict],
    adam: str = "default",
) -> Callable[[], None]:
    """A closure doing one training step of variant ``name``, on fresh weights,
    on the device of ``x``."""
    kind, estimator = VARIANTS[name]
    model, guide = paper_architecture(1)
    model.to(x.device), guide.to(x.device)
    model.load_state_dict(init[0])
    guide.load_state_dict(init[1])
    params = [*model.parameters(), *guide.parameters()]
    if kind.startswith("hand"):
        hand = (HandIWAE if kind == "hand" else HandIWAEDistributions)().to(x.device)
        hand.load_from(model, guide)
        params = list(hand.parameters())
        loss = partial(hand.loss, x, k, estimator)
    elif kind.startswith("IWELBO"):
        elbo_module = IWELBO(num_particles=k, estimator=estimator)(model, guide)
        local = kind == "IWELBO"

        def loss() -> torch.Tensor:
            with pyro.settings.context(module_local_params=local):
                return elbo_module(x)

    else:
        elbo = pyro.infer.RenyiELBO(
            alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1
        )
        loss = None
    optim = torch.optim.Adam(params, lr=LR, eps=ADAM_EPS, **ADAM_IMPLEMENTATIONS[adam])

    def step() -> None:
        optim.zero_grad()
        if loss is None:
            elbo.loss_and_grads(model, guide, x)  # calls backward itself
        else:
            loss().backward()
        optim.step()

    return step


def check_floor(x: torch.Tensor, init: tuple[dict, dict], k: int = 5) -> float:
    """Largest relative gap between the hand-written and IWELBO losses and gradients.

    Both draw their particles from the same seed, so they see the same noise; the
    hand-written loss is a mean over the batch, IWELBO's a sum.
    """
    worst = 0.0
    for estimator in ("iwae", "stl", "dreg"):
        model, guide = paper_architecture(1)
        model.load_state_dict(init[0])
        guide.load_state_dict(init[1])
        model.to(x.device), guide.to(x.device)
        hand = HandIWAE().to(x.device).load_from(model, guide)
        torch.manual_seed(0)
        ours = IWELBO(num_particles=k, estimator=estimator)(model, guide)(x)
        ours = ours / x.shape[0]
        ours.backward()
        torch.manual_seed(0)
        theirs = hand.loss(x, k, estimator)
        theirs.backward()
        ours_grads = itertools.chain(guide.parameters(), model.parameters())
        pairs = zip(
            [ours, *(p.grad for p in ours_grads)],
            [theirs, *(p.grad for p in hand.parameters())],
            strict=True,
        )
        for a, b in pairs:
            gap = (a - b).detach().abs().max() / b.abs().max().clamp_min(1e-12)
            worst = max(worst, gap.item())
    return worst


def run(args: argparse.Namespace) -> dict:
    pyro.enable_validation(args.validation)
    torch.manual_seed(args.seed)
    images = load_test_images(args.dataset, args.data_dir, max(args.batch))
    images = images.to(args.device)
    model, guide = paper_architecture(1)
    init = (model.state_dict(), guide.state_dict())
    hand = HandIWAE()
    peak = matmul_peak(args.matmul_size, device=args.device)
    check = check_floor(images[: min(args.batch)], init)
    results = []
    for batch, k in itertools.product(args.batch, args.k):
        x = images[:batch]
        pyro.clear_param_store()
        torch.manual_seed(args.seed)
        steps = {name: make_step(name, x, k, init, args.adam) for name in args.variants}
        times = {name: [] for name in steps}
        names = list(steps)
        for round_ in range(args.warmup + args.repeats):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                seconds = timed(steps[name])
                if round_ >= args.warmup:
                    times[name].append(seconds)
        flops = hand.decoder_flops(k * batch)
        for name in names:
            q1, median, q3 = quartiles(times[name])
            row = {
                "batch": batch,
                "k": k,
                "variant": name,
                "median_ms": 1e3 * median,
                "q1_ms": 1e3 * q1,
                "q3_ms": 1e3 * q3,
                "decoder_gflops": flops / median / 1e9,
                "times_s": times[name],
            }
            for key, floor in (
                ("vs_hand_iwae", "hand-iwae"),
                ("vs_hand", floor_of(name)),
            ):
                if floor in times:
                    row[key] = statistics.median(
                        t / f for t, f in zip(times[name], times[floor], strict=True)
                    )
            results.append(row)
    return {"matmul": peak, "floor_check_max_rel_gap": check, "results": results}


def report(env: dict, out: dict) -> str:
    peak = out["matmul"]["peak_gflops"]
    rows = [
        [
            r["batch"],
            r["k"],
            r["variant"],
            f"{r['median_ms']:.2f}",
            f"{r['q1_ms']:.2f}–{r['q3_ms']:.2f}",
            f"{r['vs_hand_iwae']:.3f}" if "vs_hand_iwae" in r else "",
            f"{r['vs_hand']:.3f}" if "vs_hand" in r else "",
            f"{r['decoder_gflops']:.1f}",
            f"{100 * r['decoder_gflops'] / peak:.0f}%",
        ]
        for r in out["results"]
    ]
    table = markdown_table(
        [
            "batch",
            "k",
            "variant",
            "median ms",
            "IQR ms",
            "/ hand iwae",
            "/ hand same est.",
            "decoder GFLOP/s",
            "of peak",
        ],
        rows,
    )
    lines = [
        "## Training step",
        "",
        environment_markdown(env),
        f"- matmul peak: {peak:.1f} GFLOP/s (best of torch.mm "
        f"{out['matmul']['size']}x{out['matmul']['size']} float32; median "
        f"{out['matmul']['median_gflops']:.1f})",
        "- hand-written floor vs IWELBO, same seed: max relative gap in loss and "
        f"gradients {out['floor_check_max_rel_gap']:.1e}",
        "",
        table,
        "",
        "Ratios are medians over rounds of the per-round ratio (variants are "
        "interleaved); decoder GFLOP/s counts the decoder's matmuls, forward and "
        "backward, over the whole step time.",
    ]
    targets = [
        (r["k"], r["vs_hand"], TARGETS[r["k"]])
        for r in out["results"]
        if r["variant"] == "iwelbo-iwae" and r["batch"] == 100 and r["k"] in TARGETS
    ]
    if targets:
        lines += ["", "Targets (batch 100, IWELBO iwae / hand iwae):", ""]
        lines += [
            f"- k = {k}: {ratio:.3f} (target <= {target:.2f}: "
            f"{'met' if ratio <= target else 'NOT met'})"
            for k, ratio, target in targets
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 5, 50])
    parser.add_argument("--batch", type=int, nargs="+", default=[100, 20])
    parser.add_argument("--repeats", type=int, default=40, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds")
    parser.add_argument(
        "--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS)
    )
    parser.add_argument(
        "--adam",
        choices=list(ADAM_IMPLEMENTATIONS),
        default="default",
        help="torch.optim.Adam implementation, the same for every variant",
    )
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument(
        "--device", default="cpu", help="where to train: cpu, or cuda on a GPU"
    )
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    env = environment(
        seed=args.seed,
        pyro_validation="on" if args.validation else "off",
        repeats=args.repeats,
        warmup=args.warmup,
        adam=args.adam,
        device=args.device,
    )
    out = run(args)
    print(report(env, out))
    if args.json:
        write_json(args.json, {"environment": env, **out})


if __name__ == "__main__":
    main(sys.argv[1:])
