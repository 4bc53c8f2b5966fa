"""compile="auto" for evaluations (pyro_iwae/runs/auto_compile.py) and its
command-line switch (--compile [auto|on|off])."""

import click
import pytest
import torch
from click.testing import CliRunner

from pyro_iwae import EvalSettings
from pyro_iwae.runs import auto_compile
from pyro_iwae.runs.auto_compile import AUTO_COMPILE_WORK, choose_compile
from pyro_iwae_cli.options import settings_options

CPU = torch.device("cpu")


def test_auto_compiles_from_the_work_where_compiling_pays(monkeypatch):
    monkeypatch.setattr(auto_compile, "_cpp_compiler", lambda: "/usr/bin/g++")
    compile, why = choose_compile("auto", 1000, AUTO_COMPILE_WORK // 1000, CPU)
    assert compile is True and why.startswith("auto: 3,000,000 particle-points")
    compile, why = choose_compile("auto", 1000, AUTO_COMPILE_WORK // 1000 - 1, CPU)
    assert compile is False and "under the 3,000,000" in why


def test_auto_stays_eager_without_a_cpp_compiler_or_off_the_cpu(monkeypatch):
    monkeypatch.setattr(auto_compile, "_cpp_compiler", lambda: None)
    compile, why = choose_compile("auto", 10_000, 5000, CPU)
    assert compile is False and "no C++ compiler" in why
    monkeypatch.setattr(auto_compile, "_cpp_compiler", lambda: "/usr/bin/g++")
    compile, why = choose_compile("auto", 10_000, 5000, torch.device("cuda"))
    assert compile is False and "CPU only" in why


@pytest.mark.parametrize("setting", [True, False, None, "aot_eager"])
def test_a_setting_other_than_auto_is_kept(setting):
    assert choose_compile(setting, 10_000, 5000, CPU) == (setting, "as asked")


@pytest.mark.parametrize(
    "args, value",
    [([], "auto"), (["--compile"], True), (["--compile", "off"], False)]
    + [(["--compile", "on"], True), (["--compile", "auto"], "auto")],
)
def test_the_switch_gives_auto_true_or_false(args, value):
    seen = {}

    @click.command()
    @settings_options(EvalSettings)
    def command(**settings):
        seen.update(settings)

    result = CliRunner().invoke(command, args)
    assert result.exit_code == 0, result.output
    assert seen["compile"] == value
    assert EvalSettings(**seen).compile == value
