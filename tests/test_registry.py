"""Builders by import path: the installed packages first, then the current folder."""

import os
import sys

import pytest
import torch

from pyro_iwae.nn.registry import BuilderError, build_guide, build_model

BUILDER = """
import torch


def build(x_dim, stochastic_layers):
    return torch.nn.Linear(x_dim, stochastic_layers)
"""


@pytest.fixture
def bare_folder(tmp_path, monkeypatch):
    """The current folder is ``tmp_path`` and is not on ``sys.path`` (as for the
    ``pyro-iwae`` command, whose path holds its own folder)."""
    monkeypatch.chdir(tmp_path)
    here = os.getcwd()
    path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    monkeypatch.setattr(sys, "path", path)
    return tmp_path


def test_an_import_path_finds_a_module_of_the_current_folder(bare_folder, monkeypatch):
    (bare_folder / "folder_guides.py").write_text(BUILDER)
    monkeypatch.delitem(sys.modules, "folder_guides", raising=False)
    guide = build_guide("folder_guides:build", x_dim=3, stochastic_layers=1)
    assert isinstance(guide, torch.nn.Linear) and guide.in_features == 3
    # After the installed packages: a file here shadows none of theirs.
    assert sys.path[-1] == os.getcwd()
    monkeypatch.delitem(sys.modules, "folder_guides")


def test_a_module_found_nowhere_leaves_the_path_as_it_was(bare_folder):
    before = list(sys.path)
    with pytest.raises(BuilderError, match="installed or its module is in the current"):
        build_guide("no_such_guides:build", x_dim=3, stochastic_layers=1)
    assert sys.path == before


def test_a_builder_that_cannot_take_the_settings_gets_one_line(bare_folder):
    (bare_folder / "needy.py").write_text(
        BUILDER + "\n\ndef wide(x_dim, stochastic_layers, width):\n"
        "    return torch.nn.Linear(x_dim, width)\n"
    )
    with pytest.raises(BuilderError, match="needs width, which no setting gives"):
        build_guide("needy:wide", x_dim=4, stochastic_layers=1)
    # A built-in has no signature to check: its TypeError becomes the message.
    with pytest.raises(BuilderError, match="cannot be called as a builder") as info:
        build_guide("builtins:max", x_dim=4, stochastic_layers=1)
    assert "\n" not in str(info.value)
    assert isinstance(
        build_guide("needy:build", x_dim=4, stochastic_layers=2), torch.nn.Linear
    )


def test_a_setting_a_built_in_takes_not_is_named_without_builder_advice():
    # "give its builder keyword arguments" offered to change pyro-iwae's own sbn.
    with pytest.raises(BuilderError) as info:
        build_model("sbn", x_dim=4, stochastic_layers=1, likelihood="gaussian")
    assert str(info.value) == "model 'sbn' takes no likelihood; drop that setting"


def test_a_builder_without_an_argument_every_run_gives_is_told_to_take_it():
    # "takes no stochastic_layers; drop that setting": no setting drops it, a
    # run always passes it.
    from pyro_iwae.nn.registry import GUIDES, register_guide

    def nokw(x_dim):
        return torch.nn.Linear(x_dim, 1)

    def narrow(x_dim, stochastic_layers):
        return torch.nn.Linear(x_dim, 1)

    try:
        register_guide("test-nokw")(nokw)
        register_guide("test-narrow")(narrow)
        with pytest.raises(BuilderError) as info:
            build_guide("test-nokw", x_dim=4, stochastic_layers=1)
        assert str(info.value) == (
            "guide 'test-nokw' takes no stochastic_layers, which a run gives every "
            "guide builder; give its builder that keyword argument (or **kwargs)"
        )
        # A setting it lacks may be dropped, or taken: the builder is the user's.
        with pytest.raises(BuilderError) as info:
            build_guide("test-narrow", x_dim=4, stochastic_layers=1, hidden=(5,))
        assert str(info.value) == (
            "guide 'test-narrow' takes no hidden; drop that setting, or give its "
            "builder keyword arguments of those names"
        )
    finally:
        GUIDES.pop("test-nokw", None)
        GUIDES.pop("test-narrow", None)


def test_a_builder_that_raises_is_named_in_one_line(bare_folder, monkeypatch):
    # A builder's own error went through as a traceback, from fit and reproduce.
    from test_cli import SMALL, assert_one_line_error, invoke

    (bare_folder / "boom.py").write_text(
        "def raises(x_dim, stochastic_layers):\n"
        "    raise RuntimeError('boom\\nin builder')\n"
    )
    monkeypatch.delitem(sys.modules, "boom", raising=False)
    with pytest.raises(BuilderError) as info:
        build_guide("boom:raises", x_dim=4, stochastic_layers=1)
    assert str(info.value) == (
        "guide 'boom:raises' failed to build (RuntimeError: boom in builder); "
        "fix its builder, or check the settings it was given"
    )
    assert isinstance(info.value.__cause__, RuntimeError)
    result = invoke("fit", *SMALL, "--guide", "boom:raises", "--out", "run")
    assert_one_line_error(result, "guide 'boom:raises' failed to build (RuntimeError")
    assert not (bare_folder / "run").exists()


def test_a_builder_defined_again_replaces_itself_and_another_needs_replace():
    # Running a notebook cell again raised "a guide named 'x' is registered already".
    from pyro_iwae import register_guide
    from pyro_iwae.nn.registry import GUIDES

    cell = (
        "@register_guide('cell-guide')\n"
        "def cell_guide(x_dim, stochastic_layers):\n"
        "    return torch.nn.Linear(x_dim, 1)\n"
    )
    namespace = {
        "__name__": "notebook",
        "register_guide": register_guide,
        "torch": torch,
    }
    try:
        exec(cell, namespace)
        first = namespace["cell_guide"]
        register_guide("cell-guide")(first)  # the same function again
        exec(cell, namespace)  # the cell run again: a new function of the same name
        assert GUIDES["cell-guide"] is namespace["cell_guide"] is not first

        def other(x_dim, stochastic_layers):
            return torch.nn.Linear(x_dim, 2)

        with pytest.raises(BuilderError) as info:
            register_guide("cell-guide")(other)
        assert str(info.value) == (
            "a guide named 'cell-guide' is registered already (notebook.cell_guide); "
            "give register_guide replace=True to replace it, or choose another name"
        )
        assert register_guide("cell-guide", replace=True)(other) is other
        assert build_guide("cell-guide", x_dim=3, stochastic_layers=1).out_features == 2
    finally:
        GUIDES.pop("cell-guide", None)


def test_another_lambda_or_nested_builder_of_a_taken_name_is_refused(
    bare_folder, monkeypatch
):
    # Every __main__.<lambda> (and every f.<locals>.build) counted as the same
    # builder: a second lambda silently replaced the first.
    import importlib

    from pyro_iwae import register_guide
    from pyro_iwae.nn.registry import GUIDES

    def nested(width):
        def build(x_dim, stochastic_layers):
            return torch.nn.Linear(x_dim, width)

        return build

    def nested_elsewhere():
        def build(x_dim, stochastic_layers):
            return torch.nn.Linear(x_dim, 3)

        return build

    try:
        first = register_guide("test-lambda")(lambda **kw: torch.nn.Linear(2, 1))
        with pytest.raises(BuilderError, match="'test-lambda' is registered already"):
            register_guide("test-lambda")(lambda **kw: 42)
        assert GUIDES["test-lambda"] is first
        register_guide("test-nested")(nested(1))
        with pytest.raises(BuilderError, match=r"nested\.<locals>\.build, "):
            register_guide("test-nested")(nested_elsewhere())
        # A plug-in module imported again registers its builder again.
        (bare_folder / "plugin_guides.py").write_text(
            "import torch\n"
            "from pyro_iwae import register_guide\n\n\n"
            "@register_guide('test-plugin')\n"
            "def build(x_dim, stochastic_layers):\n"
            "    return torch.nn.Linear(x_dim, 1)\n"
        )
        monkeypatch.syspath_prepend(str(bare_folder))
        monkeypatch.delitem(sys.modules, "plugin_guides", raising=False)
        module = importlib.import_module("plugin_guides")
        old = module.build
        assert importlib.reload(module).build is not old
        assert GUIDES["test-plugin"] is module.build
        # Edited, then imported again (autoreload, a notebook's edited cell):
        # refused since the builder's line moved.
        path = bare_folder / "plugin_guides.py"
        path.write_text("# edited\n" + path.read_text())
        edited = importlib.reload(module).build
        assert GUIDES["test-plugin"] is edited
    finally:
        for name in ("test-lambda", "test-nested", "test-plugin"):
            GUIDES.pop(name, None)
        sys.modules.pop("plugin_guides", None)


def test_an_unknown_name_says_a_name_registered_in_python_is_not_the_cli_s():
    # eval-nll of a run whose guide was registered in a script said only
    # "unknown guide 'flow'; choose one of: ...".
    with pytest.raises(BuilderError) as info:
        build_guide("registered-elsewhere", x_dim=3, stochastic_layers=1)
    assert str(info.value).endswith(
        "or an entry point of group pyro_iwae.nn.guides (a name given to "
        "register_guide in Python is known to that process only: a command line "
        "needs one of the other two)"
    )


def test_an_entry_point_a_registered_name_shadows_is_warned_of(tmp_path, monkeypatch):
    # An entry point named paper was never used, without a word: the built-in ran.
    import warnings

    from pyro_iwae.nn.guides import PaperGuide

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none without such an entry point
        build_guide("paper", x_dim=4, stochastic_layers=1)
    dist_info = tmp_path / "my_guides-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: my_guides\n")
    (dist_info / "entry_points.txt").write_text(
        "[pyro_iwae.nn.guides]\npaper = user_guides:build_guide\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(UserWarning) as caught:
        guide = build_guide("paper", x_dim=4, stochastic_layers=1)
    assert isinstance(guide, PaperGuide)
    (warning,) = caught
    assert str(warning.message) == (
        "the entry point 'paper' of group pyro_iwae.nn.guides (my_guides: "
        "user_guides:build_guide) is not used: the guide registered as 'paper' "
        "comes first; rename the entry point, or name its builder by its import "
        "path (user_guides:build_guide)"
    )
    assert warning.filename == __file__  # the caller's line
