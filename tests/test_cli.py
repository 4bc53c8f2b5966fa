"""The pyro-iwae command line, through Click's CliRunner."""

import gc
import json
import shutil
import sys
from importlib.metadata import entry_points

import pytest
import torch
import torchvision
from click.testing import CliRunner

from pyro_iwae import ParticleBroadcastError, __version__
from pyro_iwae.runs import estimates as run_estimates
from pyro_iwae.runs import run as runs
from pyro_iwae.runs.checkpoints import CHECKPOINT_FILE, load_checkpoint, read_metrics
from pyro_iwae_cli import main as cli_main
from pyro_iwae_cli import progress
from pyro_iwae_cli.main import cli, main

# One short epoch: 200 training points, 50 test points, k = 2.
SMALL = [
    "--train-limit",
    "200",
    "--test-limit",
    "50",
    "--batch-size",
    "50",
    "--particles",
    "2",
    "--epochs",
    "1",
]


@pytest.fixture(autouse=True)
def _runs_dir(tmp_path_factory, monkeypatch):
    # Runs without --out or --runs-dir must not land in the working directory.
    monkeypatch.setenv("PYRO_IWAE_RUNS", str(tmp_path_factory.mktemp("default-runs")))


def invoke(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def assert_ok(result):
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output


def assert_one_line_error(result, *fragments):
    """A non-zero exit, no traceback, and one ``Error:`` line with ``fragments``."""
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        result.exception
    )
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory trained for one short epoch."""
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    result = invoke("fit", *SMALL, "--out", run_dir, "--quiet")
    assert_ok(result)
    return run_dir


@pytest.mark.parametrize("command", [[], ["fit"], ["eval-nll"], ["sample"]])
def test_help(command):
    result = invoke(*command, "--help")
    assert_ok(result)
    assert "Usage: " in result.output
    if command:
        # Every option with a value states its default.
        assert "[default:" in result.output


@pytest.mark.parametrize("command", ["eval-nll", "sample", "check-guide"])
def test_help_on_a_run_says_its_data_folder_and_other_data_are_the_defaults(
    command,
):
    # The help said --data-dir defaults to $PYRO_IWAE_DATA, else ~/.cache: it is
    # the run's recorded folder; and --dataset only "a data file's new path".
    text = " ".join(invoke(command, "--help").output.split())
    assert "[default: ($PYRO_IWAE_DATA" not in text
    # Then it said "its fit's --data-dir, else $PYRO_IWAE_DATA", as if today's
    # $PYRO_IWAE_DATA counted: a run records the folder its fit read.
    assert (
        "the folder the run's fit read, recorded in its config.json; for a run "
        "that recorded none, $PYRO_IWAE_DATA"
    ) in text
    if command == "eval-nll":
        assert "other data of the same width: evaluated" in text
        assert "-on-NAME.json" in text
    if command == "sample":
        assert "other data of the same width: its test points are" in text


def test_hidden_sizes_with_an_empty_item_are_refused():
    # '20,,3' was read as [20, 3] and ',' as no hidden layers, without a word.
    for value in ("20,,3", ",", "20,"):
        result = invoke("fit", "--hidden", value, "--print-config")
        assert_one_line_error(result, repr(value), "comma-separated list")
    for value, sizes in (("", []), ("20, 3", [20, 3])):
        result = invoke("fit", "--hidden", value, "--print-config")
        assert_ok(result)
        assert json.loads(result.output)["hidden"] == sizes


def test_fit_help_explains_options():
    text = invoke("fit", "--help").output
    for option in ("--particles", "--estimator", "--schedule", "--stages", "--resume"):
        assert option in text
    assert "paper uses 20" in text and "PYRO_IWAE_RUNS" in text


@pytest.mark.parametrize("args, code", [(["--version"], 0), (["fit", "--k", "x"], 2)])
def test_console_script_keeps_freed_memory_and_freezes_what_is_left(
    monkeypatch, args, code
):
    # Freed memory kept for reuse (bench/allocator.py); the shutdown then skips
    # walking torch's objects (bench/shutdown.py).
    (script,) = entry_points(group="console_scripts", name="pyro-iwae")
    assert script.value == "pyro_iwae_cli.main:main"
    monkeypatch.setattr(sys, "argv", ["pyro-iwae", *args])
    calls = []
    # Recorded, not made: the thresholds would hold for the rest of this process.
    monkeypatch.setattr(cli_main, "keep_freed_memory", lambda: calls.append(1))
    gc.unfreeze()
    try:
        with pytest.raises(SystemExit) as exit_:
            main()
        assert exit_.value.code == code
        assert calls == [1]
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_version():
    result = invoke("--version")
    assert_ok(result)
    assert __version__ in result.output


def test_fit_writes_run(run):
    for name in ("config.json", "metrics.jsonl", CHECKPOINT_FILE):
        assert (run / name).is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["num_particles"] == 2 and config["train_limit"] == 200
    (metrics,) = read_metrics(run)
    assert metrics["test_points"] == 50 and metrics["steps"] == 4


def test_fit_summary_and_default_run_dir(tmp_path):
    result = invoke("fit", *SMALL, "--runs-dir", tmp_path, "--objective", "vae")
    assert_ok(result)
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.endswith("-mnist-mini-vae-k2")
    assert f"run: {run_dir}" in result.output
    assert "train bound" in result.output and "test bound" in result.output
    assert "epoch 1:" in result.output  # the per-epoch line, on stderr


def test_eval_nll(run):
    result = invoke("eval-nll", run, "--k", 10, "--limit", 20, "--quiet")
    assert_ok(result)
    assert "NLL = " in result.output and "k=10" in result.output
    assert "20 points" in result.output and "active units: z1 " in result.output
    report = json.loads((run / "eval-test-k10.json").read_text())
    assert report["points"] == 20 and report["k"] == 10
    assert 0 < report["nll"] < 500 and report["stderr"] > 0
    assert 0 <= report["active_units"]["z1"] <= report["latent_units"]["z1"] == 50
    per_point = (run / "estimates-test-k10.txt").read_text().split()
    assert len(per_point) == 20 and "estimates-test-k10.txt" in result.output
    mean = -sum(float(v) for v in per_point) / 20
    assert abs(mean - report["nll"]) < 1e-5
    train = invoke("eval-nll", run, "--k", 3, "--limit", 5, "--split", "train")
    assert_ok(train)
    assert (run / "eval-train-k3.json").is_file()


def test_eval_nll_says_whether_it_compiled(run):
    result = invoke("eval-nll", run, "--k", 10, "--limit", 20, "--quiet")
    assert_ok(result)
    assert "; eager (auto: 200 particle-points, under the 3,000,000" in result.output
    report = json.loads((run / "eval-test-k10.json").read_text())
    assert report["compiled"] is False and report["compile_choice"].startswith("auto")
    result = invoke("eval-nll", run, "--k", 10, "--limit", 20, "--compile", "off")
    assert_ok(result)
    assert [line for line in result.output.splitlines() if line.startswith("time")][
        0
    ].endswith("; eager")
    report = json.loads((run / "eval-test-k10.json").read_text())
    assert report["compile_choice"] == "as asked"


def test_eval_nll_with_sequential_particles(run, monkeypatch):
    """--sequential-particles draws the particles one at a time: the same
    estimator, so the estimates agree with the vectorized ones within their
    noise (not bit for bit: the draws take the random stream in another order)."""
    args = ("eval-nll", run, "--k", 50, "--limit", 10, "--quiet")
    estimates, stderrs = [], []
    # Each keeps its own files: the sequential one does not replace the other.
    names = ("eval-test-k50.json", "eval-test-k50-n10-seed0-batch100-sequential.json")
    for extra, name in zip(((), ("--sequential-particles",)), names, strict=True):
        result = invoke(*args, *extra)
        assert_ok(result)
        report = json.loads((run / name).read_text())
        assert report["sequential_particles"] is bool(extra)
        assert report["compiled"] is False
        estimates.append(runs.read_estimates(run, report))
        rows = (run / report["diagnostics_file"]).read_text().splitlines()[1:]
        ess = torch.tensor([float(row.split()[0]) for row in rows])
        stderrs.append(((50 / ess - 1) / 49).clamp(min=0).sqrt().double())
    noise = (stderrs[0] ** 2 + stderrs[1] ** 2).sqrt()
    assert ((estimates[0] - estimates[1]).abs() < 4 * noise + 0.05).all()
    first = json.loads((run / names[0]).read_text())
    assert first["sequential_particles"] is False
    assert not torch.equal(estimates[0], estimates[1])
    assert_one_line_error(
        invoke(*args, "--sequential-particles", "--compile", "on"),
        "--sequential-particles draws the particles one at a time",
        "--compile",
    )
    assert_one_line_error(
        invoke(*args[:2], "--method", "ais", "--sequential-particles"),
        "--sequential-particles applies to --method iwae",
    )
    # A model that does not broadcast over the particles is told of the option.
    estimate = run_estimates.log_likelihood_with_diagnostics

    def flat_only(*a, vectorize_particles=True, **o):
        if vectorize_particles:
            raise ParticleBroadcastError.of_program(
                "shape '[10, 784]' is invalid", 2, 1, 1, "log_likelihood"
            )
        return estimate(*a, vectorize_particles=False, **o)

    monkeypatch.setattr(run_estimates, "log_likelihood_with_diagnostics", flat_only)
    error = assert_one_line_error(
        invoke(*args), "or pass --sequential-particles to eval-nll to draw"
    )
    assert "vectorize_particles=False" not in error
    assert_ok(invoke(*args, "--sequential-particles"))


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory):
    """A run of a model that runs with one particle but does not broadcast over
    several (check_guide_modules:build_flat_model), trained with one."""
    run_dir = tmp_path_factory.mktemp("runs") / "flat"
    programs = ["--model", "check_guide_modules:build_flat_model"]
    programs += ["--guide", "user_guides:build_guide", "--compile", "off"]
    result = invoke("fit", *SMALL, *programs, "--particles", 1, "--out", run_dir)
    assert_ok(result)
    return run_dir


def test_fit_on_a_model_that_does_not_broadcast_offers_no_option_it_lacks(
    flat_run, tmp_path
):
    # It offered --sequential-particles, an option of eval-nll alone.
    config = json.loads((flat_run / "config.json").read_text())
    programs = ["--model", config["model"], "--guide", config["guide"]]
    result = invoke("fit", *SMALL, *programs, "--compile", "off", "--out", tmp_path)
    error = assert_one_line_error(result, "not x.view(batch, -1))")
    assert error.endswith("not x.view(batch, -1))"), error
    assert "sequential" not in error and "vectorize_particles=False" not in error


def test_ais_on_a_model_that_does_not_broadcast_points_to_iwae(flat_run):
    # It offered --sequential-particles, which --method ais refuses.
    args = ("eval-nll", flat_run, "--limit", 3, "--quiet")
    error = assert_one_line_error(
        invoke(*args, "--method", "ais", "--ais-steps", 2, "--chains", 2),
        "AIS runs its chains in one batch and has no --sequential-particles; "
        "estimate with --method iwae --sequential-particles instead",
    )
    assert "log_likelihood" not in error and "or pass" not in error
    # It said "of size 4", the tuning chains', to a user who asked for 2 chains.
    assert "particle dimension, one per chain, (use" in error, error
    assert_one_line_error(
        invoke(*args, "--k", 2), "or pass --sequential-particles to eval-nll"
    )
    assert_ok(invoke(*args, "--k", 2, "--sequential-particles"))


def test_eval_nll_reports_diagnostics_per_point(run):
    result = invoke("eval-nll", run, "--k", 40, "--limit", 12, "--quiet")
    assert_ok(result)
    line = next(x for x in result.output.splitlines() if x.startswith("diagnostics"))
    assert "median ESS" in line and "of 40 samples" in line and "k-hat" in line
    report = json.loads((run / "eval-test-k40.json").read_text())
    assert report["method"] == "iwae"
    rows = (run / report["diagnostics_file"]).read_text().splitlines()
    assert rows[0] == "# ess khat" and len(rows) == 13
    ess = [float(row.split()[0]) for row in rows[1:]]
    assert all(1 <= e <= 40 for e in ess)
    # The median of 12 points: the mean of the middle two.
    assert report["diagnostics"]["ess_median"] == pytest.approx(
        (sorted(ess)[5] + sorted(ess)[6]) / 2, rel=1e-4
    )


def test_eval_nll_with_ais(run):
    result = invoke(
        "eval-nll", run, "--method", "ais", "--ais-steps", 3, "--chains", 2,
        "--limit", 5, "--quiet",
    )  # fmt: skip
    assert_ok(result)
    assert "AIS, 3 steps x 2 chains" in result.output
    assert "HMC acceptance" in result.output
    report = json.loads((run / "eval-test-ais3x2.json").read_text())
    assert report["method"] == "ais" and report["ais_steps"] == 3
    assert report["chains"] == 2 and report["points"] == 5
    assert len((run / report["estimates_file"]).read_text().split()) == 5
    rows = (run / report["diagnostics_file"]).read_text().splitlines()
    assert rows[0] == "# stderr ess khat acceptance" and len(rows) == 6
    assert_one_line_error(invoke("eval-nll", run, "--method", "ais", "--k", 9), "--k")
    assert_one_line_error(invoke("eval-nll", run, "--chains", 4), "--method ais")


def _strict(constant):
    raise AssertionError(f"{constant} is not JSON")


def test_ais_with_one_step_reports_no_acceptance_and_writes_strict_json(run):
    # One step makes no HMC move: it printed "mean HMC acceptance nan" and wrote
    # "acceptance_mean": NaN, which strict JSON readers refuse.
    result = invoke(
        "eval-nll", run, "--method", "ais", "--ais-steps", 1, "--chains", 2,
        "--limit", 3, "--quiet",
    )  # fmt: skip
    assert_ok(result)
    assert "nan" not in result.output.lower()
    assert "no HMC moves with --ais-steps 1" in result.output
    text = (run / "eval-test-ais1x2.json").read_text()
    report = json.loads(text, parse_constant=_strict)
    assert report["diagnostics"]["acceptance_mean"] is None
    # The help said "one HMC move ... each" step: there are steps - 1.
    help_text = " ".join(invoke("eval-nll", "--help").output.split())
    assert "N steps make N - 1 HMC moves of 10 leapfrog steps each" in help_text


def test_eval_nll_of_one_point_says_it_has_no_standard_error(run):
    # It printed "(mean ± standard error; k=1, test split, 1 points)" with no
    # standard error shown.
    result = invoke("eval-nll", run, "--k", 1, "--limit", 1, "--quiet")
    assert_ok(result)
    (line,) = [line for line in result.output.splitlines() if line.startswith("NLL")]
    assert line.endswith(" nats (k=1, test split, 1 point: no standard error)")
    args = ("--method", "ais", "--ais-steps", 1, "--chains", 1)
    result = invoke("eval-nll", run, *args, "--limit", 1, "--quiet")
    assert_ok(result)
    assert "(AIS, 1 step x 1 chain, test split, 1 point: no " in result.output
    assert "median ESS 1.0 of 1 chain;" in result.output


def test_eval_nll_finds_latest_run(tmp_path):
    env = {"PYRO_IWAE_RUNS": str(tmp_path)}
    for seed in (0, 1):
        assert_ok(invoke("fit", *SMALL, "--seed", seed, "--quiet", env=env))
    runs = sorted(tmp_path.iterdir())
    latest = max(runs, key=lambda p: (p / CHECKPOINT_FILE).stat().st_mtime)
    result = invoke("eval-nll", "--k", 2, "--limit", 5, "--quiet", env=env)
    assert_ok(result)
    assert f"run: {latest}" in result.output
    assert (latest / "eval-test-k2.json").is_file()


def test_eval_nll_and_sample_find_the_latest_run_that_has_a_checkpoint(run, tmp_path):
    # A fit killed before its first checkpoint was taken as the latest run:
    # "no checkpoint ...; start a new run (without resume)", fit's advice.
    shutil.copytree(run, tmp_path / "a", ignore=shutil.ignore_patterns("eval-*"))
    (tmp_path / "b").mkdir()
    shutil.copy(run / "config.json", tmp_path / "b")
    result = invoke("eval-nll", "--runs-dir", tmp_path, "--k", 2, "--limit", 2)
    assert_ok(result)
    assert f"run: {tmp_path / 'a'}" in result.output
    result = invoke("sample", "--runs-dir", tmp_path, "--n", 2)
    assert_ok(result)
    assert f"wrote {tmp_path / 'a' / 'samples.png'}" in result.output
    shutil.rmtree(tmp_path / "a")
    assert_one_line_error(
        invoke("eval-nll", "--runs-dir", tmp_path, "--k", 2),
        f"no run in {tmp_path} has finished an epoch",
    )


def test_sample_writes_pngs(run, tmp_path):
    result = invoke("sample", run, "--n", 10)
    assert_ok(result)
    for name in ("samples.png", "samples-reconstructions.png", "samples-curves.png"):
        assert (run / name).read_bytes()[:4] == b"\x89PNG"
        assert str(run / name) in result.output
    out = tmp_path / "figs" / "s.png"
    assert_ok(invoke("sample", run, "--out", out))
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "s-curves.png",
        "s-reconstructions.png",
        "s.png",
    ]


def test_sample_draws_its_pictures_from_a_run_with_broken_metrics(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "metrics.jsonl").write_text("{broken\n")
    out = tmp_path / "s.png"
    result = invoke("sample", copy, "--out", out)
    assert result.exit_code == 0 and "Traceback" not in result.output
    assert "Warning: no curves drawn: cannot read" in result.output
    assert sorted(p.name for p in tmp_path.glob("s*.png")) == [
        "s-reconstructions.png",
        "s.png",
    ]


def test_resume_after_interrupt(tmp_path, monkeypatch):
    args = [*SMALL[:-1], "2", "--quiet"]
    assert_ok(invoke("fit", *args, "--out", tmp_path / "full"))

    def interrupt(self, metrics):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(progress.FitProgress, "on_epoch_end", interrupt)
        cut = invoke("fit", *args, "--out", tmp_path / "cut")
    assert cut.exit_code == 130 and "Traceback" not in cut.output
    assert f"fit --resume --out {tmp_path / 'cut'}" in cut.output
    assert len(read_metrics(tmp_path / "cut")) == 1

    result = invoke("fit", "--resume", "--out", tmp_path / "cut")
    assert_ok(result)
    assert [m["epoch"] for m in read_metrics(tmp_path / "cut")] == [1, 2]
    full = load_checkpoint(tmp_path / "full" / CHECKPOINT_FILE)
    resumed = load_checkpoint(tmp_path / "cut" / CHECKPOINT_FILE)
    for part in ("model", "guide"):
        for key, value in full[part].items():
            assert torch.equal(value, resumed[part][key]), key
    # Resuming a finished run trains nothing more.
    done = invoke("fit", "--resume", "--out", tmp_path / "cut")
    assert_ok(done)
    assert "nothing left to train" in done.output
    assert "trained 2 epochs" not in done.output  # this call trained none
    assert len(read_metrics(tmp_path / "cut")) == 2
    # Nor can it be cut short: one line says how many epochs it has.
    fewer = invoke("fit", "--resume", "--out", tmp_path / "cut", "--epochs", 1)
    assert_one_line_error(fewer, "has trained 2 epochs", "drop --epochs")
    assert len(read_metrics(tmp_path / "cut")) == 2


@pytest.mark.parametrize("command", ["eval-nll", "sample"])
def test_ctrl_c_ends_a_command_with_one_line_and_code_130(run, monkeypatch, command):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    before = sorted(p.name for p in run.iterdir())
    monkeypatch.setattr(runs.Run, "load", interrupt)
    monkeypatch.setattr(runs.Run, "evaluate", interrupt)
    result = invoke(command, run)
    assert result.exit_code == 130, result.output
    assert "Traceback" not in result.output and "Aborted" not in result.output
    assert "Interrupted; run the same command again" in result.output
    assert sorted(p.name for p in run.iterdir()) == before


# -- errors: one line, no traceback, a non-zero exit -------------------------


def test_cuda_absent(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for command in (["fit"], ["eval-nll"], ["sample"]):
        assert_one_line_error(invoke(*command, "--cuda"), "CUDA", "drop --cuda")
    # Asked for by a settings file, not an option: it said "drop --cuda".
    (tmp_path / "gpu.json").write_text('{"device": "cuda"}')
    result = invoke("fit", "--config", tmp_path / "gpu.json", "--print-config")
    assert_one_line_error(result, 'drop "device": "cuda" (in gpu.json)')


def test_bad_numbers_and_names():
    assert_one_line_error(invoke("fit", "--particles", 0), "--particles", "0")
    assert_one_line_error(invoke("eval-nll", "--k", 0), "--k", "0")
    assert_one_line_error(invoke("fit", "--dataset", "cifar"), "cifar", "mnist-mini")
    assert_one_line_error(
        invoke("fit", "--schedule", "paper", "--epochs", 3), "--stages"
    )
    assert_one_line_error(invoke("fit", "--stages", 3), "--schedule paper")
    assert_one_line_error(
        invoke("fit", "--objective", "renyi", "--alpha", 1), "--objective vae"
    )
    assert_one_line_error(
        invoke("fit", "--objective", "vae", "--estimator", "dreg"), "--estimator"
    )
    assert_one_line_error(invoke("fit", "--groups", 4), "--objective miwae or piwae")
    assert_one_line_error(invoke("fit", "--beta", 0.1), "--objective ciwae")


def test_missing_data(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    result = invoke("fit", "--dataset", "omniglot", "--data-dir", missing, "--quiet")
    assert_one_line_error(result, "chardata.mat", "--data-dir")
    # No network: every download mirror refuses the connection.
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    result = invoke(
        "fit", "--dataset", "mnist", "--data-dir", missing, "--runs-dir", tmp_path
    )
    assert_one_line_error(result, "could not download", "--data-dir")
    # The failed run leaves no empty run directory behind, nor the folders the
    # failed download made.
    assert list(tmp_path.iterdir()) == []


def test_missing_run_dirs(tmp_path):
    missing = tmp_path / "missing"
    for command in ("eval-nll", "sample"):
        assert_one_line_error(invoke(command, missing), "does not exist")
    # The advice did not name --runs-dir.
    for folder in (tmp_path / "none", tmp_path):
        assert_one_line_error(
            invoke("eval-nll", "--runs-dir", folder),
            "no run found",
            "or set --runs-dir to the folder of runs to look in",
        )
    assert_one_line_error(invoke("fit", "--resume", "--out", missing), "does not exist")
    assert_one_line_error(
        invoke("eval-nll", tmp_path), "not a run directory", "config.json"
    )


def test_paths_that_cannot_be_written(run, tmp_path):
    """A file where a folder should be (as root, the one unwritable place that
    tests can make): one line naming the path, and the file left alone."""
    blocker = tmp_path / "file"
    blocker.write_text("kept")
    for command in (
        ["fit", *SMALL, "--quiet", "--out", blocker / "run"],
        ["fit", *SMALL, "--quiet", "--runs-dir", blocker / "runs"],
        ["sample", run, "--n", 2, "--out", blocker / "figs" / "s.png"],
    ):
        assert_one_line_error(invoke(*command), str(blocker), "you can write to")
    assert sorted(tmp_path.iterdir()) == [blocker]
    assert blocker.read_text() == "kept"


def test_sample_out_must_name_a_png(run, tmp_path):
    # ".png" alone said ".png does not end in .png".
    for name in ("samples", "samples.jpg", ".png"):
        result = invoke("sample", run, "--n", 2, "--out", tmp_path / name)
        assert_one_line_error(result, "--out", "is no file name ending in .png")
    assert not any(tmp_path.iterdir())


def test_broken_checkpoints(run, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((run / "config.json").read_bytes())
    assert_one_line_error(
        invoke("fit", "--resume", "--out", broken), "no checkpoint", "new run"
    )
    assert_one_line_error(invoke("eval-nll", broken), "no checkpoint")

    data = (run / CHECKPOINT_FILE).read_bytes()
    (broken / CHECKPOINT_FILE).write_bytes(data[: len(data) // 2])
    for command in (["eval-nll", broken], ["sample", broken]):
        assert_one_line_error(invoke(*command), "truncated or corrupt", "new run")
    assert_one_line_error(
        invoke("fit", "--resume", "--out", broken), "truncated or corrupt"
    )

    other = tmp_path / "other"
    assert_ok(invoke("fit", *SMALL, "--layers", 2, "--out", other, "--quiet"))
    (broken / CHECKPOINT_FILE).write_bytes((other / CHECKPOINT_FILE).read_bytes())
    assert_one_line_error(invoke("eval-nll", broken), "another architecture")


def test_existing_run_and_conflicting_resume(run):
    assert_one_line_error(invoke("fit", *SMALL, "--out", run), "--resume")
    assert_one_line_error(
        invoke("fit", "--resume", "--out", run, "--particles", 7),
        "--particles 7",
        "differs",
    )


def test_eval_nll_warns_in_one_line_of_estimates_that_are_not_finite(run, monkeypatch):
    """The library's warning (tests/test_evaluation.py makes it for real) reaches
    the user as one line, and the evaluation still writes its files."""
    with_diagnostics = run_estimates.log_likelihood_with_diagnostics

    def some_not_finite(*args, **kwargs):
        diagnostics = with_diagnostics(*args, **kwargs)
        diagnostics.log_likelihood[:2] = float("nan")
        return diagnostics

    monkeypatch.setattr(
        run_estimates, "log_likelihood_with_diagnostics", some_not_finite
    )
    result = invoke("eval-nll", run, "--k", 5, "--limit", 10, "--quiet")
    assert_ok(result)
    warnings = [line for line in result.output.splitlines() if "arning" in line]
    assert warnings == [
        "Warning: 2 of 10 log-likelihood estimates are not finite (nan or inf): "
        "the model or guide gives invalid log-densities for those points; check "
        "the data against the likelihood's support"
    ], result.output
    assert (run / "estimates-test-k5.txt").read_text().count("nan") == 2


def test_checkpoint_with_values_that_are_not_finite(run, tmp_path):
    altered = tmp_path / "altered"
    altered.mkdir()
    (altered / "config.json").write_bytes((run / "config.json").read_bytes())
    checkpoint = torch.load(run / CHECKPOINT_FILE, weights_only=True)
    name, value = next(
        (n, v) for n, v in checkpoint["guide"].items() if v.is_floating_point()
    )
    checkpoint["guide"][name] = torch.full_like(value, float("nan"))
    torch.save(checkpoint, altered / CHECKPOINT_FILE)
    for command in (["eval-nll", altered], ["sample", altered]):
        assert_one_line_error(invoke(*command), "not finite", repr(name), "new run")
    assert_one_line_error(invoke("fit", "--resume", "--out", altered), "not finite")


def test_library_advice_in_python_terms_reads_as_options():
    # Library messages named CLI options (--data-dir, --dataset, --jobs 1) to
    # Python callers; they name arguments now, which cli_text turns into options,
    # paths included.
    from pyro_iwae_cli.options import cli_text

    assert (
        cli_text("pass data_dir=FOLDER, a folder") == "pass --data-dir FOLDER, a folder"
    )
    assert cli_text("as other data with dataset='/a/b.npy'") == (
        "as other data with --dataset /a/b.npy"
    )
    assert cli_text("use jobs=1, or start") == "use --jobs 1, or start"
