"""What the interpreter's shutdown adds to a ``pyro-iwae`` command's wall time.

When a Python process ends, its shutdown collects the garbage of every module and
object left: with torch loaded, and more with ``torch._dynamo`` (which any
``torch.optim`` optimiser imports on its first use) and inductor (the compiled
path), that walk takes a good part of a second after the work is done. The
console script (``pyro_iwae_cli.main.main``) freezes the objects first
(``gc.freeze``), which leaves them out of the walk.

Two measures, each alternating the two ways, ``--repeat`` times:

- shutdown alone: a fresh interpreter imports the modules of a row, prints the
  wall clock and ends, normally or after ``gc.freeze()``; the time from the print
  to the process's end, as this process sees it, is the shutdown;
- a whole command: ``pyro-iwae fit`` on the embedded ``mnist-mini`` for one epoch
  (``--command-epochs``), started through ``cli()`` (the console script before
  the freeze) or through ``main()`` (now); the process's wall.

    python bench/shutdown.py --repeat 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

import common

ROWS = {
    "torch": "import torch",
    "torch, torch._dynamo": "import torch, torch._dynamo",
    "torch, torch._dynamo, inductor": (
        "import torch, torch._dynamo, torch._inductor.compile_fx"
    ),
    "pyro_iwae_cli (what fit loads)": (
        "import torch._dynamo, pyro_iwae_cli.main, pyro_iwae.runs.training"
    ),
}
WAYS = {"collected": "", "frozen": "import gc; gc.freeze(); "}
ENTRIES = {"collected": "cli", "frozen": "main"}


def shutdown_seconds(imports: str, way: str) -> float:
    """Seconds from a fresh interpreter's last statement to its end."""
    code = f"{imports}\nimport time\n{WAYS[way]}print(time.time(), flush=True)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    out, _ = child.communicate()
    end = time.time()
    if child.returncode:
        raise SystemExit(f"the child for {imports!r} failed")
    return end - float(out)


def command_seconds(entry: str, epochs: int, out: str) -> float:
    """Wall seconds of one ``pyro-iwae fit`` process started through ``entry``."""
    argv = [
        "fit",
        "--dataset",
        "mnist-mini",
        "--epochs",
        str(epochs),
        "--seed",
        "0",
        "--out",
        out,
        "--quiet",
    ]
    code = (
        f"import sys; sys.argv = ['pyro-iwae', *{argv!r}]\n"
        f"from pyro_iwae_cli.main import {entry}; {entry}()"
    )
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--command-epochs", type=int, default=1)
    args = parser.parse_args(argv)
    env = common.environment(seed=0)

    shutdown = {(row, way): [] for row in ROWS for way in WAYS}
    command = {way: [] for way in ENTRIES}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            ways = list(WAYS) if i % 2 == 0 else list(reversed(WAYS))
            for row, imports in ROWS.items():
                for way in ways:
                    shutdown[row, way].append(shutdown_seconds(imports, way))
            for way in ways:
                out = f"{tmp}/{way}-{i}"
                command[way].append(
                    command_seconds(ENTRIES[way], args.command_epochs, out)
                )

    print(common.environment_markdown(env))
    print()
    rows = []
    for row in ROWS:
        collected, frozen = (statistics.median(shutdown[row, way]) for way in WAYS)
        rows.append(
            [row, f"{collected:.3f}", f"{frozen:.3f}", f"{collected - frozen:.3f}"]
        )
    headers = ["modules loaded", "shutdown s, collected", "shutdown s, frozen"]
    print(common.markdown_table([*headers, "saved s"], rows))
    print()
    before, after = (statistics.median(command[way]) for way in ENTRIES)
    fit = f"pyro-iwae fit --dataset mnist-mini --epochs {args.command_epochs}"
    headers = ["command", "through cli() s", "through main() s", "saved s"]
    row = [fit, f"{before:.2f}", f"{after:.2f}", f"{before - after:.2f}"]
    print(common.markdown_table(headers, [row]))
    print(f"\nmedians of {args.repeat} alternated runs each")


if __name__ == "__main__":
    main()
