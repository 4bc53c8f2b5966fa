"""Command-line helpers the example scripts share: argparse types that refuse a
bad count or rate in one line, the ``--smoke`` budget as defaults, and the
library's errors (a data file not found) said in one line too."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from pyro_iwae import PyroIwaeError


def count(text: str) -> int:
    """An integer of at least 1, for argparse: 0 particles or epochs get a
    one-line error, not a traceback from deep in training."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not an integer >= 1")
    return value


def positive(text: str) -> float:
    """A number above 0, for argparse."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a number > 0")
    return value


def parse_with_smoke(
    parser: argparse.ArgumentParser, argv: list[str] | None, smoke: dict
) -> argparse.Namespace:
    """``parser``'s arguments of ``argv``; with ``--smoke``, ``smoke`` gives the
    defaults of a tiny budget (an option given still holds)."""
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**smoke)
        args = parser.parse_args(argv)
    return args


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Ends the script with the library's error on one line (``vae.py: error:
    ...``, as argparse says a bad argument) and exit status 1, not a traceback;
    its ``data_dir=FOLDER`` written as the scripts' option, ``--data-dir``."""
    try:
        yield
    except PyroIwaeError as e:
        message = str(e).replace("data_dir=FOLDER", "--data-dir FOLDER")
        sys.exit(f"{Path(sys.argv[0]).name}: error: {message}")
