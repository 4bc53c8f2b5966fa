"""Draw ``docs/tracking-curves.png``: what a default run logged to TensorBoard,
read back from its event files with TensorBoard's own reader.

The run is ``pyro-iwae fit``'s default (the paper's model, k = 5, batch 100, 40
epochs on the embedded ``mnist-mini``; about a minute on a 2-core CPU) with a
TensorBoard tracker. Needs ``pip install -e '.[tensorboard]'``. Run from anywhere::

    python scripts/tracking_figure.py            # trains into runs/tracking-figure
    python scripts/tracking_figure.py --epochs 5 --out /tmp/figure.png
"""

import argparse
import shutil
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pyro_iwae import RunConfig, train_run
from pyro_iwae.runs.tracking import TENSORBOARD_DIR, TensorBoardTracker

REPO_ROOT = Path(__file__).resolve().parents[1]
PANELS = (
    (("train/bound", "test/bound"), "bound (nats per point)"),
    (("train/grad_norm",), "gradient norm (mean over the epoch)"),
    (("train/points_per_s",), "training points per second"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/tracking-figure"))
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "docs" / "tracking-curves.png"
    )
    args = parser.parse_args()

    shutil.rmtree(args.run_dir, ignore_errors=True)
    log_dir = args.run_dir / TENSORBOARD_DIR
    config = RunConfig(epochs=args.epochs)
    train_run(config, args.run_dir, callback=TensorBoardTracker(log_dir))

    events = EventAccumulator(str(log_dir))
    events.Reload()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.4), dpi=100)
    for i, (tags, label) in enumerate(PANELS):
        ax = fig.add_subplot(1, len(PANELS), i + 1)
        for tag in tags:
            scalars = events.Scalars(tag)
            ax.plot([s.step for s in scalars], [s.value for s in scalars], label=tag)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(tags) > 1:
            ax.legend()
    fig.suptitle(
        f"pyro-iwae fit (mnist-mini, k={config.num_particles}, "
        f"{args.epochs} epochs), read back from TensorBoard's event files"
    )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
