"""compile="auto" for evaluations and training runs (pyro_iwae/runs/auto_compile.py)
and its command-line switch (--compile [auto|on|off])."""

import json

import click
import pytest
import torch
from click.testing import CliRunner
from small_run import BATCH, K, small_config

from pyro_iwae import (
    IWELBO,
    MIWELBO,
    EvalSettings,
    RunConfig,
    fit,
    paper_architecture,
)
from pyro_iwae.compiled import CompileFallbackWarning
from pyro_iwae.data import load_dataset
from pyro_iwae.errors import ConfigError
from pyro_iwae.runs import auto_compile
from pyro_iwae.runs.auto_compile import (
    AUTO_COMPILE_STEPS,
    AUTO_COMPILE_STEPS_CACHED,
    AUTO_COMPILE_STEPS_HEADER,
    AUTO_COMPILE_WORK,
    AUTO_COMPILE_WORK_HEADER,
    STEP_POINTS,
    choose_compile,
    choose_fit_compile,
    header_built,
    step_graph_keys,
)
from pyro_iwae.runs.callbacks import FitCallback
from pyro_iwae.runs.run import Run, train_run
from pyro_iwae.runs.schedules import make_objective
from pyro_iwae_cli.main import cli
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
    assert compile is True and why.startswith("auto: 8,000 steps, at least")
    compile, why = choose_fit_compile("auto", AUTO_COMPILE_STEPS - 1, CPU)
    assert compile is False and why.startswith("auto: 7,999 steps, under")
    compile, why = choose_fit_compile("auto", 10**6, CPU, single_process=False)
    assert compile is False and "torchrun" in why
    assert choose_fit_compile(True, 1, CPU, False) == (True, "as asked")


def test_larger_steps_pay_for_their_compile_in_fewer_steps(monkeypatch):
    monkeypatch.setattr(auto_compile, "_cpp_compiler", lambda: "/usr/bin/g++")

    def threshold(points):
        # The least number of steps that compiles, found by bisection.
        low, high = 1, 10 * AUTO_COMPILE_STEPS
        while low < high:
            middle = (low + high) // 2
            chosen = choose_fit_compile("auto", middle, CPU, particle_points=points)
            low, high = (low, middle) if chosen[0] else (middle + 1, high)
        return low

    # At batch 20, k 5 the measured thresholds hold; batch 100, k 50 saves about
    # 10 ms a step against 1.45 (results/benchmarks.md, session 19).
    assert threshold(STEP_POINTS) == AUTO_COMPILE_STEPS
    assert threshold(None) == AUTO_COMPILE_STEPS
    big = threshold(5000)
    assert big == pytest.approx(AUTO_COMPILE_STEPS * 1.475 / 10.05, rel=1e-3)
    assert threshold(1) > AUTO_COMPILE_STEPS  # the per-step saving alone
    _, why = choose_fit_compile("auto", big, CPU, particle_points=5000)
    assert why == (
        f"auto: {big:,} steps (5,000 particle-points a step), at least the "
        f"{big:,} from which compiling pays"
    )


class RecordCompile(FitCallback):
    def __init__(self, objective):
        self.objective, self.seen = objective, set()

    def on_step(self, info):
        self.seen.add(self.objective.compile)


@pytest.fixture
def choices(monkeypatch, tmp_path):
    """fit's compile choice with a C++ compiler, its graphs noted in an empty
    cache folder, and None (the traced step graph, uncompiled) standing in for
    inductor, which takes seconds to compile."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(auto_compile, "_cpp_compiler", lambda: "/usr/bin/g++")
    monkeypatch.setattr(auto_compile, "AUTO_COMPILE", None)


def fit_small(objective, callback=None):
    """fit of two steps of a batch each; its metrics."""
    data = load_dataset("mnist-mini").train[: 2 * BATCH]
    torch.manual_seed(0)
    model, guide = paper_architecture(1)
    options = dict(batch_size=BATCH, schedule=[(1, 1e-3)], binarize=True)
    return fit(model, guide, data, objective, callback=callback, **options)


@pytest.mark.parametrize("steps", [1, 10**6], ids=["short", "long"])
def test_fit_settles_auto_for_the_call_and_records_why(choices, monkeypatch, steps):
    monkeypatch.setattr(auto_compile, "AUTO_COMPILE_STEPS", steps)
    objective = make_objective("iwae", K, compile="auto")
    record = RecordCompile(objective)
    history = fit_small(objective, record)
    compiled = steps == 1
    assert record.seen == {None if compiled else False}
    assert objective.compile == "auto"  # settled for the call only
    assert history[0]["compiled"] is compiled
    assert history[0]["compile_choice"].startswith("auto: 2 steps")
    assert (history[0]["compile_time"] > 0) is compiled


def test_auto_compiles_shorter_runs_whose_graph_a_run_compiled_before(
    choices, monkeypatch
):
    monkeypatch.setattr(auto_compile, "AUTO_COMPILE_STEPS", 10**6)
    monkeypatch.setattr(auto_compile, "AUTO_COMPILE_STEPS_CACHED", 2)
    assert fit_small(make_objective("iwae", K, compile="auto"))[0]["compiled"] is False
    assert fit_small(make_objective("iwae", K, compile=None))[0]["compiled"] is True
    again = fit_small(make_objective("iwae", K, compile="auto"))[0]
    assert again["compiled"] is True, again["compile_choice"]
    assert again["compile_choice"] == (
        f"auto: 2 steps ({BATCH * K} particle-points a step; 1 of 1 graphs cached), "
        "at least the 2 from which compiling pays"
    )
    # Another k is another graph.
    assert (
        fit_small(make_objective("iwae", K + 1, compile="auto"))[0]["compiled"] is False
    )


def test_the_choice_counts_one_step_in_the_singular(monkeypatch):
    monkeypatch.setattr(auto_compile, "_cpp_compiler", lambda: "/usr/bin/g++")
    _, why = choose_fit_compile("auto", 1, CPU)
    assert why.startswith("auto: 1 step, under the 8,000")
    _, why = choose_compile("auto", 1, 1, CPU)
    assert why.startswith("auto: 1 particle-point, under")


def test_graph_keys_follow_what_the_graph_depends_on():
    model, guide = paper_architecture(1)
    shapes = [(20, 784), (7, 784)]
    keys = step_graph_keys(True, IWELBO(5), model, guide, shapes, CPU)
    assert len(set(keys)) == 2
    assert keys == step_graph_keys(
        "auto", IWELBO(5), *paper_architecture(1), shapes, CPU
    )
    assert keys != step_graph_keys(None, IWELBO(5), model, guide, shapes, CPU)
    for other in (IWELBO(6), IWELBO(5, "dreg"), MIWELBO(5, 1)):
        assert step_graph_keys(True, other, model, guide, shapes, CPU) != keys
    deeper = paper_architecture(2)
    assert step_graph_keys(True, IWELBO(5), *deeper, shapes, CPU) != keys


def test_the_threshold_counts_the_graphs_to_compile(monkeypatch):
    monkeypatch.setattr(auto_compile, "_cpp_compiler", lambda: "/usr/bin/g++")
    cold, cached = AUTO_COMPILE_STEPS, AUTO_COMPILE_STEPS_CACHED
    assert choose_fit_compile("auto", 2 * cold - 1, CPU, graphs=2)[0] is False
    assert choose_fit_compile("auto", 2 * cold, CPU, graphs=2)[0] is True
    both = cold + cached
    assert choose_fit_compile("auto", both, CPU, graphs=2, cached=1)[0] is True
    assert choose_fit_compile("auto", both - 1, CPU, graphs=2, cached=1)[0] is False


def test_a_header_to_build_raises_the_threshold_of_graphs_to_compile(monkeypatch):
    monkeypatch.setattr(auto_compile, "_cpp_compiler", lambda: "/usr/bin/g++")
    monkeypatch.setattr(auto_compile, "header_built", lambda: False)
    steps = AUTO_COMPILE_STEPS + AUTO_COMPILE_STEPS_HEADER
    assert choose_fit_compile("auto", steps - 1, CPU)[0] is False
    compile, why = choose_fit_compile("auto", steps, CPU)
    assert compile is True
    assert why == (
        f"auto: {steps:,} steps (inductor's precompiled header to build first), "
        f"at least the {steps:,} from which compiling pays"
    )
    work = AUTO_COMPILE_WORK + AUTO_COMPILE_WORK_HEADER
    assert choose_compile("auto", work, 1, CPU)[0] is True
    assert choose_compile("auto", work - 1, 1, CPU)[0] is False
    # Nothing to compile (every graph cached), nothing to build.
    cached = AUTO_COMPILE_STEPS_CACHED
    assert choose_fit_compile("auto", cached, CPU, graphs=1, cached=1)[0] is True
    assert choose_fit_compile(True, 1, CPU) == (True, "as asked")


def test_the_header_is_looked_for_where_inductor_keeps_it(monkeypatch, tmp_path):
    # header_built itself: conftest patches the module's name, not this import.
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    folder = tmp_path / default_cache_dir().rpartition("/")[2] / "precompiled_headers"
    assert header_built() is False
    folder.mkdir(parents=True)
    (folder / "c0ffee.h").write_text("#include <x>\n")
    assert header_built() is False
    (folder / "c0ffee.h.gch").write_bytes(b"gpch")
    assert header_built() is True


def test_run_configs_default_to_auto_and_old_ones_keep_theirs(tmp_path):
    assert RunConfig().compile == "auto"
    assert RunConfig().make_objective().compile == "auto"
    saved = {**RunConfig().to_dict(), "compile": False}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert RunConfig.load(tmp_path).compile is False
    old_renyi = {**RunConfig(objective="renyi").to_dict(), "compile": False}
    (tmp_path / "config.json").write_text(json.dumps(old_renyi))
    assert RunConfig.load(tmp_path).make_objective().__class__.__name__ == "RenyiELBO"


@pytest.mark.parametrize("settings", [RunConfig, EvalSettings])
def test_a_switch_takes_its_words_and_refuses_other_values(settings):
    # As a settings file gives them: the words of the command line.
    assert settings(compile="on").compile is True
    assert settings(compile="off").compile is False
    assert settings(compile="auto").compile == "auto"
    assert settings(compile="aot_eager").compile == "aot_eager"  # a backend
    for wrong in ("sometimes", 1.5, 1):
        with pytest.raises(ConfigError, match="compile.*unknown; choose one of: auto"):
            settings(compile=wrong)


def test_auto_compiles_an_evaluation_whose_graph_one_compiled_before(
    choices, monkeypatch, run_dir
):
    monkeypatch.setattr(auto_compile, "AUTO_COMPILE_WORK", 10**9)
    monkeypatch.setattr(auto_compile, "AUTO_COMPILE_WORK_CACHED", 200)
    run = Run(run_dir)
    options = dict(num_samples=10, limit=20, batch_size=20)
    assert not run.evaluate(EvalSettings(**options)).compiled
    assert run.evaluate(EvalSettings(**options, compile=None)).compiled
    again = run.evaluate(EvalSettings(**options))
    assert again.compiled, again.compile_choice
    assert again.compile_choice == (
        "auto: 200 particle-points (1 of 1 graphs cached), at least the 200 from "
        "which compiling pays"
    )
    # Other batches are other graphs.
    other = run.evaluate(EvalSettings(**options | {"batch_size": 10}))
    assert not other.compiled


@pytest.mark.parametrize("began_compiled", [False, True], ids=["eager", "compiled"])
def test_a_resumed_run_keeps_the_path_it_began_on(
    choices, monkeypatch, tmp_path, began_compiled
):
    """Between a run's start and its resume inductor's cache (or the run's
    length) may move auto's choice; the resumed run keeps the one it began with."""
    data = load_dataset("mnist-mini").train[: 2 * BATCH]
    run_dir = tmp_path / "run"

    def run(epochs, resume):
        torch.manual_seed(0)
        model, guide = paper_architecture(1)
        objective = make_objective("iwae", K, compile="auto")
        options = dict(batch_size=BATCH, binarize=True, run_dir=run_dir)
        schedule = [(epochs, 1e-3)]
        return fit(
            model, guide, data, objective, schedule=schedule, resume=resume, **options
        )

    monkeypatch.setattr(
        auto_compile, "AUTO_COMPILE_STEPS", 1 if began_compiled else 10**6
    )
    assert run(1, False)[0]["compiled"] is began_compiled
    monkeypatch.setattr(
        auto_compile, "AUTO_COMPILE_STEPS", 10**6 if began_compiled else 1
    )
    history = run(2, True)
    assert [h["compiled"] for h in history] == [began_compiled] * 2
    assert "as when the run began" in history[1]["compile_choice"]


def _graph_notes(tmp_path) -> list:
    notes = tmp_path / auto_compile.GRAPHS_FILE
    return json.loads(notes.read_text()) if notes.exists() else []


def test_an_evaluation_that_falls_back_is_recorded_as_eager_and_notes_no_graph(
    choices, tmp_path
):
    # The SBN's guide draws from computed probabilities: its graph fell back, yet
    # the evaluation was recorded "compiled" and its graph noted as cached.
    run_dir = tmp_path / "sbn"
    config = dict(model="sbn", guide="sbn", estimator="vimco", compile=False)
    train_run(small_config(**config, train_limit=BATCH, test_limit=10), run_dir)
    options = dict(num_samples=4, limit=10, compile=None)
    with pytest.warns(CompileFallbackWarning, match="with tensor arguments"):
        evaluation = Run(run_dir).evaluate(EvalSettings(**options))
    assert evaluation.compiled is False and evaluation.compile_time > 0
    saved = json.loads(next(run_dir.glob("eval-test-k4*.json")).read_text())
    assert saved["compiled"] is False
    assert _graph_notes(tmp_path) == []
    # eval-nll said "0.1 s of it compiling; compiled" (inductor refuses the graph
    # after tracing it, before compiling).
    args = ["eval-nll", str(run_dir), "--k", "4", "--limit", "10", "--compile", "on"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "draws random numbers with tensor arguments" in result.output
    assert "of it tracing graphs that fell back to eager); eager" in result.output
    assert _graph_notes(tmp_path) == []


def test_a_fit_that_falls_back_notes_no_graph(choices, tmp_path):
    # fit recorded "ran eagerly" but noted the graph that fell back as cached.
    # (A backend refuses the SBN's draws after tracing, before compiling.)
    torch.manual_seed(0)
    with pytest.warns(CompileFallbackWarning, match="with tensor arguments"):
        history = train_run(
            small_config(
                model="sbn",
                guide="sbn",
                estimator="vimco",
                compile="aot_eager",
                train_limit=BATCH,
                test_limit=10,
            ),
            tmp_path / "sbn",
        )
    assert history[0]["compiled"] is False and history[0]["compile_time"] > 0
    assert _graph_notes(tmp_path) == []
