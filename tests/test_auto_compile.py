"""compile="auto" for evaluations and training runs (pyro_iwae/runs/auto_compile.py)
and its command-line switch (--compile [auto|on|off])."""

import json

import click
import pytest
import torch
from click.testing import CliRunner
from small_run import BATCH, K

from pyro_iwae import EvalSettings, RunConfig, fit, paper_architecture
from pyro_iwae.data import load_dataset
from pyro_iwae.runs import auto_compile, training
from pyro_iwae.runs.auto_compile import (
    AUTO_COMPILE_STEPS,
    AUTO_COMPILE_WORK,
    choose_compile,
    choose_fit_compile,
)
from pyro_iwae.runs.callbacks import FitCallback
from pyro_iwae.runs.schedules import make_objective
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


def test_a_run_compiles_from_the_steps_where_compiling_pays(monkeypatch):
    monkeypatch.setattr(auto_compile, "_cpp_compiler", lambda: "/usr/bin/g++")
    compile, why = choose_fit_compile("auto", AUTO_COMPILE_STEPS, CPU)
    assert compile is True and why.startswith("auto: 10,000 steps, at least")
    compile, why = choose_fit_compile("auto", AUTO_COMPILE_STEPS - 1, CPU)
    assert compile is False and why.startswith("auto: 9,999 steps, under")
    compile, why = choose_fit_compile("auto", 10**6, CPU, single_process=False)
    assert compile is False and "torchrun" in why
    assert choose_fit_compile(True, 1, CPU, False) == (True, "as asked")


class RecordCompile(FitCallback):
    def __init__(self, objective):
        self.objective, self.seen = objective, set()

    def on_step(self, info):
        self.seen.add(self.objective.compile)


@pytest.mark.parametrize("steps", [1, 10**6], ids=["short", "long"])
def test_fit_settles_auto_for_the_call_and_records_why(monkeypatch, steps):
    # A long run compiles; None (the traced step graph, uncompiled) stands in
    # for inductor, which takes seconds to compile.
    monkeypatch.setattr(auto_compile, "AUTO_COMPILE_STEPS", steps)
    monkeypatch.setattr(auto_compile, "_cpp_compiler", lambda: "/usr/bin/g++")
    monkeypatch.setattr(
        training,
        "choose_fit_compile",
        lambda *args: (lambda c, why: (None if c else c, why))(
            *choose_fit_compile(*args)
        ),
    )
    data = load_dataset("mnist-mini").train[: 2 * BATCH]
    torch.manual_seed(0)
    model, guide = paper_architecture(1)
    objective = make_objective("iwae", K, compile="auto")
    record = RecordCompile(objective)
    history = fit(
        model,
        guide,
        data,
        objective,
        batch_size=BATCH,
        schedule=[(1, 1e-3)],
        callback=record,
        binarize=True,
    )
    compiled = steps == 1
    assert record.seen == {None if compiled else False}
    assert objective.compile == "auto"  # settled for the call only
    assert history[0]["compiled"] is compiled
    assert history[0]["compile_choice"].startswith("auto: 2 steps")
    assert (history[0]["compile_time"] > 0) is compiled


def test_run_configs_default_to_auto_and_old_ones_keep_theirs(tmp_path):
    assert RunConfig().compile == "auto"
    assert RunConfig().make_objective().compile == "auto"
    saved = {**RunConfig().to_dict(), "compile": False}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert RunConfig.load(tmp_path).compile is False
    old_renyi = {**RunConfig(objective="renyi").to_dict(), "compile": False}
    (tmp_path / "config.json").write_text(json.dumps(old_renyi))
    assert RunConfig.load(tmp_path).make_objective().__class__.__name__ == "RenyiELBO"
