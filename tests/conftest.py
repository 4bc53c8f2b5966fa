import pyro
import pytest
from linear_gaussian import LinearGaussian
from small_run import small_config

from pyro_iwae.runs import train_run


@pytest.fixture(autouse=True)
def _fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield


@pytest.fixture
def lg():
    return LinearGaussian()


@pytest.fixture
def run_dir(tmp_path):
    """A run directory of :func:`small_run.small_config`, trained one epoch."""
    run = tmp_path / "run"
    train_run(small_config(), run)
    return run
