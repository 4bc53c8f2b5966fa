"""Every code block of the README and of the documentation (docs/source/*.md) runs.

- ``python`` blocks run as written: a page's blocks in order, in one namespace, in
  a temporary working folder, from fixed seeds. A block after
  ``<!-- test: slow -->`` runs only with the slow tests (``PYRO_IWAE_SLOW_TESTS=1``,
  as CI runs them); one after ``<!-- test: skip REASON -->`` never runs.
- Every ``pyro-iwae`` command in a ``bash`` block is parsed by the real command
  line (its options, their types and choices); the blocks after
  ``<!-- test: run -->`` also run, after the page's Python blocks, in the same
  folder.
- ``toml`` blocks parse.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import sys
from pathlib import Path
from typing import NamedTuple

import pyro
import pytest
from click.testing import CliRunner

from pyro_iwae_cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs" / "source").glob("*.md"))]
SLOW = os.environ.get("PYRO_IWAE_SLOW_TESTS") == "1"

FENCE = re.compile(
    r"(?:<!-- test: (?P<mark>[\w-]+)[^>]*-->\n+)?"
    r"^(?P<indent>[ ]*)```(?P<lang>[^\n]*)\n(?P<code>.*?)^(?P=indent)```[ ]*$",
    re.M | re.S,
)


class Block(NamedTuple):
    page: Path
    lang: str
    mark: str | None
    code: str
    line: int


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for m in FENCE.finditer(text):
        indent = len(m["indent"])
        code = "".join(line[indent:] + "\n" for line in m["code"].splitlines())
        line = text.count("\n", 0, m.start("code")) + 1
        found.append(Block(page, m["lang"].strip(), m["mark"], code, line))
    return found


def commands(block: Block) -> list[list[str]]:
    """The arguments of every ``pyro-iwae`` command of a shell block."""
    joined = block.code.replace("\\\n", " ")
    found = []
    for line in joined.splitlines():
        line = line.split(" #")[0] if not line.lstrip().startswith("#") else ""
        for part in re.split(r"&&|;|\|", line):
            part = part.replace("$(command -v pyro-iwae)", "pyro-iwae")
            words = shlex.split(part)
            if "pyro-iwae" in words:
                found.append(words[words.index("pyro-iwae") + 1 :])
    return found


def page_id(page: Path) -> str:
    return page.name


def test_every_page_has_its_blocks_found():
    # A fence the pattern misses would go untested: count the fences by hand.
    for page in PAGES:
        fences = sum(
            1 for line in page.read_text().splitlines() if line.strip() == "```"
        )
        assert len(blocks(page)) == fences, page


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_commands_parse(page, monkeypatch):
    monkeypatch.chdir(ROOT)  # paths the commands name, as from a clone
    for block in blocks(page):
        if block.lang not in ("bash", "console", "sh"):
            continue
        for args in commands(block):
            where = f"{page.name}:{block.line}: pyro-iwae {shlex.join(args)}"
            assert args and args[0] in cli.commands, where
            command = cli.commands[args[0]]
            parent = cli.make_context("pyro-iwae", [args[0]], resilient_parsing=True)
            try:
                command.make_context(args[0], args[1:], parent=parent)
            except Exception as e:  # click's usage errors, an option's check
                pytest.fail(f"{where}: {e}")


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_toml_blocks_parse(page):
    tomllib = pytest.importorskip("tomllib")
    for block in blocks(page):
        if block.lang == "toml":
            tomllib.loads(block.code)


def run_page(page: Path, tmp_path: Path, monkeypatch) -> dict:
    """Runs the page's Python blocks, then its ``run`` shell blocks; returns the
    namespace of the Python blocks."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYRO_IWAE_RUNS", str(tmp_path / "runs"))
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    # Classes defined in a block are pickled by name (checkpoints): give them a module.
    module = type(sys)(namespace["__name__"])
    module.__dict__.update(namespace)
    monkeypatch.setitem(sys.modules, namespace["__name__"], module)
    namespace = module.__dict__
    ran = 0
    for block in blocks(page):
        if block.lang != "python" or block.mark == "skip":
            continue
        if block.mark == "slow" and not SLOW:
            continue
        code = "\n" * (block.line - 1) + block.code  # tracebacks point into the page
        exec(compile(code, str(page), "exec"), namespace)
        ran += 1
    for block in blocks(page):
        if block.mark != "run":
            continue
        for args in commands(block):
            result = CliRunner().invoke(cli, args, catch_exceptions=False)
            assert result.exit_code == 0, (
                f"pyro-iwae {shlex.join(args)}\n{result.output}"
            )
            ran += 1
    if ran == 0:
        pytest.skip("no block of this page runs here")
    return namespace


@pytest.mark.parametrize(
    "page",
    [p for p in PAGES if p.stem not in ("own_data_and_model", "README")],
    ids=page_id,
)
def test_page_runs(page, tmp_path, monkeypatch):
    run_page(page, tmp_path, monkeypatch)


def test_own_data_and_model_page_trains_and_evaluates(tmp_path, monkeypatch, capsys):
    page = ROOT / "docs" / "source" / "own_data_and_model.md"
    namespace = run_page(page, tmp_path, monkeypatch)
    out = capsys.readouterr().out
    # The flow guide's example. An untrained model scores about 784 log 2 = 543
    # nats per image.
    nll = float(re.search(r"test NLL ~ ([\d.]+) nats\n", out)[1])
    assert 60 < nll < 300
    # The grey-level example.
    nll, bits = re.search(
        r"test NLL ~ (-?[\d.]+) nats, (-?[\d.]+) bits/dim", out
    ).groups()
    assert math.isfinite(float(nll))
    assert abs(float(bits) - float(nll) / (784 * math.log(2))) < 1e-3
    history = namespace["history"]
    assert history[-1]["test_bound"] > history[0]["test_bound"]
    # The data were used as given: grey levels, not 0/1.
    assert len(namespace["data"].train[:100].unique()) > 2


def test_readme_python_example_trains(tmp_path, monkeypatch, capsys):
    run_page(README, tmp_path, monkeypatch)
    out = capsys.readouterr().out
    nll = float(re.search(r"test NLL ~ ([\d.]+) nats", out)[1])
    assert 60 < nll < 543  # 10 steps: below an untrained model's 784 log 2
    bound, nll = map(
        float, re.search(r"test bound (-?[\d.]+), NLL ([\d.]+)", out).groups()
    )
    assert nll < -bound + 1  # the k = 100 estimate is tighter than the k = 5 bound


API = ROOT / "docs" / "source" / "api.rst"
#: The packages whose ``__all__`` lists names (the others list their modules).
EXPORTING = ("pyro_iwae", "pyro_iwae.compiled", "pyro_iwae.runs")


def api_names() -> dict[str, list[object]]:
    """The objects api.rst documents (by a directive, or as a member an
    ``automodule`` lists), by their last name."""
    import importlib

    text = API.read_text()
    module = "pyro_iwae"
    documented: dict[str, list[object]] = {}
    directive = re.compile(
        r"^\.\. (?P<kind>currentmodule|auto\w+|py:\w+):: (?P<target>[\w.]+)"
        r"(?P<options>(?:\n[ ]+:.*(?:\n[ ]{5,}\S.*)*)*)",
        re.M,
    )
    for m in directive.finditer(text):
        kind, target = m["kind"], m["target"]
        if kind == "currentmodule":
            module = target
            continue
        if kind == "automodule":
            members = re.search(r":members:(.*(?:\n[ ]{5,}\S.*)*)", m["options"])
            listed = members[1].replace("\n", " ").strip() if members else ""
            found = importlib.import_module(target)
            names = [n.strip() for n in listed.split(",")] if listed else found.__all__
            for name in names:
                documented.setdefault(name, []).append(getattr(found, name))
            continue
        path = target if "." in target else f"{module}.{target}"
        owner, _, name = path.rpartition(".")
        try:
            found = importlib.import_module(owner)
        except ImportError:  # a class's member, as Class.method
            parent, _, attribute = owner.rpartition(".")
            found = getattr(importlib.import_module(parent), attribute)
        documented.setdefault(name, []).append(getattr(found, name))
    return documented


def test_every_exported_name_is_in_the_api_reference():
    # check_guide_gradients, GradientCheck, ... were exported and documented nowhere.
    import importlib

    documented = api_names()
    missing = [
        f"{package}.{name}"
        for package in EXPORTING
        for name in importlib.import_module(package).__all__
        if not any(
            found is getattr(importlib.import_module(package), name)
            for found in documented.get(name, [])
        )
    ]
    assert not missing, f"add to {API.name}: {', '.join(missing)}"


def test_every_exported_callable_has_a_docstring():
    # register_guide and register_model had none: help() showed nothing.
    import importlib

    bare = []
    for package in EXPORTING:
        for name in importlib.import_module(package).__all__:
            found = getattr(importlib.import_module(package), name)
            if not callable(found):
                continue
            doc = found.__dict__.get("__doc__") if isinstance(found, type) else None
            if not isinstance(found, type):
                doc = found.__doc__
            # A dataclass or NamedTuple without one gets its signature.
            if not doc or doc.startswith(f"{found.__name__}("):
                bare.append(f"{package}.{name}")
    assert not bare, f"no docstring: {', '.join(bare)}"


def test_the_subpackages_without_names_of_their_own_export_their_modules():
    # pyro_iwae.infer and pyro_iwae.nn had no __all__.
    import importlib

    for package in ("pyro_iwae.infer", "pyro_iwae.nn"):
        folder = ROOT / package.replace(".", "/")
        modules = sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__")
        assert sorted(importlib.import_module(package).__all__) == modules


CLI_PAGE = ROOT / "docs" / "source" / "cli.md"


def cli_page_sections() -> dict[str, str]:
    """Per command, the text of cli.md that documents its options: its row of
    the command table, its subsection, and the entries of the shared options
    whose list of commands names it."""
    text = CLI_PAGE.read_text()
    own: dict[str, str] = {}
    for m in re.finditer(r"^\| `pyro-iwae ([\w-]+).*$", text, re.M):
        own[m[1]] = own.get(m[1], "") + m[0]
    section = r"^### {}[^\n]*\n(.*?)(?=^##|\Z)"
    for m in re.finditer(
        section.format(r"`pyro-iwae ([\w-]+)[^`]*`"), text, re.M | re.S
    ):
        own[m[1]] = own.get(m[1], "") + m[2]
    shared = re.search(
        section.format("Options several commands share"), text, re.M | re.S
    )
    for entry in shared[1].split("\n- ") if shared else []:
        # - `--option ...` (`fit`, `eval-nll`): ...
        commands = re.match(r"[^(]*\(([^)]*)\)", entry)
        for name in re.findall(r"`([\w-]+)`", commands[1] if commands else ""):
            own[name] = own.get(name, "") + entry
    return own


def test_every_option_of_every_command_is_on_the_command_line_page():
    # check-guide, fit --config and --print-config, sample --n, ... were on no page.
    own = cli_page_sections()
    missing = []
    for name, command in cli.commands.items():
        for param in command.params:
            for option in param.opts + param.secondary_opts:
                if option.startswith("--") and option != "--help":
                    if not re.search(
                        re.escape(option) + r"(?![\w-])", own.get(name, "")
                    ):
                        missing.append(f"{name} {option}")
    assert not missing, f"document in {CLI_PAGE.name}: {', '.join(missing)}"


def test_check_guide_help_names_the_exit_status_of_a_check_that_cannot_fail():
    # The help said only "exits with status 1 if a mean differs"; this exits 2.
    runner = CliRunner()
    help_text = " ".join(runner.invoke(cli, ["check-guide", "--help"]).output.split())
    result = runner.invoke(cli, ["check-guide", "--estimator", "vimco"])
    assert result.exit_code == 2, result.output
    assert "so the check could not fail" in result.output
    assert (
        "Exit status: 0 if no mean differs; 1 if one does, or on an error; 2 for a "
        "usage error, a check that could not fail included" in help_text
    )


def test_the_layout_page_names_every_module_in_its_package():
    # runs/auto_compile.py was missing from layout.md's list of runs/.
    text = (ROOT / "docs" / "source" / "layout.md").read_text()
    tree = re.search(r"```text\n(.*?)```", text, re.S)[1]
    # Each package's entry starts in the first column: its name, then its modules.
    entries = dict(re.findall(r"^(\S+)[ ]+(.*?)(?=^\S|\Z)", tree, re.M | re.S))
    folders = {
        "pyro_iwae_cli": ROOT / "cli",
        **{
            f"pyro_iwae/{p.name}/": p
            for p in (ROOT / "pyro_iwae").iterdir()
            if (p / "__init__.py").exists()
        },
        "pyro_iwae/": ROOT / "pyro_iwae",
    }
    missing = [
        f"{folder.name}/{module.name}"
        for key, folder in folders.items()
        for module in sorted(folder.glob("*.py"))
        if module.name != "__init__.py"
        and not re.search(rf"(?<![\w/]){re.escape(module.name)}", entries.get(key, ""))
    ]
    assert not missing, f"name in layout.md: {', '.join(missing)}"


def test_the_per_point_files_of_an_evaluation_are_described():
    # estimates-*.txt (no header, beside a diagnostics file with one) was named
    # on the pages, its content nowhere.
    page = " ".join((ROOT / "docs" / "source" / "evaluation.md").read_text().split())
    assert (
        "The estimates file has no header: one number a line, the estimate of" in page
    )
    assert "log p(x) in nats" in page and "the JSON's `nll` is minus their mean" in page
    assert "`# ess khat`" in page


def test_the_enumeration_pages_bound_is_seeded_and_below_log_p(capsys):
    # The snippet printed "bound <= log p(x)" from one unseeded draw, which can lie
    # above log p(x): its line changed from run to run and could state a falsehood.
    page = ROOT / "docs" / "source" / "enumeration.md"
    (code,) = [b.code for b in blocks(page) if b.lang == "python"]
    lines = []
    for seed in (0, 1, 2):  # whatever the random state it starts from
        pyro.set_rng_seed(seed)
        namespace: dict = {}
        exec(compile(code, str(page), "exec"), namespace)
        lines.append(capsys.readouterr().out)
        assert namespace["bound"] <= namespace["exact"].sum()
    assert len(set(lines)) == 1 and "mean of 20 draws" in lines[0]


def _resolve(dotted: str) -> object:
    """The module or attribute that ``dotted`` (``pyro_iwae.a.b``) names."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for part in parts[cut:]:
            found = getattr(found, part)
        return found
    raise ModuleNotFoundError(dotted)


def test_every_pyro_iwae_name_the_docs_write_can_be_imported():
    # README.md and layout.md said every public name is importable from pyro_iwae;
    # CompiledLoss, JointOptim, CallbackList, load_dataset, ... were not.
    former = {"pyro_iwae.objectives"}  # layout.md: where a 0.1.0 module went
    missing = []
    for page in [*PAGES, API]:
        for dotted in set(re.findall(r"\bpyro_iwae(?:\.\w+)+", page.read_text())):
            if dotted in former:
                continue
            try:
                _resolve(dotted.rstrip("."))
            except (ImportError, AttributeError):
                missing.append(f"{page.name}: {dotted}")
    assert not missing, missing


def test_every_error_and_warning_the_library_raises_is_importable_from_pyro_iwae():
    # As README.md and layout.md say; PlateNestingError, BuilderError,
    # CompileFallbackWarning and InaccurateInverseWarning were not.
    import importlib
    import pkgutil

    import pyro_iwae

    missing = []
    for info in pkgutil.walk_packages(pyro_iwae.__path__, "pyro_iwae."):
        module = importlib.import_module(info.name)
        for name in getattr(module, "__all__", []):
            found = getattr(module, name)
            if isinstance(found, type) and issubclass(found, (Exception, Warning)):
                if getattr(pyro_iwae, name, None) is not found:
                    missing.append(f"{info.name}.{name}")
    assert not missing, missing
    for name in ("CompiledLoss", "JointOptim", "CallbackList", "load_dataset"):
        assert name in pyro_iwae.__all__  # the helpers the docs' examples use


def test_the_evaluation_pages_speed_ups_are_those_of_its_numbers():
    # It said "about three times faster (... 33.3 s eager, 24.4 s with compiling)":
    # 1.4 times, and the numbers were in no section of results/benchmarks.md.
    page = " ".join((ROOT / "docs" / "source" / "evaluation.md").read_text().split())
    bench = (ROOT / "results" / "benchmarks.md").read_text()
    ratio, compiled, eager = re.search(
        r"about ([\d.]+) times as fast \(100 test points at K = 5000: ([\d.]+) s "
        r"compiled against ([\d.]+) s eager",
        page,
    ).groups()
    assert round(float(eager) / float(compiled), 1) == float(ratio)
    for variant, seconds in (("pyro_iwae", eager), ("compiled", compiled)):
        assert f"| 100 | 5000 | {variant} | 106 | {seconds} |" in bench
    compiled, eager, ratio = re.search(
        r"took ([\d.]+) s with compiling, [\d.]+ s of it the compile, against "
        r"([\d.]+) s eager, ([\d.]+) times as fast",
        page,
    ).groups()
    assert round(float(eager) / float(compiled), 1) == float(ratio)
    assert "three times" not in page


def test_the_distributed_page_says_estimates_agree_at_the_same_threads_only():
    # It said "identical with 1 and with N processes" without the condition: a
    # plain run on 2 threads and `OMP_NUM_THREADS=1 torchrun` differ by ~1e-5.
    page = " ".join((ROOT / "docs" / "source" / "distributed.md").read_text().split())
    claim = re.search(
        r"the estimates are identical with 1 and with N processes[^.]*", page
    )
    assert claim and "at the same threads per process (`OMP_NUM_THREADS`)" in claim[0]
    assert "run the plain one with `OMP_NUM_THREADS=1` too" in page


def test_the_evaluation_pages_medians_are_those_eval_nll_reports():
    # It printed d.ess.median(), torch's lower median (2 of 1, 2, 3, 4), where
    # eval-nll reports the usual one (2.5).
    import torch

    from pyro_iwae.runs.eval_results import _median

    page = ROOT / "docs" / "source" / "evaluation.md"
    code = next(b.code for b in blocks(page) if "median ESS" in b.code)
    calls = re.findall(r"d\.(ess|khat)(\.\w+\([^)]*\))", code)
    assert sorted(name for name, _ in calls) == ["ess", "khat"]
    x = torch.tensor([4.0, 1.0, 3.0, 2.0])
    for _, call in calls:
        assert float(eval(f"x{call}")) == float(_median(x)) == 2.5
