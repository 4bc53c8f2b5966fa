"""The README's Python examples run as written and train."""

import math
import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def readme_example(name: str = "custom-guide") -> str:
    text = README.read_text()
    pattern = rf"<!-- test: {name} -->\s*```python\n(.*?)```"
    match = re.search(pattern, text, re.S)
    assert match, f"README lost its tested {name} example"
    return match.group(1)


def test_custom_guide_example_trains_and_evaluates(capsys):
    namespace: dict = {}
    exec(compile(readme_example(), str(README), "exec"), namespace)
    nll = float(re.search(r"test NLL ~ ([\d.]+) nats", capsys.readouterr().out)[1])
    # An untrained model scores about 784 log 2 = 543 nats per image.
    assert 60 < nll < 300


def test_own_data_example_trains_a_pyro_module_on_grey_levels(capsys):
    namespace: dict = {}
    exec(compile(readme_example("own-data"), str(README), "exec"), namespace)
    out = capsys.readouterr().out
    nll, bits = re.search(
        r"test NLL ~ (-?[\d.]+) nats, (-?[\d.]+) bits/dim", out
    ).groups()
    assert math.isfinite(float(nll))
    assert abs(float(bits) - float(nll) / (784 * math.log(2))) < 1e-3
    history = namespace["history"]
    assert history[-1]["test_bound"] > history[0]["test_bound"]
    # The data were used as given: grey levels, not 0/1.
    assert len(namespace["data"].train[:100].unique()) > 2
