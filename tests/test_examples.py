"""The scripts of examples/ run end to end on their tiny budget (``--smoke``) and
learn: each test runs an example's ``main`` in this process (one torch thread)
and checks what it returned against what training must achieve."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NAMES = ["vae", "ss_vae", "global_latents", "dmm", "sparse_gamma"]


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", EXAMPLES / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smoke(name: str) -> dict:
    return load(name).main(["--smoke"])


def all_finite(result: dict) -> bool:
    return all(math.isfinite(v) for v in result.values() if isinstance(v, int | float))


@pytest.mark.parametrize("name", NAMES)
def test_header_commands_parse(name):
    """The commands in an example's header are valid for its own parser, and
    there is one for the real budget and one for the tiny one."""
    module = load(name)
    commands = re.findall(rf"^\s+python examples/{name}\.py(.*)$", module.__doc__, re.M)
    assert len(commands) == 2 and commands[1].split() == ["--smoke"], commands
    assert not module.parse_args(shlex.split(commands[0])).smoke


def test_vae(one_thread):
    result = smoke("vae")
    assert all_finite(result) and result["steps"] == 20
    assert result["final"] > result["initial"] + 5, result
    # more particles, a higher estimate (k = 50 against the bound at k = 5)
    assert result["log_px"] > result["final"], result


@pytest.mark.parametrize("label", ["vimco", "enum"])
def test_ss_vae(one_thread, label):
    result = load("ss_vae").main(["--smoke", "--label", label])
    before, after = result["before"], result["after"]
    assert all(map(math.isfinite, (*before.values(), *after.values())))
    # ten classes: chance is 0.1; 200 labels and 16 steps give about 0.6
    assert after["accuracy"] > 0.35 and before["accuracy"] < 0.2, result
    assert after["bound"] > before["bound"] + 100, result


def test_global_latents(one_thread):
    result = smoke("global_latents")
    assert all_finite(result)
    assert result["after"] > result["before"] + 100, result
    # the bound (a mean of 20 draws, each with sd below a nat here) stays below
    # the exact log p(y), and comes near it
    assert result["exact"] - 8 < result["after"] < result["exact"], result
    assert abs(result["tau"] - 0.5) < 0.25 and result["w_error"] < 0.4, result


def test_dmm(one_thread):
    result = smoke("dmm")
    betas = result.pop("betas")
    assert all_finite(result)
    assert result["after"] > result["before"] + 5, result
    assert result["log_px"] > result["after"] - 0.5, result
    # annealed from --min-beta up to 1, then held there
    assert betas[0] == pytest.approx(0.2) and betas[-1] == 1.0
    assert all(b <= c for b, c in zip(betas, betas[1:], strict=False))


def test_sparse_gamma(one_thread):
    result = smoke("sparse_gamma")
    assert all_finite(result)
    assert result["after"] > result["before"] + 20, result
    # the importance-weighted bound (k = 10) of the trained guide beats its ELBO
    assert result["after"] > result["elbo"] + 2, result


def test_an_example_runs_as_a_script():
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "sparse_gamma.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=120,
        # one thread, as the other tests: on tiny tensors more only contend
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert "bound (k = 10)" in done.stdout
