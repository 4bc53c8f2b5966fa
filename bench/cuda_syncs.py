"""Count host-device synchronisations in one IWELBO training step on a GPU.

A step that waits for the GPU (reading a value, checking a tensor's contents)
cannot queue the next kernels ahead. Counts come from PyTorch's sync debug mode
(a prototype that "does not yet detect all synchronizing operations"), with
Pyro's and torch's argument validation on (the default) and off.

    python bench/cuda_syncs.py
"""

from __future__ import annotations

import argparse
import sys
import warnings

import pyro
import torch
from common import environment, environment_markdown, markdown_table

from pyro_iwae import IWELBO, paper_architecture
from pyro_iwae.data import load_dataset


def syncs_per_step(estimator: str, k: int, validation: bool, steps: int = 3) -> float:
    data = load_dataset("mnist-mini")
    model, guide = paper_architecture(1, data_mean=data.train_mean)
    model.cuda(), guide.cuda()
    loss_fn = IWELBO(k, estimator)(model, guide)
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=1e-3, eps=1e-4)
    x = torch.bernoulli(data.train[:100]).cuda()

    def step() -> None:
        optimizer.zero_grad()
        (loss_fn(x) / x.shape[0]).backward()
        optimizer.step()

    default_validate = torch.distributions.Distribution._validate_args
    with pyro.validation_enabled(validation):
        torch.distributions.Distribution.set_default_validate_args(validation)
        try:
            step()  # warm-up: lazy set-up may read values once
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                for _ in range(steps):
                    step()
                torch.cuda.set_sync_debug_mode("default")
        finally:
            torch.distributions.Distribution.set_default_validate_args(default_validate)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    return len(syncs) / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[5, 50])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/cuda_syncs.py needs CUDA")
    rows = [
        [
            estimator,
            k,
            "on" if validation else "off",
            syncs_per_step(estimator, k, validation),
        ]
        for estimator in ("iwae", "dreg")
        for k in args.k
        for validation in (True, False)
    ]
    print("## Host-device synchronisations per training step\n")
    print(environment_markdown(environment(device=torch.cuda.get_device_name())))
    print()
    print(markdown_table(["estimator", "k", "validation", "syncs per step"], rows))


if __name__ == "__main__":
    main(sys.argv[1:])
