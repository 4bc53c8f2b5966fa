"""Sphinx configuration of the pyro-iwae documentation (built with ``-W``: every
warning, a broken cross-reference included, fails the build)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pyro_iwae import __version__  # noqa: E402

project = "pyro-iwae"
author = "the pyro-iwae authors"
copyright = "the pyro-iwae authors, Apache-2.0"
version = release = __version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3
exclude_patterns = ["_build"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"

# A reference to a name of this package that does not resolve fails the build.
# Names of other libraries cannot be resolved without their inventories (the build
# reaches no documentation site), so only those are let through.
nitpicky = True
nitpick_ignore = [
    ("py:class", "pyro_iwae.runs.distributed.T"),  # a TypeVar
    # Module-level helpers that docstrings name but the API does not include.
    ("py:func", "tail_length"),
    ("py:data", "KHAT_THRESHOLD"),
    ("py:data", "SIGMOID_SHARPNESS"),
    ("py:func", "default_chunk_size"),
    ("py:func", "log_weight_chunks"),
    ("py:func", "estimate_problem"),
    ("py:func", "resolve"),
    ("py:func", "pyro_iwae.infer.evaluation.combine_chunks"),
    ("py:func", "bernoulli_log_prob_sum"),
    ("py:func", "exp_tanh"),
    ("py:func", "_lift_random_ops"),
]
nitpick_ignore_regex = [
    (
        r"py:.*",
        r"(torch|pyro|typing|collections|numpy|click|pathlib|os|dataclasses|datetime|enum|io|abc|contextlib|types)(\..*)?",
    ),
    (
        r"py:.*",
        r"(Tensor|Path|Callable|Iterator|Iterable|Any|Sequence|Mapping|NamedTuple|Generator|PathLike|TextIO|T|optional)",
    ),
    (
        r"py:.*",
        r"(int|float|str|bool|dict|list|tuple|None|bytes|object|type|Exception|ValueError|UserWarning|RuntimeError|Warning)",
    ),
]

html_theme = "alabaster"
html_title = f"pyro-iwae {release}"
html_static_path = ["_static"]
