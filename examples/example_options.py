"""Command-line helpers the example scripts share: argparse types that refuse a
bad count or rate in one line, and the ``--smoke`` budget as defaults."""

from __future__ import annotations

import argparse


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
