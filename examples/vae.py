"""A variational autoencoder on binarised MNIST, trained through Pyro's own SVI on
the importance-weighted bound (IWELBO) with the DReG gradient for the encoder.

The model and guide are plain Pyro programs (``pyro.module``, a data plate, one
latent site); swapping ``Trace_ELBO()`` for ``IWELBO(k, estimator="dreg")`` is the
only change an existing Pyro VAE needs.

Real budget (MNIST from torchvision, read offline from ../shared/data; it
prints the time it took):

    python examples/vae.py --epochs 10 --num-particles 5

Expect the test bound (k = 5, on the first 1,000 test images) to rise from
about -203 nats before training to -119 after one epoch and -103 after ten,
and log p(x) estimated with 1000 particles to be about -100.

Tiny budget (the embedded mnist-mini set, a few seconds):

    python examples/vae.py --smoke
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from example_options import count, one_line_errors, parse_with_smoke, positive
from pyro.infer import SVI
from torch import nn

from pyro_iwae import IWELBO, log_likelihood
from pyro_iwae.data import DATASETS, load_dataset, minibatches
from pyro_iwae.optim import Adam

# The project's offline copy of MNIST, when run from a checkout; elsewhere
# torchvision downloads it into pyro-iwae's data folder.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


#: What --smoke changes: the defaults of a tiny budget.
SMOKE = {
    "data": "mnist-mini",
    "epochs": 2,
    "train_limit": 500,
    "test_limit": 100,
    "hidden_dim": 64,
    "latent_dim": 8,
    "batch_size": 50,
    "eval_particles": 50,
    "lr": 3e-3,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="mnist", choices=DATASETS)
    parser.add_argument(
        "--data-dir",
        default=SHARED_DATA if SHARED_DATA.is_dir() else None,
        help="folder holding MNIST/raw (default: ../shared/data if present)",
    )
    parser.add_argument("--epochs", type=count, default=10)
    parser.add_argument("--num-particles", type=count, default=5)
    parser.add_argument("--estimator", default="dreg", choices=["iwae", "dreg"])
    parser.add_argument("--latent-dim", type=count, default=20)
    parser.add_argument("--hidden-dim", type=count, default=200)
    parser.add_argument("--batch-size", type=count, default=100)
    parser.add_argument("--lr", type=positive, default=1e-3)
    parser.add_argument("--train-limit", type=count, default=None)
    parser.add_argument("--test-limit", type=count, default=1000)
    parser.add_argument("--eval-particles", type=count, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny budget: mnist-mini, 500 training points, 2 epochs, small nets",
    )
    args = parse_with_smoke(parser, argv, SMOKE)
    return args


class Encoder(nn.Module):
    def __init__(self, x_dim: int, hidden_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(x_dim, hidden_dim), nn.Tanh())
        self.loc = nn.Linear(hidden_dim, latent_dim)
        self.scale = nn.Sequential(nn.Linear(hidden_dim, latent_dim), nn.Softplus())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.loc(h), self.scale(h) + 1e-4


class VAE(nn.Module):
    """p(z) = N(0, I), p(x | z) Bernoulli with logits from an MLP; q(z | x) a
    diagonal Gaussian from another. ``x`` is ``[batch, x_dim]``; with vectorized
    particles ``z`` is ``[k, batch, latent_dim]``, which ``nn.Linear`` broadcasts."""

    def __init__(
        self, x_dim: int, hidden_dim: int, latent_dim: int, bias: torch.Tensor
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = Encoder(x_dim, hidden_dim, latent_dim)
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, x_dim)
        )
        with torch.no_grad():
            # Start the output at the data's mean grey level (logit).
            self.decoder[-1].bias.copy_(bias)

    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            prior = dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1)
            z = pyro.sample("z", prior)
            logits = self.decoder(z)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encoder(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def main(argv: list[str] | None = None) -> dict:
    """Trains and evaluates; returns the per-point test bounds (nats) before and
    after training, the estimated test log p(x), and the number of steps."""
    args = parse_args(argv)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    with one_line_errors():  # a data file not found: one line, no traceback
        data = load_dataset(args.data, args.data_dir)
    train = data.train[: args.train_limit]
    test = data.test[: args.test_limit]
    mean = train.mean(0).clamp(1e-3, 1 - 1e-3)
    vae = VAE(train.shape[1], args.hidden_dim, args.latent_dim, mean.logit())

    loss = IWELBO(num_particles=args.num_particles, estimator=args.estimator)
    svi = SVI(vae.model, vae.guide, Adam({"lr": args.lr}), loss=loss)
    evaluation = IWELBO(num_particles=args.num_particles)

    def test_bound() -> float:
        return -evaluation.loss(vae.model, vae.guide, test) / len(test)

    initial = test_bound()
    print(f"test bound before training: {initial:.2f} nats")
    steps = 0
    for epoch in range(args.epochs):
        total = 0.0
        # Dynamic binarisation: a fresh Bernoulli draw of every batch.
        for batch in minibatches(train, args.batch_size, binarize=True):
            total += svi.step(batch)
            steps += 1
        print(
            f"epoch {epoch + 1}: train loss {total / len(train):.2f}, "
            f"test bound {test_bound():.2f}"
        )
    final = test_bound()
    nll = log_likelihood(vae.model, vae.guide, test, num_samples=args.eval_particles)
    log_px = nll.mean().item()
    print(
        f"test bound (k = {args.num_particles}): {final:.2f} nats; "
        f"log p(x) (k = {args.eval_particles}): {log_px:.2f} nats"
    )
    return {"initial": initial, "final": final, "log_px": log_px, "steps": steps}


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    # The header names no run time: this is the time on this machine.
    print(f"took {time.perf_counter() - start:.0f} s")
