"""The scripts of examples/ run end to end on their tiny budget (``--smoke``) and
learn: each test runs an example's ``main`` in this process (one torch thread)
and checks what it returned against what training must achieve."""

from __future__ import annotations

import argparse
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
    if str(EXAMPLES) not in sys.path:
        # As `python examples/NAME.py` has it: their shared example_options.
        sys.path.insert(0, str(EXAMPLES))
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


def parser_of(module: ModuleType, monkeypatch) -> argparse.ArgumentParser:
    """The parser ``module.parse_args`` builds."""
    made = []
    parse = argparse.ArgumentParser.parse_args

    def recorded(self, *args, **kwargs):
        made.append(self)
        return parse(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", recorded)
    module.parse_args([])
    monkeypatch.undo()
    return made[0]


def other_value(value: object) -> str:
    """A valid value of an option other than ``value``, as typed."""
    if isinstance(value, str):
        return "mnist" if value == "mnist-mini" else "mnist-mini"
    if isinstance(value, float):
        return str(value * 2)
    return str(value + 1)


@pytest.mark.parametrize("name", NAMES)
def test_smoke_changes_only_the_defaults_an_option_given_holds(name):
    # `vae.py --smoke --data fashion-mnist` trained on mnist-mini, and
    # `global_latents.py --smoke --batch-size 1000` at batch 30, without a word.
    module = load(name)
    args = vars(module.parse_args(["--smoke"]))
    assert module.SMOKE and {k: args[k] for k in module.SMOKE} == module.SMOKE
    for key, value in module.SMOKE.items():
        given = other_value(value)
        args = module.parse_args(["--smoke", "--" + key.replace("_", "-"), given])
        assert str(getattr(args, key)) == given, key


@pytest.mark.parametrize("name", NAMES)
def test_a_count_below_one_is_refused_in_one_line(name, monkeypatch, capsys):
    # `vae.py --num-particles 0` ended in a traceback from IWELBO.
    module = load(name)
    parser = parser_of(module, monkeypatch)
    counts = [a for a in parser._actions if a.type is module.count]
    # Every integer option but the seed is a count.
    assert [a.dest for a in parser._actions if a.type is int] == ["seed"]
    assert len(counts) >= 4
    for action in counts:
        option = action.option_strings[0]
        with pytest.raises(SystemExit) as info:
            module.parse_args([option, *["0"] * (action.nargs or 1)])
        assert info.value.code == 2
        error = capsys.readouterr().err.splitlines()[-1]
        assert error.endswith(f"error: argument {option}: 0 is not an integer >= 1")
    with pytest.raises(SystemExit):
        module.parse_args(["--lr", "0"])
    assert capsys.readouterr().err.endswith("argument --lr: 0 is not a number > 0\n")


@pytest.mark.parametrize(
    ("name", "args", "error"),
    [
        ("global_latents", ["--smoke", "--batch-size", "1000"], "more than the 300"),
        ("ss_vae", ["--num-particles", "1"], "--label vimco needs --num-particles 2"),
        ("ss_vae", ["--smoke", "--num-labelled", "600"], "leaves no unlabelled"),
        ("dmm", ["--min-beta", "0"], "--min-beta: 0.0 is not in (0, 1]"),
    ],
)
def test_options_that_cannot_go_together_are_refused_in_one_line(
    name, args, error, capsys
):
    # Each ended in a traceback from Pyro or IWELBO.
    with pytest.raises(SystemExit) as info:
        load(name).parse_args(args)
    assert info.value.code == 2
    assert error in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("name", NAMES)
def test_a_header_claims_no_run_time_the_script_does_not_measure(name):
    # vae.py's header said "about 3 minutes on one CPU core", measured nowhere.
    text = (EXAMPLES / f"{name}.py").read_text()
    assert not re.search(r"minutes?\b|CPU core", load(name).__doc__)
    assert 'print(f"took {time.perf_counter() - start:.0f} s")' in text


def test_a_missing_data_file_is_said_in_one_line(tmp_path, monkeypatch):
    # `vae.py --data omniglot --smoke` without chardata.mat ended in a traceback
    # whose last line was the DataError.
    monkeypatch.setattr(sys, "argv", ["vae.py"])
    args = ["--smoke", "--data", "omniglot", "--data-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as info:
        load("vae").main(args)
    message = info.value.code
    assert isinstance(message, str) and "\n" not in message  # exit status 1
    assert message.startswith(f"vae.py: error: omniglot: {tmp_path}")
    assert "not found; download" in message
    assert message.endswith("pass --data-dir FOLDER, the folder holding it")


def test_the_semi_supervised_example_says_a_data_error_in_one_line(monkeypatch):
    # As vae.py: a traceback. Its data sets have labels, none a file to leave out
    # offline (mnist downloads), so its loader says the error of a missing folder.
    from pyro_iwae.errors import DataError

    module = load("ss_vae")

    def missing(name, data_dir):
        raise DataError(f"{name}: x not found; pass data_dir=FOLDER, a folder")

    monkeypatch.setattr(module, "load_dataset", missing)
    monkeypatch.setattr(sys, "argv", ["ss_vae.py"])
    with pytest.raises(SystemExit) as info:
        module.main(["--smoke"])
    assert info.value.code == (
        "ss_vae.py: error: mnist-mini: x not found; pass --data-dir FOLDER, a folder"
    )
