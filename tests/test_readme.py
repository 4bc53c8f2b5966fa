"""The README's Python example runs as written and trains."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    match = re.search(r"<!-- test: custom-guide -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its tested custom-guide example"
    return match.group(1)


def test_custom_guide_example_trains_and_evaluates(capsys):
    namespace: dict = {}
    exec(compile(readme_example(), str(README), "exec"), namespace)
    nll = float(re.search(r"test NLL ~ ([\d.]+) nats", capsys.readouterr().out)[1])
    # An untrained model scores about 784 log 2 = 543 nats per image.
    assert 60 < nll < 300
