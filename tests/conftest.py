import pyro
import pytest
import torch
from linear_gaussian import LinearGaussian
from small_run import small_config

from pyro_iwae.runs import auto_compile
from pyro_iwae.runs.denormals import flushing_denormals
from pyro_iwae.runs.run import train_run

#: This process's flush mode before any test (see _flush_mode_restored).
FLUSHING_AT_START = flushing_denormals()


@pytest.fixture(autouse=True)
def _flush_mode_restored():
    """`pyro-iwae fit` leaves its process flushing subnormals (it owns the
    process); CliRunner runs it in this one, in tests and in module-scoped
    fixtures: the mode goes back to the session's after each test."""
    yield
    torch.set_flush_denormal(FLUSHING_AT_START)


@pytest.fixture(autouse=True)
def _fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield


@pytest.fixture(autouse=True)
def _header_taken_as_built(monkeypatch):
    """compile="auto" counts the cost of inductor's precompiled header where this
    machine has not built it yet: taken as built, so that choices do not depend
    on what ran here before (tests/test_auto_compile.py tests both)."""
    monkeypatch.setattr(auto_compile, "header_built", lambda: True)


@pytest.fixture
def lg():
    return LinearGaussian()


@pytest.fixture
def run_dir(tmp_path):
    """A run directory of :func:`small_run.small_config`, trained one epoch."""
    run = tmp_path / "run"
    train_run(small_config(), run)
    return run


@pytest.fixture
def correlated():
    """A linear-Gaussian model whose posterior has correlation -0.76: a mean-field
    guide cannot match it."""
    return LinearGaussian(seed=11)


@pytest.fixture
def one_thread():
    """One torch thread: on tiny tensors a second only adds contention (on a
    shared machine, ten times slower per operation)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float64_default():
    """float64 as torch's default dtype: Pyro's autoregressive inverse starts from a
    tensor of the default dtype, and its masked layers keep their masks in it."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default)
