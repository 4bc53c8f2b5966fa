"""A small deep Markov model (Krishnan et al. 2017) on synthetic binary
sequences, trained under IWELBO with KL annealing.

    z_t | z_{t-1} ~ N(f(z_{t-1}), g(z_{t-1}))      (transition network)
    x_t | z_t ~ Bernoulli(e(z_t))                  (emission network)
    q(z_t | z_{t-1}, x_{t..T})                     (a GRU run backwards in time)

The time steps are a ``pyro.markov`` loop inside the data plate of sequences.
KL annealing wraps the latent sites (in model and guide) in
``poutine.scale(scale=beta)``: IWELBO then multiplies each z_t's log p - log q
inside the log-weight by beta, a temperature; beta rises from --min-beta to 1
over the first --anneal-steps steps. The value is a bound on log p(x) only at
beta = 1, which is how the test bound is evaluated.

The data: a 2-D latent state that turns by a fixed angle each step, with noise,
seen through a fixed random map as 12 binary channels.

Real budget (2,000 sequences of 20 steps; it prints the time it took):

    python examples/dmm.py --num-sequences 2000 --length 20 --steps 3000

Expect the test bound (k = 5, beta = 1) to rise from about -173 nats per
sequence to about -94 (most of it in the first 1,000 steps, while beta rises),
with log p(x) estimated with 500 particles a few tenths of a nat above it.

Tiny budget (a few seconds):

    python examples/dmm.py --smoke
"""

from __future__ import annotations

import argparse
import math
import time

import pyro
import pyro.distributions as dist
import torch
from example_options import count, parse_with_smoke, positive
from pyro import poutine
from pyro.infer import SVI
from pyro.optim import ClippedAdam
from torch import nn

from pyro_iwae import IWELBO, log_likelihood

OBS_DIM, STATE_DIM = 12, 2


#: What --smoke changes: the defaults of a tiny budget.
SMOKE = {
    "num_sequences": 100,
    "length": 6,
    "steps": 80,
    "anneal_steps": 40,
    "hidden_dim": 16,
    "eval_particles": 50,
    "batch_size": 25,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-sequences", type=count, default=2000)
    parser.add_argument("--length", type=count, default=20)
    parser.add_argument("--steps", type=count, default=3000)
    parser.add_argument("--batch-size", type=count, default=50)
    parser.add_argument("--num-particles", type=count, default=5)
    parser.add_argument("--estimator", default="dreg", choices=["iwae", "stl", "dreg"])
    parser.add_argument("--latent-dim", type=count, default=4)
    parser.add_argument("--hidden-dim", type=count, default=32)
    parser.add_argument("--min-beta", type=float, default=0.2)
    parser.add_argument("--anneal-steps", type=count, default=1000)
    parser.add_argument("--lr", type=positive, default=3e-3)
    parser.add_argument("--eval-particles", type=count, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny budget: 100 sequences of 6 steps, 80 training steps",
    )
    args = parse_with_smoke(parser, argv, SMOKE)
    if not 0 < args.min_beta <= 1:
        parser.error(f"argument --min-beta: {args.min_beta} is not in (0, 1]")
    return args


def make_sequences(n: int, length: int, seed: int) -> torch.Tensor:
    """Binary sequences ``[n, length, OBS_DIM]``."""
    g = torch.Generator().manual_seed(seed)
    angle = 2 * math.pi / 8
    turn = torch.tensor(
        [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    )
    emission = 2.5 * torch.randn(STATE_DIM, OBS_DIM, generator=g)
    state = torch.randn(n, STATE_DIM, generator=g)
    steps = []
    for _ in range(length):
        state = state @ turn.T + 0.2 * torch.randn(n, STATE_DIM, generator=g)
        steps.append(torch.bernoulli(torch.sigmoid(state @ emission), generator=g))
    return torch.stack(steps, 1)


def concat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` and ``b`` joined along the last dim, their other dims broadcast (a
    latent ``[k, batch, d]`` meets the guide's RNN state ``[batch, h]``)."""
    shape = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat(
        [a.expand(shape + a.shape[-1:]), b.expand(shape + b.shape[-1:])], -1
    )


class GaussianNet(nn.Module):
    """An MLP giving the mean and standard deviation of a diagonal Gaussian."""

    def __init__(self, n_in: int, hidden: int, n_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, 2 * n_out)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw = self.net(x).chunk(2, -1)
        return loc, nn.functional.softplus(raw) + 1e-3


class Model(nn.Module):
    """p(z_1..T, x_1..T): ``seqs`` is ``[batch, T, OBS_DIM]``, ``beta`` the
    annealing factor of the latent sites."""

    def __init__(self, latent_dim: int, hidden: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.transition = GaussianNet(latent_dim, hidden, latent_dim)
        self.emitter = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.Tanh(), nn.Linear(hidden, OBS_DIM)
        )
        self.z_0 = nn.Parameter(torch.zeros(latent_dim))

    def forward(self, seqs: torch.Tensor, beta: float = 1.0) -> None:
        pyro.module("model", self)
        z = self.z_0.expand(seqs.shape[0], self.latent_dim)
        with pyro.plate("data", seqs.shape[0]):
            for t in pyro.markov(range(seqs.shape[1])):
                loc, scale = self.transition(z)
                with poutine.scale(scale=beta):
                    z = pyro.sample(f"z_{t + 1}", dist.Normal(loc, scale).to_event(1))
                logits = self.emitter(z)
                pyro.sample(
                    f"x_{t + 1}",
                    dist.Bernoulli(logits=logits).to_event(1),
                    obs=seqs[:, t],
                )


class Guide(nn.Module):
    """q(z_1..T | x_1..T), arguments as :class:`Model`. A module rather than a
    function: DReG re-runs it with its parameters held constant, which it can
    do for an ``nn.Module`` guide with several latent sites."""

    def __init__(self, latent_dim: int, hidden: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.rnn = nn.GRU(OBS_DIM, hidden, batch_first=True)
        self.combiner = GaussianNet(latent_dim + hidden, hidden, latent_dim)
        self.z_0 = nn.Parameter(torch.zeros(latent_dim))

    def forward(self, seqs: torch.Tensor, beta: float = 1.0) -> None:
        pyro.module("guide", self)
        # The GRU runs from the end, so that its state at t summarises x_t..x_T.
        hidden = self.rnn(seqs.flip(1))[0].flip(1)
        z = self.z_0.expand(seqs.shape[0], self.latent_dim)
        with pyro.plate("data", seqs.shape[0]):
            for t in pyro.markov(range(seqs.shape[1])):
                loc, scale = self.combiner(concat(z, hidden[:, t]))
                with poutine.scale(scale=beta):
                    z = pyro.sample(f"z_{t + 1}", dist.Normal(loc, scale).to_event(1))


def main(argv: list[str] | None = None) -> dict:
    """Trains with annealing; returns the test bound per sequence (beta = 1)
    before and after, the estimated test log p(x), and the betas used."""
    args = parse_args(argv)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    seqs = make_sequences(args.num_sequences, args.length, args.seed)
    n_test = max(1, args.num_sequences // 10)
    train, test = seqs[n_test:], seqs[:n_test]
    model = Model(args.latent_dim, args.hidden_dim)
    guide = Guide(args.latent_dim, args.hidden_dim)
    objective = IWELBO(num_particles=args.num_particles, estimator=args.estimator)
    svi = SVI(
        model,
        guide,
        ClippedAdam({"lr": args.lr, "clip_norm": 10.0}),
        loss=objective,
    )
    evaluation = IWELBO(num_particles=args.num_particles)

    def test_bound() -> float:
        return -evaluation.loss(model, guide, test) / len(test)

    before = test_bound()
    print(f"test bound before training: {before:.2f} nats per sequence")
    betas = []
    generator = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        beta = min(1.0, args.min_beta + (1 - args.min_beta) * step / args.anneal_steps)
        idx = torch.randint(len(train), (args.batch_size,), generator=generator)
        loss = svi.step(train[idx], beta)
        betas.append(beta)
        if (step + 1) % max(1, args.steps // 5) == 0:
            print(
                f"step {step + 1}: beta {beta:.2f}, loss {loss / args.batch_size:.2f}, "
                f"test bound {test_bound():.2f}"
            )
    after = test_bound()
    log_px = (
        log_likelihood(model, guide, test, num_samples=args.eval_particles)
        .mean()
        .item()
    )
    print(
        f"test bound (k = {args.num_particles}): {before:.2f} -> {after:.2f} nats; "
        f"log p(x) (k = {args.eval_particles}): {log_px:.2f}"
    )
    return {"before": before, "after": after, "log_px": log_px, "betas": betas}


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    # The header names no run time: this is the time on this machine.
    print(f"took {time.perf_counter() - start:.0f} s")
