"""RunConfig: which settings go together, for Python users and the CLI alike."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from small_run import linear_gaussian_config

from pyro_iwae import ConfigError, EvalSettings, RunConfig, RunError, train_run
from pyro_iwae.runs.config import CONFIG_FILE
from pyro_iwae_cli.main import _OPTION_NAMES, cli

# RunConfig settings that do not go together, the same as fit options, and
# the start of the library's message.
CLASHES = [
    (
        {"schedule": "paper", "epochs": 3},
        ["--schedule", "paper", "--epochs", "3"],
        "epochs applies to schedule constant; use stages with schedule paper",
    ),
    ({"stages": 3}, ["--stages", "3"], "stages applies to schedule paper"),
    (
        {"objective": "vae", "estimator": "dreg"},
        ["--objective", "vae", "--estimator", "dreg"],
        "estimator applies to objective iwae, miwae, piwae or ciwae",
    ),
    (
        {"num_groups": 4},
        ["--groups", "4"],
        "num_groups applies to objective miwae or piwae",
    ),
    ({"beta": 0.1}, ["--beta", "0.1"], "beta applies to objective ciwae"),
    (
        {"stochastic_layers": 3},
        ["--layers", "3"],
        "stochastic_layers of the paper's networks is 1 or 2, got 3",
    ),
    ({"alpha": 0.5}, ["--alpha", "0.5"], "alpha applies to objective renyi"),
    (
        {"objective": "renyi", "alpha": 1.0},
        ["--objective", "renyi", "--alpha", "1"],
        "alpha 1 is the ordinary ELBO: use objective vae",
    ),
]


@pytest.mark.parametrize("settings, options, message", CLASHES)
def test_clashing_settings_fail_alike_in_python_and_cli(settings, options, message):
    with pytest.raises(ConfigError) as caught:
        RunConfig(**settings)
    error = caught.value
    assert isinstance(error, ValueError)
    assert str(error).startswith(message) and "\n" not in str(error)
    result = CliRunner().invoke(cli, ["fit", *options])
    assert result.exit_code == 2 and "Traceback" not in result.output
    # The CLI writes the library's message, naming its options.
    assert f"Error: {error.render(_OPTION_NAMES)}\n" in result.output


def test_a_misspelt_choice_is_named_before_the_settings_it_leaves_unused():
    """objective 'ciwa' with a beta: the typo is the error, not the beta (which
    would read 'applies to objective ciwae; drop it'); the same for eval-nll's
    method (the command line's choices are Click's)."""
    with pytest.raises(ConfigError, match="^objective 'ciwa' is unknown"):
        RunConfig(objective="ciwa", beta=0.3)
    with pytest.raises(ConfigError, match="^method 'bdmc' is unknown"):
        EvalSettings(method="bdmc", num_samples=5)


def test_settings_given_at_their_default_clash_when_named():
    config = RunConfig(schedule="paper", epochs=5)  # epochs at its default
    with pytest.raises(ConfigError, match="epochs applies to schedule constant"):
        config.validate(given={"epochs"})
    with pytest.raises(ConfigError, match="estimator applies"):
        RunConfig(objective="vae").validate(given=["estimator"])
    config.validate(given={"stages", "schedule", "estimator"})


def test_compile_off_may_be_pinned_where_nothing_compiles():
    # A script or grid may say compile off for every run: it is what happens.
    config = RunConfig(objective="vae", compile=False)
    config.validate(given=["objective", "compile"])
    EvalSettings(method="ais", compile=False).validate(given=["method", "compile"])
    with pytest.raises(ConfigError, match="compile applies to objective iwae"):
        RunConfig(objective="vae", compile=True).validate(given=["compile"])
    with pytest.raises(ConfigError, match="compile applies to method iwae"):
        EvalSettings(method="ais", compile=True).validate(given=["compile"])
    result = CliRunner().invoke(cli, ["fit", "--objective", "renyi", "--compile"])
    assert result.exit_code == 2 and "--compile applies to --objective" in result.output


def test_settings_that_go_together():
    assert RunConfig().unused_settings() == [
        "stages",
        "num_groups",
        "beta",
        "alpha",
        "sigma",
        "test_fraction",  # the built-in set holds its own test set
    ]
    for settings in (
        {"schedule": "paper", "stages": 2},
        {"objective": "miwae", "num_groups": 2, "estimator": "dreg"},
        {"objective": "ciwae", "beta": 0.1, "estimator": "stl"},
        {"objective": "renyi", "alpha": 0.5},
        {"objective": "vae", "num_particles": 3},
    ):
        RunConfig(**settings)
    assert RunConfig(objective="renyi").unused_settings() == [
        "stages",
        "estimator",
        "num_groups",
        "beta",
        "sigma",
        "compile",
        "test_fraction",
    ]


def test_out_of_range_settings():
    for settings, match in (
        ({"num_particles": 0}, "num_particles"),
        ({"schedule": "paper", "stages": 9}, "stages"),
        ({"epochs": 0}, "epochs"),
        ({"schedule": "cosine"}, "schedule"),
        ({"objective": "nope"}, "objective"),
        ({"estimator": "nope"}, "estimator"),
        ({"objective": "ciwae", "beta": 2.0}, "beta"),
    ):
        with pytest.raises(ValueError, match=match):
            RunConfig(**settings)


def test_train_run_checks_a_config_changed_after_it_was_made(tmp_path):
    config = RunConfig()
    config.beta = 0.2
    with pytest.raises(ConfigError, match="beta applies to objective ciwae"):
        train_run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_load_reads_settings_without_effect_as_defaults(tmp_path):
    # pyro-iwae 0.1.0 saved the CLI's 40 epochs with the paper schedule.
    values = {**RunConfig(schedule="paper").to_dict(), "epochs": 40}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(values))
    assert RunConfig.load(tmp_path) == RunConfig(schedule="paper")
    values = {**RunConfig().to_dict(), "objective": "renyi", "alpha": 1.0}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(values))
    with pytest.raises(RunError, match="do not go together.*ordinary ELBO"):
        RunConfig.load(tmp_path)


def _print_config(*args):
    result = CliRunner().invoke(cli, ["fit", *map(str, args), "--print-config"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_config_file_and_print_config_round_trip(tmp_path):
    """--print-config prints the settings in config.json's keys, the command's
    own defaults included; a file of them gives them back, options override
    it, and nothing is trained or written."""
    printed = _print_config("--particles", 3, "--runs-dir", tmp_path / "runs")
    assert printed == RunConfig(num_particles=3, epochs=40).to_dict()
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(printed))
    assert _print_config("--config", path) == printed
    assert _print_config("--config", path, "--lr", 0.01)["lr"] == 0.01
    toml = tmp_path / "settings.toml"
    toml.write_text('objective = "vae"\nnum_particles = 2\nschedule = "paper"\n')
    from_toml = _print_config("--config", toml)
    assert from_toml["objective"] == "vae" and from_toml["stages"] == 8
    assert from_toml["epochs"] == RunConfig().epochs  # 40 applies to constant only
    assert not (tmp_path / "runs").exists()
    # The file's settings are checked as options are, named as the file's keys
    # (there is no option to drop); options given as such keep their names.
    toml.write_text('schedule = "paper"\nepochs = 3\n')
    result = CliRunner().invoke(cli, ["fit", "--config", str(toml)])
    assert result.exit_code == 2
    # "(in settings.toml)" once, not after every setting the message names.
    assert (
        f"Error: epochs (in {toml.name}) applies to schedule constant; use "
        "--stages with schedule paper"
    ) in result.output
    toml.write_text("num_particles = 3\n")
    result = CliRunner().invoke(cli, ["fit", "--config", str(toml), "--beta", "0.3"])
    assert "Error: --beta applies to --objective ciwae" in result.output
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    result = CliRunner().invoke(cli, ["fit", "--config", str(broken)])
    assert result.exit_code != 0 and "cannot read settings file" in result.output


def test_a_built_in_sets_test_fraction_is_refused_before_any_data_are_read(
    tmp_path, monkeypatch
):
    # Refused only once the data were loaded: --print-config printed a config
    # that fit then refused, merge accepted it, and without the data fit tried
    # a download first; a settings file's value was named --test-fraction.
    monkeypatch.setenv("PYRO_IWAE_DATA", str(tmp_path / "no-data"))
    with pytest.raises(ConfigError, match="test_fraction applies to data without"):
        RunConfig.merge({"dataset": "mnist", "test_fraction": 0.2})
    with pytest.raises(ConfigError, match="mnist has its own: drop it"):
        RunConfig(dataset="mnist", test_fraction=0.2)
    for options in (["--print-config"], ["--dataset", "mnist"]):
        result = CliRunner().invoke(
            cli, ["fit", *options, "--test-fraction", "0.2", "--out", str(tmp_path)]
        )
        assert result.exit_code == 2
        assert "Error: --test-fraction applies to data without a test set; " in (
            result.output
        )
    # Named, it is refused at its default too, as sigma is.
    result = CliRunner().invoke(
        cli, ["fit", "--print-config", "--test-fraction", "0.1"]
    )
    assert "Error: --test-fraction applies to data" in result.output
    settings = tmp_path / "tf.json"
    settings.write_text(json.dumps({"dataset": "mnist", "test_fraction": 0.2}))
    result = CliRunner().invoke(cli, ["fit", "--config", str(settings)])
    assert (
        "Error: test_fraction (in tf.json) applies to data without a test set; "
        "dataset mnist has its own: drop it"
    ) in result.output
    assert not (tmp_path / "no-data").exists()
    # A run of an older version that stored one still loads, without it.
    run = tmp_path / "old"
    run.mkdir()
    values = {**RunConfig(dataset="mnist").to_dict(), "test_fraction": 0.2}
    (run / CONFIG_FILE).write_text(json.dumps(values))
    assert RunConfig.load(run) == RunConfig(dataset="mnist")


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"epochs": 1.5}, "epochs (in settings.json) must be an integer, got 1.5"),
        ({"batch_size": 50.5}, "batch_size (in settings.json) must be an integer"),
        ({"seed": 1.7}, "seed (in settings.json) must be an integer, got 1.7"),
        ({"epochs": "two"}, "epochs (in settings.json) must be an integer"),
        ({"lr": "1e-3"}, "lr (in settings.json) must be a finite number, got '1e-3'"),
        # An infinite learning rate passed "> 0", then diverged.
        (
            {"lr": float("inf")},
            "lr (in settings.json) must be a finite number, got inf",
        ),
        ({"beta": float("nan")}, "beta (in settings.json) must be a finite number"),
        ({"epochs": float("inf")}, "epochs (in settings.json) must be an integer"),
        # A null gave a traceback (dataset, model, epochs), or training's (lr).
        ({"dataset": None}, "dataset (in settings.json) takes no null (None)"),
        ({"model": None}, "model (in settings.json) takes no null (None)"),
        ({"lr": None}, "lr (in settings.json) takes no null (None)"),
        ({"hidden": "200,200"}, "hidden (in settings.json) takes a list of sizes"),
        # A number or a mapping: "'float' object is not iterable", a traceback.
        ({"hidden": 2.5}, "hidden (in settings.json) takes a list of sizes"),
        ({"hidden": {"a": 1}}, "hidden (in settings.json) takes a list of sizes"),
    ],
)
def test_a_settings_file_of_the_wrong_types_is_refused_in_one_line(
    tmp_path, settings, message
):
    # epochs 1.5 trained one epoch; batch_size 50.5 and seed 1.7 ended in tracebacks.
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(settings))
    result = CliRunner().invoke(cli, ["fit", "--config", str(path), "--quiet"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"Error: {message}" in result.output
    with pytest.raises(ConfigError):
        RunConfig(**settings)


def test_a_settings_files_hidden_of_one_number_is_one_layer(tmp_path):
    # "hidden": 100 ended in a traceback ('int' object is not iterable).
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"hidden": 100}))
    assert _print_config("--config", path)["hidden"] == [100]
    assert RunConfig(hidden=(50, 20)).hidden == [50, 20]


def test_numbers_of_other_numeric_types_are_taken():
    import numpy as np

    config = RunConfig(epochs=np.int64(3), lr=np.float32(1e-3))
    assert config.epochs == 3 and RunConfig(lr=1).lr == 1


def test_unknown_settings_name_the_field_meant_or_the_version(tmp_path):
    """A settings file's misspelt key gets the field it may mean; a run's
    config.json with a field this version lacks gets the version advice."""
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"particles": 3, "zzz": 1}))
    result = CliRunner().invoke(cli, ["fit", "--config", str(path)])
    errors = [line for line in result.output.splitlines() if "Error" in line]
    assert result.exit_code != 0 and errors == [
        "Error: unknown run settings particles (num_particles?), zzz; use the "
        "names of a run's config.json, the fields of RunConfig"
    ]
    with pytest.raises(RunError, match=r"unknown run settings epoch \(epochs\?\)"):
        RunConfig.from_dict({"epoch": 2})
    RunConfig().save(tmp_path)
    values = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**values, "zzz": 1}))
    with pytest.raises(RunError, match="settings zzz: .* another pyro-iwae version"):
        RunConfig.load(tmp_path)


def test_a_settings_file_naming_the_commands_own_options_says_so(tmp_path):
    # Was "unknown run settings out (guide?), quiet": a guess that misled.
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"epochs": 1, "out": "runs/x", "quiet": True}))
    result = CliRunner().invoke(cli, ["fit", "--config", str(path)])
    errors = [line for line in result.output.splitlines() if "Error" in line]
    assert result.exit_code != 0 and errors == [
        f"Error: out, quiet in {path} are options of the command, not settings "
        "of a run; give them on the command line (--out, --quiet)"
    ]


def test_a_yaml_files_float_written_without_a_point_is_a_number(tmp_path):
    # PyYAML reads 1e-3 as a string (YAML 1.1): "lr must be a finite number,
    # got '1e-3'".
    path = tmp_path / "settings.yaml"
    path.write_text("epochs: 2\nlr: 1e-3\nsigma: 5E-1\nlikelihood: gaussian\n")
    printed = _print_config("--config", path)
    assert printed["lr"] == 0.001 and printed["sigma"] == 0.5
    assert printed["epochs"] == 2
    # Quoted, a number is a string, as in JSON: refused alike for every setting
    # (a quoted float was taken, a quoted integer refused).
    for line, word in (("epochs: '2'", "an integer"), ("lr: '1e-3'", "a finite")):
        path.write_text(line + "\n")
        result = CliRunner().invoke(cli, ["fit", "--config", str(path)])
        name, value = line.split(": ")
        assert f"Error: {name} (in settings.yaml) must be {word}" in result.output
        assert f"got {value}" in result.output


def test_a_resume_names_a_settings_files_key_at_its_default_as_the_files(
    tmp_path,
):
    # Said "--estimator iwae differs ...; drop --estimator", an option never given.
    from small_run import small_config

    train_run(small_config(estimator="dreg"), tmp_path / "run")
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"estimator": "iwae"}))
    command = ["fit", "--out", str(tmp_path / "run"), "--resume", "--config"]
    result = CliRunner().invoke(cli, [*command, str(path)])
    errors = [line for line in result.output.splitlines() if "Error" in line]
    assert result.exit_code == 2 and errors == [
        "Error: estimator (in r.json) iwae differs from the run's dreg; drop "
        f"estimator to resume {tmp_path / 'run'}, or start a new run"
    ]


def test_yaml_config_needs_pyyaml(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "yaml" else real(name, *a),
    )
    path = tmp_path / "settings.yaml"
    path.write_text("num_particles: 3\n")
    result = CliRunner().invoke(cli, ["fit", "--config", str(path)])
    errors = [line for line in result.output.splitlines() if "Error" in line]
    assert result.exit_code != 0 and len(errors) == 1 and "PyYAML" in errors[0]


def test_fit_options_are_made_from_the_config_fields():
    from pyro_iwae.runs.settings import declared

    text = CliRunner().invoke(cli, ["fit", "--help"]).output
    for name in declared(RunConfig):
        assert _OPTION_NAMES[name] in text, name
    # The command's own defaults: 40 epochs, all 8 stages of the paper's schedule.
    assert RunConfig.command_defaults() == {"stages": 8, "epochs": 40}


def test_a_given_data_folder_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = RunConfig.merge({"data_dir": "data"})
    assert config.data_dir == str(tmp_path / "data")
    resumed = RunConfig.merge({"data_dir": "~/d"}, base=config)
    assert resumed.data_dir == str(Path("~/d").expanduser().resolve())


def test_a_run_made_in_python_records_its_data_paths_absolute(tmp_path, monkeypatch):
    # RunConfig(dataset="points.npy") was saved relative: a run evaluated from
    # another folder read that folder's points.npy ("has changed") or none.
    import numpy as np

    from pyro_iwae import evaluate_run

    rng = np.random.default_rng(0)
    for folder in ("here", "elsewhere"):
        (tmp_path / folder).mkdir()
        points = rng.standard_normal((60, 3)).astype(np.float32)
        np.save(tmp_path / folder / "points.npy", points)
    monkeypatch.chdir(tmp_path / "here")
    config = linear_gaussian_config("points.npy", data_dir="data")
    train_run(config, "run")
    saved = json.loads((tmp_path / "here" / "run" / CONFIG_FILE).read_text())
    assert saved["dataset"] == str(tmp_path / "here" / "points.npy")
    assert saved["data_dir"] == str(tmp_path / "here" / "data")
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert evaluate_run(tmp_path / "here" / "run", num_samples=2, limit=3).points == 3
    # A built-in data set's name stays a name.
    assert RunConfig(dataset="mnist").dataset == "mnist"


def test_a_folder_without_a_run_is_refused_naming_both_ways_to_write_one(tmp_path):
    # "pass the directory of a run written by fit" said so of a folder that
    # pyro_iwae.fit had written (fit writes no config.json; train_run does).
    with pytest.raises(RunError) as error:
        RunConfig.load(tmp_path)
    assert str(error.value) == (
        f"{tmp_path} is not a run directory (no config.json); pass the directory "
        "of a run written by train_run or pyro-iwae fit"
    )
    with pytest.raises(RunError, match="written by train_run or pyro-iwae fit"):
        RunConfig.load(tmp_path / "none")


def test_a_settings_files_relative_paths_are_read_from_its_folder(
    tmp_path, monkeypatch
):
    # A relative "dataset" was read from the working directory, as for grids.
    import numpy as np

    folder = tmp_path / "settings"
    folder.mkdir()
    np.save(folder / "points.npy", np.zeros((40, 12), dtype=np.float32))
    (folder / "run.json").write_text(json.dumps({"dataset": "points.npy"}))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        cli, ["fit", "--config", "settings/run.json", "--print-config"]
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert printed["dataset"] == str(folder / "points.npy") and printed["x_dim"] == 12


def test_a_printed_config_with_another_dataset_learns_x_dim_from_the_data(
    tmp_path, monkeypatch
):
    # fit --config printed.json --dataset bin16.npy kept the printed 784 (of
    # mnist-mini) and was refused: "set x_dim to 16", which no option can; a
    # file's "x_dim": null was taken as the width: "the config says None".
    import numpy as np

    monkeypatch.chdir(tmp_path)
    np.save("bin16.npy", np.zeros((40, 16), dtype=np.float32))
    np.save("bin9.npy", np.zeros((40, 9), dtype=np.float32))

    def printed(*args):
        result = CliRunner().invoke(cli, ["fit", *args, "--print-config"])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    Path("printed.json").write_text(json.dumps(printed("--particles", 3)))
    assert json.loads(Path("printed.json").read_text())["x_dim"] == 784
    again = printed("--config", "printed.json", "--dataset", "bin16.npy")
    assert again["x_dim"] == 16 and again["num_particles"] == 3
    # From a printed config of one data file to another, and back to MNIST.
    Path("p16.json").write_text(json.dumps(again))
    assert printed("--config", "p16.json", "--dataset", "bin9.npy")["x_dim"] == 9
    assert printed("--config", "p16.json", "--dataset", "mnist-mini")["x_dim"] == 784
    assert printed("--config", "p16.json")["x_dim"] == 16
    for dataset, width in (("bin16.npy", 16), ("mnist-mini", 784)):
        Path("null.json").write_text(json.dumps({"dataset": dataset, "x_dim": None}))
        assert printed("--config", "null.json")["x_dim"] == width
        given = {"dataset": dataset, "x_dim": None}
        assert RunConfig.merge(given).x_dim == width
