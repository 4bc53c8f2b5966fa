"""A semi-supervised VAE (Kingma et al. 2014, model M2) on binarised MNIST: the
digit's class is a discrete latent y, observed for a few labelled images and
inferred for the rest; the classifier q(y | x) is part of the guide.

Under IWELBO the label of an unlabelled image is sampled and its guide trained
by VIMCO (``IWELBO(k, estimator="vimco")``: a score-function gradient with a
leave-one-out baseline per particle); the Gaussian style z keeps its
reparameterised gradient. With ``--label enum`` the guide's label site is marked
for enumeration instead: IWELBO sums the bound over the ten values exactly
(each with its own k particles of z, trained by DReG); q(y | x) then cancels from
the unlabelled bound. Labelled images add alpha log q(y | x) to their bound through
``pyro.factor``, so that the classifier also learns from the labels.

Real budget (MNIST from torchvision, read offline from ../shared/data; 3,000
labels; it prints the time it took):

    python examples/ss_vae.py --epochs 10 --num-labelled 3000

Expect the test accuracy of q(y | x) (first 2,000 test images) to pass 85%
after one epoch and to reach about 92% after ten, and the unlabelled test
bound (k = 5) to rise from about -565 nats to about -98.

Tiny budget (the embedded mnist-mini set, a few seconds):

    python examples/ss_vae.py --smoke
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from example_options import count, one_line_errors, parse_with_smoke, positive
from pyro.infer import SVI
from torch import nn

from pyro_iwae import IWELBO
from pyro_iwae.data import DATASETS, load_dataset, minibatches
from pyro_iwae.optim import Adam

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NUM_CLASSES = 10

# How the label of an unlabelled image enters the bound. "vimco": sampled, its
# guide trained by VIMCO. "enum": summed over its ten values exactly (each value
# gets its own k particles of z); q(y | x) then cancels from the bound, so the
# classifier learns from the labelled images' alpha term alone.
LABEL_MODES = ("vimco", "enum")


#: What --smoke changes: the defaults of a tiny budget.
SMOKE = {
    "data": "mnist-mini",
    "epochs": 2,
    "num_labelled": 200,
    "train_limit": 600,
    "test_limit": 300,
    "batch_size": 50,
    "hidden_dim": 64,
    "latent_dim": 8,
    "lr": 3e-3,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="mnist", choices=DATASETS[:3])
    parser.add_argument(
        "--data-dir",
        default=SHARED_DATA if SHARED_DATA.is_dir() else None,
        help="folder holding MNIST/raw (default: ../shared/data if present)",
    )
    parser.add_argument("--label", default="vimco", choices=LABEL_MODES)
    parser.add_argument("--epochs", type=count, default=10)
    parser.add_argument("--num-labelled", type=count, default=3000)
    parser.add_argument("--num-particles", type=count, default=5)
    parser.add_argument(
        "--alpha", type=float, default=50.0, help="weight of log q(y|x) on labels"
    )
    parser.add_argument("--latent-dim", type=count, default=20)
    parser.add_argument("--hidden-dim", type=count, default=300)
    parser.add_argument("--batch-size", type=count, default=100)
    parser.add_argument("--lr", type=positive, default=1e-3)
    parser.add_argument("--train-limit", type=count, default=None)
    parser.add_argument("--test-limit", type=count, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny budget: mnist-mini, 200 labels, 600 training points, 2 epochs",
    )
    args = parse_with_smoke(parser, argv, SMOKE)
    if args.alpha < 0:
        parser.error(f"argument --alpha: {args.alpha} is not a number >= 0")
    if args.label == "vimco" and args.num_particles < 2:
        parser.error("--label vimco needs --num-particles 2 or more (its baseline)")
    if args.train_limit is not None and args.num_labelled >= args.train_limit:
        parser.error(
            f"--num-labelled {args.num_labelled} leaves no unlabelled point of "
            f"--train-limit {args.train_limit}; give fewer labels or more points"
        )
    return args


def concat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` and ``b`` joined along the last dim, their other dims broadcast: an
    observed label ``[batch, 10]`` meets a latent ``[k, batch, d]``."""
    shape = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat(
        [a.expand(shape + a.shape[-1:]), b.expand(shape + b.shape[-1:])], -1
    )


def mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(n_in, hidden), nn.Softplus(), nn.Linear(hidden, n_out)
    )


class SSVAE(nn.Module):
    """p(y) uniform over 10 classes, p(z) = N(0, I), p(x | y, z) Bernoulli;
    q(y | x) a classifier, q(z | x, y) a diagonal Gaussian. ``xs`` is
    ``[batch, 784]``, ``ys`` one-hot ``[batch, 10]`` or None (unlabelled)."""

    def __init__(
        self,
        x_dim: int,
        hidden: int,
        latent_dim: int,
        alpha: float,
        enumerate_label: bool = False,
    ):
        super().__init__()
        self.latent_dim, self.alpha = latent_dim, alpha
        self.label_infer = {"enumerate": "parallel"} if enumerate_label else {}
        self.decoder = mlp(latent_dim + NUM_CLASSES, hidden, x_dim)
        self.encoder = mlp(x_dim + NUM_CLASSES, hidden, 2 * latent_dim)
        self.classifier = mlp(x_dim, hidden, NUM_CLASSES)

    def model(self, xs: torch.Tensor, ys: torch.Tensor | None = None) -> None:
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", xs.shape[0]):
            z = pyro.sample(
                "z", dist.Normal(xs.new_zeros(self.latent_dim), 1.0).to_event(1)
            )
            prior = dist.OneHotCategorical(logits=xs.new_zeros(NUM_CLASSES))
            y = pyro.sample("y", prior, obs=ys)
            logits = self.decoder(concat(z, y))
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=xs)
            if ys is not None:
                # Labels train the classifier directly as well (M2's alpha
                # term): a factor is the same for every particle, so it adds
                # exactly alpha log q(y | x) to each point's bound.
                pyro.module("classifier", self.classifier)
                log_q = dist.OneHotCategorical(logits=self.classifier(xs)).log_prob(ys)
                pyro.factor("classify", self.alpha * log_q)

    def guide(self, xs: torch.Tensor, ys: torch.Tensor | None = None) -> None:
        pyro.module("encoder", self.encoder)
        pyro.module("classifier", self.classifier)
        with pyro.plate("data", xs.shape[0]):
            if ys is None:
                logits = self.classifier(xs)
                ys = pyro.sample(
                    "y", dist.OneHotCategorical(logits=logits), infer=self.label_infer
                )
            loc, log_scale = self.encoder(concat(xs, ys)).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    def accuracy(self, xs: torch.Tensor, labels: torch.Tensor) -> float:
        with torch.no_grad():
            guess = self.classifier(xs).argmax(-1)
        return (guess == labels).float().mean().item()


def make_objective(label: str, num_particles: int) -> IWELBO:
    """The objective for the unlabelled images."""
    if label == "vimco":
        return IWELBO(num_particles=num_particles, estimator="vimco")
    if label == "enum":
        # The guide marks y for enumeration: each label value gets its own
        # particles of z, which get the DReG gradient.
        return IWELBO(num_particles=num_particles, estimator="dreg")
    raise ValueError(f"unknown label mode {label!r}; choose one of {LABEL_MODES}")


def main(argv: list[str] | None = None) -> dict:
    """Trains and evaluates; returns the test accuracy of q(y | x) before and
    after training, the unlabelled test bound (nats per image) before and
    after, and the number of steps."""
    args = parse_args(argv)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    with one_line_errors():  # a data file not found: one line, no traceback
        data = load_dataset(args.data, args.data_dir)
    train, labels = (
        data.train[: args.train_limit],
        data.train_labels[: args.train_limit],
    )
    n = args.num_labelled
    if n >= len(train):
        raise SystemExit(
            f"ss_vae.py: error: --num-labelled {n} leaves no unlabelled point of "
            f"the {len(train)} training points; give fewer labels"
        )
    labelled = train[:n], F.one_hot(labels[:n], NUM_CLASSES).to(train.dtype)
    unlabelled = train[n:]
    test, test_labels = (
        data.test[: args.test_limit],
        data.test_labels[: args.test_limit],
    )

    ssvae = SSVAE(
        train.shape[1],
        args.hidden_dim,
        args.latent_dim,
        args.alpha,
        enumerate_label=args.label == "enum",
    )
    optim = Adam({"lr": args.lr})
    unsupervised = SVI(
        ssvae.model,
        ssvae.guide,
        optim,
        loss=make_objective(args.label, args.num_particles),
    )
    # The labelled images have no discrete latent: the DReG gradient for z.
    supervised = SVI(
        ssvae.model, ssvae.guide, optim, loss=IWELBO(args.num_particles, "dreg")
    )
    evaluation = IWELBO(num_particles=args.num_particles)

    def test_bound() -> float:
        return -evaluation.loss(ssvae.model, ssvae.guide, test) / len(test)

    before = {"accuracy": ssvae.accuracy(test, test_labels), "bound": test_bound()}
    steps = 0
    for epoch in range(args.epochs):
        # One labelled batch beside every unlabelled one: the few labels are
        # visited many times an epoch.
        labelled_batches = itertools.cycle(
            list(minibatches(torch.arange(n), args.batch_size))
        )
        for batch in minibatches(unlabelled, args.batch_size, binarize=True):
            unsupervised.step(batch)
            idx = next(labelled_batches)
            supervised.step(torch.bernoulli(labelled[0][idx]), labelled[1][idx])
            steps += 1
        accuracy = ssvae.accuracy(test, test_labels)
        print(
            f"epoch {epoch + 1}: test accuracy {accuracy:.3f}, "
            f"unlabelled test bound {test_bound():.2f} nats"
        )
    after = {"accuracy": ssvae.accuracy(test, test_labels), "bound": test_bound()}
    print(
        f"test accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}; "
        f"bound {before['bound']:.2f} -> {after['bound']:.2f} nats"
    )
    return {"before": before, "after": after, "steps": steps}


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    # The header names no run time: this is the time on this machine.
    print(f"took {time.perf_counter() - start:.0f} s")
